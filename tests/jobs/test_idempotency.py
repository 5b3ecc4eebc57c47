"""app/jobs/idempotency.py's fingerprint: what counts as the same request."""

from __future__ import annotations

from decimal import Decimal

from app.jobs.idempotency import fingerprint


def test_spellings_of_one_number_are_one_request():
    one = fingerprint("POST /x", {"a": Decimal("1.5"), "n": 10})
    assert one == fingerprint("POST /x", {"n": Decimal("1E+1"), "a": Decimal("1.50")})


def test_a_number_and_its_text_or_a_nearby_long_number_are_different_requests():
    assert fingerprint("POST /x", {"a": Decimal("1.5")}) != fingerprint("POST /x", {"a": "1.5"})
    # Past the default 28 significant digits, a rounding normalisation would merge these.
    assert fingerprint("POST /x", {"n": 10**40 + 1}) != fingerprint("POST /x", {"n": 10**40 + 2})
    assert fingerprint("POST /x", {"b": True}) != fingerprint("POST /x", {"b": 1})
