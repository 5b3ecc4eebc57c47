"""Periodic tasks run by celery beat (schedule in app/celery_app.py)."""

from __future__ import annotations

from celery import current_app, shared_task

from app import idempotency
from app.db import session_scope
from app.jobs.recovery import sweep
from app.redis_client import get_redis
from config.settings import get_settings


@shared_task(name="flopex.sweep")
def sweep_stuck_jobs() -> dict[str, list[str]]:
    with session_scope() as session:
        report = sweep(session, current_app, get_redis(), get_settings())
    return {"requoted": report.requoted, "resumed": report.resumed}


@shared_task(name="flopex.purge_idempotency")
def purge_idempotency_keys() -> int:
    with session_scope() as session:
        return idempotency.purge_expired(session)
