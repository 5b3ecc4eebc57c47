"""The per-process key lookup cache: a hit within its TTL, a fresh lookup after it, and failed
lookups never cached."""

from __future__ import annotations

from app.api import auth
from app.api.auth import PrincipalCache
from app.billing.accounts import key_prefix, revoke_key
from app.infra.db import session_scope


def test_cached_within_ttl_and_revocation_seen_after_it(flask_app, make_account, monkeypatch):
    account = make_account()
    clock = [1000.0]
    monkeypatch.setattr(auth.time, "monotonic", lambda: clock[0])
    cache = PrincipalCache(ttl_s=2)
    with flask_app.app_context():
        first = cache.get(account.api_key)
        assert first is not None and first.account_id == account.account_id
        with session_scope() as session:
            revoke_key(session, key_prefix(account.api_key))
        clock[0] += 1
        assert cache.get(account.api_key) == first  # within the TTL
        clock[0] += 2
        assert cache.get(account.api_key) is None  # the revocation is seen


def test_failed_lookups_are_not_cached(flask_app, make_account):
    cache = PrincipalCache(ttl_s=60)
    with flask_app.app_context():
        assert cache.get("fpx_unknown0_aaaaaaaaaaaaaaaaaaaaaaaa") is None
        assert cache._entries == {}
        assert cache.get(make_account().api_key) is not None
        assert len(cache._entries) == 1
        assert not any("fpx_" in digest for digest in cache._entries)  # hashes, never keys


def test_an_address_that_keeps_failing_gets_429_and_valid_keys_still_work(
    flask_app, client, make_account, monkeypatch, redis_client
):
    """FLOPEX_AUTH_FAILURES_PER_MIN: past that many failed keys in a burst, an address's further
    failures answer 429 with Retry-After instead of 401. A valid key from the same address (a
    colleague behind the same NAT) is looked up and works, remembered or not; other addresses
    are not affected (FLOPEX_TRUSTED_PROXY_HOPS decides which address is the client's), and an
    IPv6 host counts per /64."""
    from werkzeug.middleware.proxy_fix import ProxyFix

    account = make_account()
    cache = PrincipalCache(ttl_s=60, failures_per_min=3)
    monkeypatch.setitem(flask_app.extensions, "flopex_principals", cache)
    monkeypatch.setattr(flask_app, "wsgi_app", ProxyFix(flask_app.wsgi_app, x_for=1))

    def get(key, address):
        return client.get(
            "/v1/wallet",
            headers={"Authorization": f"Bearer {key}", "X-Forwarded-For": address},
        )

    bad = "fpx_guess0000_aaaaaaaaaaaaaaaaaaaaaaaa"
    assert [get(bad, "203.0.113.9").status_code for _ in range(3)] == [401, 401, 401]
    refused = get(bad, "203.0.113.9")
    assert refused.status_code == 429
    assert refused.get_json()["error"]["code"] == "rate_limited"
    assert 1 <= int(refused.headers["Retry-After"]) <= 20
    # Not remembered by this process: looked up, and served.
    assert get(account.api_key, "203.0.113.9").status_code == 200
    assert get(bad, "198.51.100.20").status_code == 401  # another client
    # One IPv6 host's /64 is one client: rotating the low bits does not reset its count.
    statuses = [get(bad, f"2001:db8:1:2::{i:x}").status_code for i in range(1, 5)]
    assert statuses == [401, 401, 401, 429]
    assert get(bad, "2001:db8:1:3::1").status_code == 401  # another /64
    redis_client.delete(
        *[
            f"flopex:rl:authfail:{a}"
            for a in ("203.0.113.9", "198.51.100.20", "2001:db8:1:2::/64", "2001:db8:1:3::/64")
        ]
    )
