"""Fenced writes of a job row, as Core statements.

Every write of a job checks the version it read and bumps it, in the same UPDATE: a worker that
lost its claim (the sweeper took the job, the customer cancelled it) writes nothing and gets
``StaleDataError``, as the ORM's ``version_id_col`` would raise. Core rather than the ORM's unit
of work because these writes are on every request's path (and one of them inside the wallet's
transaction): the ORM's flush cost more CPU than the rest of the route step together.
"""

from __future__ import annotations

import functools
from typing import Any, cast

from sqlalchemy import Update
from sqlalchemy.engine import CursorResult
from sqlalchemy.orm import Session
from sqlalchemy.orm.attributes import set_committed_value
from sqlalchemy.orm.exc import StaleDataError

from app.db import Commit, begin, without_flush_wait
from app.fencing import fenced_update, params
from app.models import Job, utcnow

_JOBS = Job.__table__
# Attribute name -> column key; the two differ only where a column name is reserved.
_COLUMN_OF = {attr.key: attr.columns[0].key for attr in Job.__mapper__.column_attrs}

# The statements are built once per set of columns (app/fencing.py), so that SQLAlchemy compiles
# each once per process.


@functools.lru_cache(maxsize=64)
def _write_statement(job_columns: tuple[str, ...], no_flush: bool) -> Update:
    stmt = fenced_update(job_columns)
    return without_flush_wait(stmt) if no_flush else stmt


def columns(values: dict[str, Any]) -> dict[str, Any]:
    """Attribute names -> column keys, for a Core statement."""
    return {_COLUMN_OF[k]: v for k, v in values.items()}


def mirror(job: Job, values: dict[str, Any]) -> None:
    """After a fenced write of ``values`` succeeded: the object shows the row as written (its
    version bumped), with nothing left for the ORM to flush."""
    for key, value in values.items():
        set_committed_value(job, key, value)
    set_committed_value(job, "version", job.version + 1)


def write(session: Session, job: Job, *, commit: Commit = Commit.JOINED, **values: Any) -> None:
    """UPDATE the job's row with ``values`` (attribute names) if its version is still the one
    ``job`` holds; the object then mirrors the row. ``commit``: how it commits (app/db.py);
    a deferred one owes a ``make_durable`` before anything outside the database acts on it."""
    no_flush = begin(session, commit)
    values.setdefault("updated_at", utcnow())
    version = job.version
    column_values = columns(values)
    result = cast(
        CursorResult[Any],
        session.execute(
            _write_statement(tuple(sorted(column_values)), no_flush),
            params(job.id, version, column_values),
        ),
    )
    if result.rowcount != 1:
        raise StaleDataError(f"job {job.id}: version {version} is no longer current")
    mirror(job, values)
