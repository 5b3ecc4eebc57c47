"""Thin Celery tasks for the inference pipeline: explicit stable names (app/task_names.py),
primitive arguments, all logic in app.jobs."""

from __future__ import annotations

import logging
import uuid
from typing import Any

import redis
from celery import Task, shared_task
from sqlalchemy.orm.exc import StaleDataError

from app import task_names
from app.db import session_factory
from app.jobs import liveness
from app.jobs.execution import Outcome, RouteAndExecute
from app.jobs.recovery import RESUME_VERSION_HEADER
from app.redis_client import get_redis
from config.settings import get_settings

log = logging.getLogger(__name__)


def _run(task: Task[Any, Any], job_id: str, resume: bool, version: int | None = None) -> str | None:
    _hold(job_id)
    session = session_factory()()
    try:
        service = RouteAndExecute(session, get_redis(), get_settings(), task.app)
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


@shared_task(name=task_names.ROUTE, bind=True)
def route(self: Task[Any, Any], job_id: str) -> str | None:
    """The job's one hop: route from the quote board, execute, settle, signal. A redelivered
    or duplicate message finds the job already claimed and does nothing."""
    return _run(self, job_id, resume=False)


@shared_task(name=task_names.LEGACY_QUOTE, bind=True)
def legacy_quote(self: Task[Any, Any], job_id: str, *_: Any) -> str | None:
    """A quote message sent before the quote board (one per provider): the first one to run
    routes the job from the board, the others find it claimed."""
    return _run(self, job_id, resume=False)


@shared_task(name=task_names.RESUME, bind=True)
def resume(self: Task[Any, Any], job_id: str, *_: Any) -> str | None:
    """The job's version the sweeper saw comes in a message header (absent from older senders:
    then no check). Extra arguments of older messages are ignored."""
    version = getattr(self.request, RESUME_VERSION_HEADER, None)
    return _run(self, job_id, resume=True, version=version)
