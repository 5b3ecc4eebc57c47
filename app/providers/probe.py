"""The health probe run by celery beat: ping every enabled provider, record what it saw.

Each probe result (live, latency, when) is kept in Redis for ``GET /v1/providers``; a failed
ping counts toward the provider's circuit breaker and its success rate, and a successful ping
of a half-open provider closes its breaker (the provider is back).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from typing import Any

import redis
from sqlalchemy import select
from sqlalchemy.orm import Session

from app.models import Provider
from app.providers import health, history
from app.providers.breaker import Breaker
from app.providers.openai_compat import ProviderFailure, ping, resolve_api_key

_KEY = "flopex:probe:{}"


@dataclass(frozen=True)
class ProbeResult:
    provider: str
    live: bool
    latency_ms: int | None
    error: str | None
    checked_at: float


def probe_all(
    session: Session,
    client: redis.Redis,
    breaker: Breaker,
    *,
    timeout_s: float,
    health_window_s: int,
    now: float | None = None,
) -> list[ProbeResult]:
    providers = session.execute(
        select(Provider.name, Provider.base_url, Provider.api_key_env).where(Provider.enabled)
    ).all()
    session.rollback()  # no transaction held while pinging
    results = []
    for name, base_url, api_key_env in providers:
        checked = now or time.time()
        try:
            latency = ping(base_url, resolve_api_key(api_key_env), timeout_s)
            result = ProbeResult(name, True, latency, None, checked)
            if breaker.state(name, checked) == "half_open":
                breaker.record_success(name)
        except ProviderFailure as exc:
            result = ProbeResult(name, False, None, exc.kind, checked)
            breaker.record_failure(name, checked)
        health.record_outcome(client, name, result.live, health_window_s)
        client.set(_KEY.format(name), json.dumps(asdict(result)), ex=max(60, health_window_s))
        history.record(client, name, checked, result.live, result.latency_ms)
        results.append(result)
    return results


def last_probe(client: redis.Redis, provider: str) -> dict[str, Any] | None:
    raw = client.get(_KEY.format(provider))
    return json.loads(raw) if raw else None
