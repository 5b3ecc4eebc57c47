"""Settlement: how a job ends with its money. Capture what the provider's answer cost, release
the rest of the hold, and write the job's final state, all in one fenced statement
(app/wallet.py's ``settle_hold`` with the job's ``FinalJobWrite``); or, for a job that ends
without an answer (failed, cancelled), release the whole hold the same way."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy.orm import Session

from app import wallet
from app.db import Commit
from app.jobs import rows, states
from app.models import Job, utcnow


def finish_values(job: Job, status: str, now: datetime | None = None) -> dict[str, Any]:
    """The columns every finished job gets: its status, when it finished, its latency."""
    now = now or utcnow()
    created = job.created_at if job.created_at.tzinfo else job.created_at.replace(tzinfo=UTC)
    return {
        "status": status,
        "finished_at": now,
        "updated_at": now,
        "latency_ms": int((now - created).total_seconds() * 1000),
    }


def settle_job(
    session: Session,
    job: Job,
    charge_micros: int,
    values: dict[str, Any],
    commit: Commit = Commit.JOINED,
) -> None:
    """Capture ``charge_micros`` of the job's hold, release the rest, and write ``values`` to the
    job with its ``balance_after_micros``: one fenced write, one statement on PostgreSQL
    (``commit``: see ``wallet.settle_hold``). The object then mirrors the row."""
    state = wallet.settle_hold(
        session,
        job.wallet_id,
        job.id,
        job.hold_micros,
        charge_micros,
        finish=wallet.FinalJobWrite(job.version, rows.columns(values)),
        commit=commit,
    )
    rows.mirror(job, {**values, "balance_after_micros": state.balance_micros})


def close_unserved(session: Session, job: Job, status: str, **pending: Any) -> None:
    """The job ends without a provider's answer: release the whole hold, charge nothing, in
    one fenced write of the job (caller commits, and counts the job in
    ``flopex_jobs_finished_total``: RouteAndExecute after its commit, cancel() on commit)."""
    now = utcnow()
    values = {"settled_at": now, **pending, **finish_values(job, status, now)}
    if job.hold_micros:
        settle_job(session, job, 0, values)
    else:
        rows.write(session, job, **values)


def close_failed(
    session: Session, job: Job, code: str, message: str, param: str | None = None, **pending: Any
) -> None:
    close_unserved(
        session,
        job,
        states.FAILED,
        error_code=code,
        error_message=message,
        error_param=param,
        **pending,
    )
