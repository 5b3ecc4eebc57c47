"""Enqueueing, only ever after the job's row is committed: one task per job (the one hop)."""

from __future__ import annotations

from typing import Any

from celery import Celery

from app.jobs.submit import Accepted
from app.logs import task_headers
from app.task_names import ROUTE
from config.settings import Settings


def send_route(celery: Celery, job: Any, queue: str) -> None:
    """The job's one task, to its profile's queue: the worker routes it from the quote board,
    executes, settles and signals. A lost message (the broker failed after accepting it, its
    worker crashed before acknowledging) is covered by the sweeper (app/jobs/recovery.py), not
    by a timer per job.

    ``argsrepr`` is given so that Celery does not build a ``saferepr`` of the arguments for every
    message; it is what monitoring tools show for the task. ``declare=[]``: the message goes to
    the queue's list through the default exchange, which needs no declaration (workers declare
    their queues when they start); kombu would otherwise re-check its declaration cache for
    every message."""
    job_id = str(job.id)
    celery.send_task(
        ROUTE,
        args=[job_id],
        argsrepr=f"[{job_id!r}]",
        kwargsrepr="{}",
        declare=[],
        queue=queue,
        headers=task_headers(job_id, getattr(job, "request_id", None)),
    )


def dispatch_quotes(celery: Celery, accepted: Accepted, settings: Settings) -> None:
    """Publish the accepted job's one task (the name is kept for the callers: the job is quoted
    from the board by the worker that routes it)."""
    send_route(celery, accepted.job, settings.profiles[accepted.job.performance_profile].queue)
