"""The jobs table's fenced UPDATE, as a Core statement: the one piece of the job row that both
app/jobs/rows.py (every write of a job) and app/wallet.py (a settlement's final write of the job,
in the same statement as the money) build on. Here, below both, so that the ledger never
imports the job package.

Every value is a named parameter (``p_job_<column key>``, ``p_job_id``, ``p_job_version``), so
that SQLAlchemy compiles each shape of statement once per process.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from typing import Any

from sqlalchemy import Update, bindparam, update

from app.models import Job

_JOBS = Job.__table__


def param(name: str) -> Any:
    """The named parameter for ``name`` (a column key, or ``id`` / ``version``); prefixed,
    because a parameter named after a column is reserved in an UPDATE."""
    return bindparam(f"p_job_{name}", type_=_JOBS.c[name].type)


def params(
    job_id: uuid.UUID, version: int | None, column_values: Mapping[str, Any]
) -> dict[str, Any]:
    """The parameters of a fenced_update (column keys -> their named parameters)."""
    bound = {f"p_job_{k}": v for k, v in column_values.items()}
    bound["p_job_id"] = job_id
    if version is not None:
        bound["p_job_version"] = version
    return bound


def fenced_update(job_columns: tuple[str, ...], **expressions: Any) -> Update:
    """UPDATE of the job ``p_job_id`` if its version is still ``p_job_version``, bumping it:
    each of ``job_columns`` set from its named parameter, each of ``expressions`` (column key ->
    SQL expression) as given."""
    j = _JOBS.c
    return (
        update(_JOBS)
        .where(j.id == param("id"), j.version == param("version"))
        .values({**{k: param(k) for k in job_columns}, **expressions, "version": j.version + 1})
    )
