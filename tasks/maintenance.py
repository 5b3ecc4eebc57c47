"""Periodic tasks run by celery beat (schedule in app/celery_app.py)."""

from __future__ import annotations

from celery import current_app, shared_task

from app import idempotency
from app.db import session_scope
from app.jobs.recovery import sweep
from app.providers.breaker import Breaker
from app.providers.probe import probe_all
from app.redis_client import get_redis
from config.settings import get_settings


@shared_task(name="flopex.sweep")
def sweep_stuck_jobs() -> dict[str, list[str]]:
    with session_scope() as session:
        report = sweep(session, current_app, get_redis(), get_settings())
    return {"requoted": report.requoted, "resumed": report.resumed, "webhooks": report.webhooks}


@shared_task(name="flopex.purge_idempotency")
def purge_idempotency_keys() -> int:
    with session_scope() as session:
        return idempotency.purge_expired(session)


@shared_task(name="flopex.probe_providers")
def probe_providers() -> dict[str, bool]:
    settings = get_settings()
    client = get_redis()
    with session_scope() as session:
        results = probe_all(
            session,
            client,
            Breaker(client, settings.breaker),
            timeout_s=min(2.0, settings.probe_interval_s),
            health_window_s=settings.health_window_s,
        )
    return {r.provider: r.live for r in results}
