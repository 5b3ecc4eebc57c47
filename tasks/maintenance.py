"""Periodic tasks run by celery beat (schedule in app/celery_app.py)."""

from __future__ import annotations

from typing import Any

from celery import Task, shared_task

from app import idempotency, task_names
from app.db import session_scope
from app.jobs.recovery import sweep
from app.providers import board
from app.providers.breaker import Breaker
from app.providers.probe import enabled_targets
from app.redis_client import get_redis
from config.settings import get_settings


@shared_task(name=task_names.SWEEP, bind=True)
def sweep_stuck_jobs(self: Task[Any, Any]) -> dict[str, list[str]]:
    with session_scope() as session:
        report = sweep(session, self.app, get_redis(), get_settings())
    return {"requoted": report.requoted, "resumed": report.resumed, "webhooks": report.webhooks}


@shared_task(name=task_names.PURGE_IDEMPOTENCY)
def purge_idempotency_keys() -> int:
    with session_scope() as session:
        return idempotency.purge_expired(session)


@shared_task(name=task_names.REFRESH_BOARD, bind=True)
def refresh_board(self: Task[Any, Any]) -> int:
    """Beat's clock for the quote board: one check task per enabled provider, on `fast`, each
    expiring with the next refresh (a backlog of checks is worth nothing)."""
    settings = get_settings()
    with session_scope() as session:
        targets = enabled_targets(session)
    with self.app.producer_or_acquire() as producer:
        for target in targets:
            self.app.send_task(
                task_names.CHECK_PROVIDER,
                args=[target.provider, target.base_url, target.api_key_env],
                queue="fast",
                expires=settings.quote_refresh_s,
                declare=[],
                producer=producer,
            )
    return len(targets)


@shared_task(name=task_names.LEGACY_PROBE, bind=True)
def probe_providers(self: Task[Any, Any]) -> int:
    """The health probe's schedule of older deployments: the board refresh."""
    return int(refresh_board())


@shared_task(name=task_names.CHECK_PROVIDER)
def check_provider(provider: str, base_url: str, api_key_env: str | None) -> bool | None:
    """One board check, unless a check of the provider is already in flight (then nothing)."""
    settings = get_settings()
    client = get_redis()
    entry = board.check_once(
        client,
        Breaker.from_settings(client, settings),
        board.Target(provider, base_url, api_key_env),
        # The longest profile's ping timeout, within one refresh period.
        timeout_s=min(
            max(p.quote_deadline_ms for p in settings.profiles.values()) / 1000,
            max(settings.quote_refresh_s, 0.2),
        ),
    )
    return None if entry is None else entry.live
