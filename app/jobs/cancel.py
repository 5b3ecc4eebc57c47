"""Cancelling a job that has not started executing."""

from __future__ import annotations

from sqlalchemy.orm import Session

from app.exceptions import FlopexError
from app.jobs import states
from app.jobs.execution import close_unserved
from app.models import Job


def cancel(session: Session, job: Job) -> Job:
    """Releases the hold and marks the job cancelled, in one transaction. The version bump
    fences off a router that already claimed the job: it stops before calling any provider."""
    if job.status in states.FINAL:
        raise FlopexError(
            "job_not_cancellable", f"The job already finished ({states.PUBLIC[job.status]})."
        )
    if job.status not in states.CANCELLABLE:
        raise FlopexError(
            "job_not_cancellable", "The job is already running and can no longer be cancelled."
        )
    close_unserved(session, job, states.CANCELLED)
    return job
