"""Reads of an account's jobs, for the API's views: one job, and a page of the list."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import TypeVarTuple

from sqlalchemy import Select, select, tuple_
from sqlalchemy.orm import Session

from app.exceptions import FlopexError
from app.jobs import states
from app.models import Job

_Ts = TypeVarTuple("_Ts")


def own_job(session: Session, account_id: uuid.UUID, job_id: str, param: str = "job_id") -> Job:
    """The account's job; another account's job is indistinguishable from one that does not
    exist (both 404 job_not_found naming ``param``)."""
    try:
        parsed = uuid.UUID(job_id)
    except ValueError:
        parsed = None
    job = None
    if parsed is not None:
        job = session.scalar(select(Job).where(Job.id == parsed, Job.account_id == account_id))
    if job is None:
        raise FlopexError("job_not_found", f"No job {job_id}.", param)
    return job


@dataclass(frozen=True)
class JobFilter:
    """The list's filters: an internal status set from its public name, a customer_ref, an open
    interval of creation times and a cursor (a job id of the caller's)."""

    status: str | None = None
    customer_ref: str | None = None
    model: str | None = None
    created_after: datetime | None = None
    created_before: datetime | None = None
    starting_after: uuid.UUID | None = None


@dataclass(frozen=True)
class JobPage:
    jobs: list[Job]
    has_more: bool

    @property
    def next_cursor(self) -> str | None:
        return str(self.jobs[-1].id) if self.has_more else None


def filter_jobs(stmt: Select[*_Ts], account_id: uuid.UUID, where: JobFilter) -> Select[*_Ts]:
    """The filters of ``where`` but its cursor, on a select of the account's jobs (the list's,
    and the console's CSV export)."""
    stmt = stmt.where(Job.account_id == account_id)
    if where.model is not None:
        stmt = stmt.where(Job.model == where.model)
    if where.status is not None:
        stmt = stmt.where(Job.status.in_(states.INTERNAL[where.status]))
    if where.customer_ref is not None:
        stmt = stmt.where(Job.customer_ref == where.customer_ref)
    if where.created_after is not None:
        stmt = stmt.where(Job.created_at > where.created_after)
    if where.created_before is not None:
        stmt = stmt.where(Job.created_at < where.created_before)
    return stmt


def list_jobs(session: Session, account_id: uuid.UUID, where: JobFilter, limit: int) -> JobPage:
    """The account's jobs, newest first (created_at, then id, so the order is total)."""
    stmt = filter_jobs(select(Job), account_id, where)
    if where.starting_after is not None:
        cursor = own_job(session, account_id, str(where.starting_after), "starting_after")
        stmt = stmt.where(tuple_(Job.created_at, Job.id) < tuple_(cursor.created_at, cursor.id))
    rows = list(
        session.scalars(stmt.order_by(Job.created_at.desc(), Job.id.desc()).limit(limit + 1))
    )
    return JobPage(rows[:limit], len(rows) > limit)
