"""The bounded probe history per provider (app/providers/history.py)."""

from __future__ import annotations

import fakeredis

from app.providers import history


def test_samples_come_back_oldest_first_and_bounded() -> None:
    client = fakeredis.FakeRedis()
    for i in range(history.KEEP + 5):
        history.record(client, "alpha", 1000.0 + i, i % 2 == 0, None if i % 2 else 10 + i)
    read = history.read(client, ["alpha", "nobody"])
    assert read["nobody"] == []
    samples = read["alpha"]
    assert len(samples) == history.KEEP
    assert [s.at for s in samples] == [1000.0 + i for i in range(5, history.KEEP + 5)]
    last = history.KEEP + 4
    assert samples[-1] == history.Sample(
        1000.0 + last, last % 2 == 0, None if last % 2 else 10 + last
    )
    assert client.ttl("flopex:history:alpha") > 0
