"""Checking every enabled provider at once, as the board's refresh does one by one (the
operators' and the tests' way to fill the board now), and the last check as GET /v1/providers
shows it."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import redis
from sqlalchemy import select
from sqlalchemy.orm import Session

from app.models import Provider
from app.providers import board
from app.providers.breaker import Breaker


@dataclass(frozen=True)
class ProbeResult:
    provider: str
    live: bool
    latency_ms: int | None
    error: str | None
    checked_at: float


def enabled_targets(session: Session) -> list[board.Target]:
    providers = session.execute(
        select(Provider.name, Provider.base_url, Provider.api_key_env)
        .where(Provider.enabled)
        .order_by(Provider.name)
    ).all()
    return [board.Target(name, url, key_env) for name, url, key_env in providers]


def probe_all(
    session: Session,
    client: redis.Redis,
    breaker: Breaker,
    *,
    timeout_s: float,
    now: float | None = None,
) -> list[ProbeResult]:
    """Checks every enabled provider now (a board check each, not under single flight)."""
    targets = enabled_targets(session)
    session.rollback()  # no transaction held while pinging
    results = []
    for target in targets:
        entry = board.check(client, breaker, target, timeout_s, now or time.time())
        results.append(
            ProbeResult(entry.provider, entry.live, entry.rtt_ms, entry.error, entry.measured_at)
        )
    return results


def last_probe(client: redis.Redis, provider: str) -> dict[str, Any] | None:
    """The provider's board entry: live, the last good check's round trip, when measured."""
    entry = board.read(client, [provider]).get(provider)
    if entry is None:
        return None
    return {
        "live": entry.live,
        "latency_ms": entry.rtt_ms if entry.live else None,
        "checked_at": entry.measured_at,
    }
