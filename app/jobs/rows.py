"""Fenced writes of a job row, as Core statements.

Every write of a job checks the version it read and bumps it, in the same UPDATE: a worker that
lost its claim (the sweeper took the job, the customer cancelled it) writes nothing and gets
``StaleDataError``, as the ORM's ``version_id_col`` would raise. Core rather than the ORM's unit
of work because these writes are on every request's path (and one of them inside the wallet's
transaction): the ORM's flush cost more CPU than the rest of the route step together.
"""

from __future__ import annotations

import functools
import uuid
from typing import Any, cast

from sqlalchemy import Update, bindparam, select, update
from sqlalchemy.engine import CursorResult
from sqlalchemy.orm import Session
from sqlalchemy.orm.attributes import set_committed_value
from sqlalchemy.orm.exc import StaleDataError

from app.db import without_flush_wait
from app.models import Job, utcnow

_JOBS = Job.__table__
# Attribute name -> column key; the two differ only where a column name is reserved.
_COLUMN_OF = {attr.key: attr.columns[0].key for attr in Job.__mapper__.column_attrs}

# The statements are built once per set of columns, every value a named parameter (``p_job_<column
# key>``, ``p_job_id``, ``p_job_version``), so that SQLAlchemy compiles each once per process:
# building one per call (constructs, coercions, cache key) cost more CPU than executing it.


def param(name: str) -> Any:
    """The named parameter for ``name`` (a column key, or ``id`` / ``version``); prefixed,
    because a parameter named after a column is reserved in an UPDATE."""
    return bindparam(f"p_job_{name}", type_=_JOBS.c[name].type)


def params(job_id: uuid.UUID, version: int | None, column_values: dict[str, Any]) -> dict[str, Any]:
    """The parameters of a fenced_update (column keys -> their named parameters)."""
    bound = {f"p_job_{k}": v for k, v in column_values.items()}
    bound["p_job_id"] = job_id
    if version is not None:
        bound["p_job_version"] = version
    return bound


def fenced_update(job_columns: tuple[str, ...], **expressions: Any) -> Update:
    """UPDATE of the job ``p_job_id`` if its version is still ``p_job_version``, bumping it:
    each of ``job_columns`` set from its named parameter, each of ``expressions`` (column key ->
    SQL expression) as given. Shared with app/wallet.py, whose settlement ends with this write."""
    j = _JOBS.c
    return (
        update(_JOBS)
        .where(j.id == param("id"), j.version == param("version"))
        .values({**{k: param(k) for k in job_columns}, **expressions, "version": j.version + 1})
    )


@functools.lru_cache(maxsize=64)
def _write_statement(job_columns: tuple[str, ...], no_flush: bool) -> Update:
    stmt = fenced_update(job_columns)
    return without_flush_wait(stmt) if no_flush else stmt


@functools.lru_cache(maxsize=8)
def _claim_statement(job_columns: tuple[str, ...], no_flush: bool) -> Any:
    j = _JOBS.c
    stmt = (
        update(_JOBS)
        .where(j.id == param("id"), j.status == bindparam("p_from_status", type_=j.status.type))
        .values({**{k: param(k) for k in job_columns}, "version": j.version + 1})
    )
    if no_flush:
        stmt = without_flush_wait(stmt)
    stmt = stmt.returning(*_JOBS.c)
    return select(Job).from_statement(stmt).execution_options(populate_existing=True)


def columns(values: dict[str, Any]) -> dict[str, Any]:
    """Attribute names -> column keys, for a Core statement."""
    return {_COLUMN_OF[k]: v for k, v in values.items()}


def mirror(job: Job, values: dict[str, Any]) -> None:
    """After a fenced write of ``values`` succeeded: the object shows the row as written (its
    version bumped), with nothing left for the ORM to flush."""
    for key, value in values.items():
        set_committed_value(job, key, value)
    set_committed_value(job, "version", job.version + 1)


def write(session: Session, job: Job, *, no_flush: bool = False, **values: Any) -> None:
    """UPDATE the job's row with ``values`` (attribute names) if its version is still the one
    ``job`` holds; the object then mirrors the row.

    ``no_flush`` (PostgreSQL, a session in autocommit: the UPDATE is its own transaction): its
    commit does not wait for the WAL flush. The caller then owes a ``make_durable`` before
    anything outside the database acts on the write (app/db.py:defer_durability)."""
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


def claim(
    session: Session, job_id: uuid.UUID, from_status: str, *, no_flush: bool = False, **values: Any
) -> Job | None:
    """Move a job out of ``from_status`` with one conditional UPDATE and return it (None when
    another task got there first). Only one claimant's UPDATE matches, under any concurrency.
    ``no_flush`` as for :func:`write`."""
    column_values = columns(values)
    return session.scalars(
        _claim_statement(tuple(sorted(column_values)), no_flush),
        {**params(job_id, None, column_values), "p_from_status": from_status},
    ).one_or_none()
