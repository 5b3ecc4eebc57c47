"""Fenced writes of a job row, as Core statements.

Every write of a job checks the version it read and bumps it, in the same UPDATE: a worker that
lost its claim (the sweeper took the job, the customer cancelled it) writes nothing and gets
``StaleDataError``, as the ORM's ``version_id_col`` would raise. Core rather than the ORM's unit
of work because these writes are on every request's path (and one of them inside the wallet's
transaction): the ORM's flush cost more CPU than the rest of the route step together.
"""

from __future__ import annotations

import uuid
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session
from sqlalchemy.orm.attributes import set_committed_value
from sqlalchemy.orm.exc import StaleDataError

from app.models import Job, utcnow

_JOBS = Job.__table__
# Attribute name -> column key; the two differ only where a column name is reserved.
_COLUMN_OF = {attr.key: attr.columns[0].key for attr in Job.__mapper__.column_attrs}


def columns(values: dict[str, Any]) -> dict[str, Any]:
    """Attribute names -> column keys, for a Core statement."""
    return {_COLUMN_OF[k]: v for k, v in values.items()}


def mirror(job: Job, values: dict[str, Any]) -> None:
    """After a fenced write of ``values`` succeeded: the object shows the row as written (its
    version bumped), with nothing left for the ORM to flush."""
    for key, value in values.items():
        set_committed_value(job, key, value)
    set_committed_value(job, "version", job.version + 1)


def write(session: Session, job: Job, **values: Any) -> None:
    """UPDATE the job's row with ``values`` (attribute names) if its version is still the one
    ``job`` holds; the object then mirrors the row."""
    values.setdefault("updated_at", utcnow())
    version = job.version
    result = session.execute(
        update(_JOBS)
        .where(_JOBS.c.id == job.id, _JOBS.c.version == version)
        .values({**columns(values), "version": version + 1})
    )
    if result.rowcount != 1:
        raise StaleDataError(f"job {job.id}: version {version} is no longer current")
    mirror(job, values)


def claim(session: Session, job_id: uuid.UUID, from_status: str, **values: Any) -> Job | None:
    """Move a job out of ``from_status`` with one conditional UPDATE and return it (None when
    another task got there first). Only one claimant's UPDATE matches, under any concurrency."""
    stmt = (
        update(_JOBS)
        .where(_JOBS.c.id == job_id, _JOBS.c.status == from_status)
        .values({**columns(values), "version": _JOBS.c.version + 1})
        .returning(*_JOBS.c)
    )
    return session.scalars(
        select(Job).from_statement(stmt).execution_options(populate_existing=True)
    ).one_or_none()
