"""A fault of our infrastructure at each step of the submit command (app/jobs/command.py) is a
503 service_unavailable with Retry-After, naming the job whenever its row exists, so a client
is never charged behind an answer without a job id. Faults are injected where the command calls
PostgreSQL or Redis, raising what the drivers raise."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
import redis
from sqlalchemy import exc as sa_exc
from sqlalchemy import func, select

from app.db import session_scope
from app.jobs import command
from app.models import Job, LedgerEntry
from tests.conftest import ledger_kinds

BODY = {"model": "llama-3.1-8b", "input": "faults", "max_output_tokens": 8}


def _pg_down(*_args: Any, **_kwargs: Any) -> Any:
    raise sa_exc.OperationalError(
        "SELECT 1", {}, Exception("server closed the connection unexpectedly")
    )


def _redis_down(*_args: Any, **_kwargs: Any) -> Any:
    raise redis.ConnectionError("Error 111 connecting to 127.0.0.1:6379. Connection refused.")


def _jobs(account: Any) -> list[Job]:
    with session_scope() as session:
        rows = list(session.scalars(select(Job).where(Job.account_id == account.account_id)))
        session.expunge_all()
        return rows


def _unavailable(resp: Any, job_named: bool) -> str | None:
    assert resp.status_code == 503, resp.text
    error = resp.get_json()["error"]
    assert error["code"] == "service_unavailable" and error["type"] == "api_error"
    assert int(resp.headers["Retry-After"]) >= 1
    if not job_named:
        assert "job_id" not in error and "X-Flopex-Job-Id" not in resp.headers
        return None
    assert resp.headers["X-Flopex-Job-Id"] == error["job_id"]
    # Without an Idempotency-Key, a resubmission could run a second job: clients are told so.
    keyed = "Idempotency-Key" in resp.request.headers
    assert resp.headers.get("X-Should-Retry") == (None if keyed else "false")
    return str(error["job_id"])


def _cancel(client: Any, account: Any, job_id: str | None) -> None:
    """A job left queued by a fault would be quoted by the next test's sweeper: cancelled
    (which also shows it is an ordinary job of the account's, its hold released)."""
    resp = client.post(f"/v1/inference/{job_id}/cancel", headers=account.headers)
    assert resp.status_code == 200 and resp.get_json()["status"] == "cancelled"
    assert ledger_kinds(account)[-1] == "release"


def _post(client: Any, account: Any, **headers: str) -> Any:
    return client.post("/v1/inference", json=BODY, headers={**account.headers, **headers})


def test_the_claim_failing_is_a_503_and_nothing_exists(client, pipeline, make_account, monkeypatch):
    account = make_account()
    monkeypatch.setattr(command.idempotency, "claim", _pg_down)
    _unavailable(_post(client, account, **{"Idempotency-Key": "k-claim"}), job_named=False)
    assert _jobs(account) == [] and ledger_kinds(account) == ["topup"]


def test_the_hold_failing_before_writing_is_a_503_without_a_job(
    client, pipeline, make_account, monkeypatch
):
    from app.jobs import submit

    account = make_account()
    monkeypatch.setattr(submit.wallet, "hold_largest", _pg_down)
    _unavailable(_post(client, account), job_named=False)
    assert _jobs(account) == [] and ledger_kinds(account) == ["topup"]


def test_a_hold_that_committed_before_its_connection_died_names_its_job(
    client, pipeline, make_account, monkeypatch
):
    from app.jobs import submit

    account = make_account()
    real = submit.wallet.hold_largest

    def committed_then_lost(session: Any, *args: Any, **kwargs: Any) -> Any:
        real(session, *args, **kwargs)
        session.commit()  # the job row and its hold reached the database...
        _pg_down()  # ...and then the connection died before its answer came back

    monkeypatch.setattr(submit.wallet, "hold_largest", committed_then_lost)
    job_id = _unavailable(_post(client, account), job_named=True)
    assert [str(j.id) for j in _jobs(account)] == [job_id]
    assert ledger_kinds(account) == ["topup", "hold"]
    _cancel(client, account, job_id)


def test_a_transaction_lost_before_its_commit_names_no_job(
    client, pipeline, make_account, monkeypatch
):
    """With a key, the claim, the job and the hold commit together: a fault before the commit
    leaves nothing, so no job is named and a retry with the key runs normally."""
    account = make_account()
    monkeypatch.setattr(command.idempotency, "attach_job", _pg_down)
    _unavailable(_post(client, account, **{"Idempotency-Key": "k-commit"}), job_named=False)
    assert _jobs(account) == [] and ledger_kinds(account) == ["topup"]
    monkeypatch.undo()
    retried = _post(client, account, **{"Idempotency-Key": "k-commit"})
    assert retried.status_code == 200 and retried.get_json()["status"] == "success"


@pytest.mark.parametrize("fault", [_redis_down, _pg_down], ids=["redis", "postgres"])
def test_the_dispatch_failing_names_the_job(client, pipeline, make_account, monkeypatch, fault):
    account = make_account()
    monkeypatch.setattr(command, "dispatch", fault)
    job_id = _unavailable(_post(client, account), job_named=True)
    (job,) = _jobs(account)
    assert str(job.id) == job_id and job.status == "quoting"  # the sweeper would quote it
    _cancel(client, account, job_id)


def test_the_wait_for_the_completion_signal_failing_names_the_job_that_is_charged(
    client, pipeline, make_account, monkeypatch
):
    """The issue's case: Redis went away while the request waited; the job ran and was charged
    behind a 500 without its id. Now the client can find it and is charged once."""
    account = make_account()
    monkeypatch.setattr(command, "wait_done", _redis_down)
    job_id = _unavailable(_post(client, account), job_named=True)
    monkeypatch.undo()
    done = client.get(f"/v1/inference/{job_id}?wait=30", headers=account.headers)
    assert done.status_code == 200 and done.get_json()["status"] == "success"
    assert ledger_kinds(account).count("capture") == 1


def test_the_durability_barrier_failing_names_the_job(client, pipeline, make_account, monkeypatch):
    account = make_account()
    for provider in pipeline.values():
        provider.configure(latency_ms=1000)  # still running when the wait of 0 s ends
    monkeypatch.setattr(command, "make_durable", _pg_down)
    job_id = _unavailable(_post(client, account, Prefer="wait=0"), job_named=True)
    assert [str(j.id) for j in _jobs(account)] == [job_id]
    done = client.get(f"/v1/inference/{job_id}?wait=30", headers=account.headers)
    assert done.get_json()["status"] == "success"


def test_reading_the_outcome_failing_names_the_job(client, pipeline, make_account, monkeypatch):
    account = make_account()
    monkeypatch.setattr(command, "autocommit", _pg_down)
    job_id = _unavailable(_post(client, account), job_named=True)
    assert uuid.UUID(job_id) in {j.id for j in _jobs(account)}
    done = client.get(f"/v1/inference/{job_id}?wait=30", headers=account.headers)
    assert done.get_json()["status"] == "success"


def test_an_idempotent_retry_after_a_503_gets_the_first_jobs_outcome(
    client, pipeline, make_account, monkeypatch
):
    account = make_account()
    key = {"Idempotency-Key": "k-after-503"}
    monkeypatch.setattr(command, "wait_done", _redis_down)
    job_id = _unavailable(_post(client, account, **key), job_named=True)
    monkeypatch.undo()
    retried = _post(client, account, **key)
    assert retried.status_code == 200 and retried.get_json()["id"] == job_id
    with session_scope() as session:
        captures = session.scalar(
            select(func.count())
            .select_from(LedgerEntry)
            .where(LedgerEntry.wallet_id == account.wallet_id, LedgerEntry.kind == "capture")
        )
    assert captures == 1


def test_a_connection_terminated_inside_the_submission_keeps_nothing(
    client, pipeline, make_account, monkeypatch
):
    """A real fault, not a raised one: PostgreSQL terminates the request's backend after the
    claim and the job were written, before their commit. psycopg2 raises, the transaction is
    gone with the connection: a 503 that names no job, nothing held, and the key is free."""
    from app.db import get_engine

    account = make_account()
    real = command.idempotency.attach_job

    def terminated_then_attach(session: Any, record_id: int, job_id: uuid.UUID) -> None:
        pid = session.connection().exec_driver_sql("SELECT pg_backend_pid()").scalar()
        with get_engine().connect() as admin:
            admin.exec_driver_sql(f"SELECT pg_terminate_backend({int(pid)})")
            admin.commit()
        real(session, record_id, job_id)

    monkeypatch.setattr(command.idempotency, "attach_job", terminated_then_attach)
    key = {"Idempotency-Key": "k-terminated"}
    _unavailable(_post(client, account, **key), job_named=False)
    assert _jobs(account) == [] and ledger_kinds(account) == ["topup"]
    monkeypatch.undo()
    retried = _post(client, account, **key)
    assert retried.status_code == 200 and retried.get_json()["status"] == "success"
