"""Thin Celery tasks for the inference pipeline: explicit stable names, primitive arguments,
all logic in app.jobs."""

from __future__ import annotations

import uuid
from typing import Any

from celery import current_app, shared_task

from app.db import session_factory
from app.jobs.execution import RouteAndExecute
from app.jobs.quoting import make_quote, store_quote
from app.redis_client import get_redis
from config.settings import get_settings


@shared_task(name="flopex.quote")
def quote(
    job_id: str, option: dict[str, Any], deadline_at: float, expected: int, queue: str
) -> None:
    settings = get_settings()
    client = get_redis()
    q = make_quote(client, option, deadline_at, settings.health_window_s)
    if store_quote(client, job_id, q) >= expected:
        # The last quote in closes the join; a late duplicate finds the job already routed.
        current_app.send_task(
            "flopex.route",
            args=[job_id],
            queue=queue,
        )


@shared_task(name="flopex.route")
def route(job_id: str) -> str | None:
    session = session_factory()()
    try:
        outcome = RouteAndExecute(session, get_redis(), get_settings()).run(uuid.UUID(job_id))
        return None if outcome is None else outcome.status
    finally:
        session.close()
