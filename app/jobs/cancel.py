"""Cancelling a job that has not started executing."""

from __future__ import annotations

import logging
from typing import Any

import redis
from sqlalchemy.orm import Session
from sqlalchemy.orm.exc import StaleDataError

from app.exceptions import FlopexError
from app.jobs import states
from app.jobs.settlement import close_unserved
from app.metrics import job_finished_on_commit
from app.models import Job

log = logging.getLogger(__name__)

# A job that is still cancellable moves only a few times (its quotes re-sent by the sweeper):
# a few fresh reads settle the race; more would mean something keeps rewriting it.
_ATTEMPTS = 3


def cancel(session: Session, job: Job) -> Job:
    """Releases the hold and marks the job cancelled, in one transaction. The version bump
    fences off a router that already claimed the job: it stops before calling any provider.
    A job that moved between the caller's read and this write (the router claimed it, the
    sweeper re-quoted it) is read again and judged on its new state. The caller commits; the
    commit counts the job in ``flopex_jobs_finished_total`` (status ``cancelled``)."""
    for attempt in range(_ATTEMPTS):
        _check_cancellable(job)
        try:
            close_unserved(session, job, states.CANCELLED)
            # Counted when the caller commits the cancellation, not if it rolls it back.
            job_finished_on_commit(session, job.status, job.error_code)
            return job
        except StaleDataError:
            session.rollback()  # expires the job: its next read is fresh
            if attempt == _ATTEMPTS - 1:
                raise FlopexError(
                    "job_not_cancellable", "The job is changing state; retry the cancellation."
                ) from None
    raise AssertionError("unreachable")


def _check_cancellable(job: Job) -> None:
    if job.status in states.FINAL:
        raise FlopexError(
            "job_not_cancellable", f"The job already finished ({states.PUBLIC[job.status]})."
        )
    if job.status not in states.CANCELLABLE:
        raise FlopexError(
            "job_not_cancellable", "The job is already running and can no longer be cancelled."
        )


def announce_cancelled(job: Job, client: redis.Redis, celery: Any) -> None:
    """After the cancellation has committed: wake whoever waits on the job (a synchronous
    request, a long poll) and queue its webhook. A webhook that cannot be queued now is posted
    later by the outbox sweeper: the cancellation stands either way."""
    from app import webhooks
    from app.broker import PUBLISH_ERRORS
    from app.jobs.events import queue_append
    from app.jobs.notify import signal_done
    from app.jobs.render import terminal_event
    from config.settings import get_settings

    # Readers attached to its events learn it at once (app/jobs/events.py).
    pipe = client.pipeline(transaction=False)
    name, data = terminal_event(job)
    queue_append(pipe, job.id, name, data, get_settings(), ttl_s=60)
    pipe.execute()
    signal_done(client, job.id)
    try:
        webhooks.send(celery, job)
    except PUBLISH_ERRORS:
        log.exception("queueing the webhook of cancelled job %s failed", job.id)
