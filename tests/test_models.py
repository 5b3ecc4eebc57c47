"""app/models.py: how a stored timestamp is shown by the API."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

from app.models import iso_utc


def test_timestamps_are_shown_in_utc_with_a_z_whatever_the_database_returns():
    aware = datetime(2026, 11, 26, 5, 48, 19, 190069, tzinfo=UTC)
    assert iso_utc(aware) == "2026-11-26T05:48:19.190069Z"
    # SQLite returns the same instant without a zone.
    assert iso_utc(aware.replace(tzinfo=None)) == "2026-11-26T05:48:19.190069Z"
    # Another zone is converted, not relabelled.
    plus_one = aware.astimezone(timezone(timedelta(hours=1)))
    assert iso_utc(plus_one) == "2026-11-26T05:48:19.190069Z"
    assert iso_utc(None) is None
