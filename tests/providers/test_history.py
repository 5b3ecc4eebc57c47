"""The bounded per-minute check history per provider (app/providers/history.py)."""

from __future__ import annotations

import fakeredis

from app.providers import history

NOW = 1_800_000_000.0  # a minute's start


def test_checks_are_counted_per_minute_over_the_last_hour() -> None:
    client = fakeredis.FakeRedis()
    history.record(client, "alpha", NOW - 2 * 3600, True, 1)  # older than the window
    history.record(client, "alpha", NOW - 120, True, 10)
    history.record(client, "alpha", NOW - 100, True, 30)
    history.record(client, "alpha", NOW + 5, False, None)
    history.record(client, "alpha", NOW + 6, True, 40)
    read = history.read(client, ["alpha", "nobody"], now=NOW + 10)
    assert read["nobody"] == []
    assert read["alpha"] == [
        history.Sample(NOW - 120, 2, 2, 20),
        history.Sample(NOW, 2, 1, 40),
    ]
    assert [s.all_live for s in read["alpha"]] == [True, False]
    ttl = client.ttl(f"flopex:history:alpha:{int(NOW // 60)}")
    assert 0 < ttl <= history.WINDOW_MIN * 60 + 60
