"""Thin Celery tasks for the inference pipeline: explicit stable names, primitive arguments,
all logic in app.jobs."""

from __future__ import annotations

import logging
import uuid
from typing import Any

import redis
from celery import shared_task
from sqlalchemy.orm.exc import StaleDataError

from app.db import session_factory
from app.jobs import liveness
from app.jobs.execution import Outcome, RouteAndExecute
from app.jobs.quoting import make_quote, store_quote
from app.jobs.recovery import RESUME_VERSION_HEADER
from app.providers.breaker import Breaker
from app.redis_client import get_redis
from config.settings import get_settings

log = logging.getLogger(__name__)


@shared_task(name="flopex.quote")
def quote(job_id: str, option: dict[str, Any], deadline_at: float, expected: int) -> None:
    client = get_redis()
    q = make_quote(option, deadline_at, Breaker(client, get_settings().breaker))
    if store_quote(client, job_id, q) >= expected:
        # The last quote in closes the join and routes the job right here: one queue hop less on
        # every request. A redelivered or duplicate quote finds the job already claimed.
        _run(job_id, resume=False)


def _run(job_id: str, resume: bool, version: int | None = None) -> str | None:
    _hold(job_id)
    session = session_factory()()
    try:
        service = RouteAndExecute(session, get_redis(), get_settings())
        outcome: Outcome | None = (
            service.resume(uuid.UUID(job_id), version) if resume else service.run(uuid.UUID(job_id))
        )
        return None if outcome is None else outcome.status
    except StaleDataError:
        # The sweeper or a cancellation took the job from us: stop without writing.
        session.rollback()
        log.warning("job %s: claim lost, stopping", job_id)
        return None
    finally:
        session.close()


def _hold(job_id: str) -> None:
    # This process holds the job from here: if it dies, the sweeper sees its heartbeat stop
    # and resumes the job at once (app/jobs/liveness.py). Only a speed-up: a Redis fault here
    # leaves the job to the sweeper's age thresholds.
    try:
        liveness.hold(get_redis(), job_id)
    except redis.RedisError as exc:
        log.warning("job %s: holder not recorded: %s", job_id, exc)


@shared_task(name="flopex.route")
def route(job_id: str) -> str | None:
    return _run(job_id, resume=False)


@shared_task(name="flopex.resume", bind=True)
def resume(self, job_id: str, version: int | None = None) -> str | None:  # type: ignore[no-untyped-def]
    """The job's version the sweeper saw comes in a message header (absent from older senders:
    then no check)."""
    if version is None:
        version = getattr(self.request, RESUME_VERSION_HEADER, None)
    return _run(job_id, resume=True, version=version)
