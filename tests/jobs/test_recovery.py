"""Crash and redelivery safety on a real worker: SIGKILL at exact steps (failpoints), then the
sweeper recovers the job. Each test runs its own worker on a separate Redis database so the
session worker never touches its messages."""

from __future__ import annotations

import dataclasses
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import redis
from sqlalchemy import select

from app import accounts, wallet
from app.celery_app import make_celery
from app.db import session_scope
from app.jobs import events
from app.jobs.dispatch import dispatch_quotes
from app.jobs.notify import wait_done
from app.jobs.recovery import sweep
from app.jobs.submit import InferenceRequest, SubmitInference
from app.models import Job, LedgerEntry
from config.settings import get_settings
from tests.conftest import (
    TEST_REDIS_URL,
    _wait_for_worker,
    chat_calls,
    ledger_kinds,
    start_worker,
)

CRASH_REDIS_URL = TEST_REDIS_URL.rsplit("/", 1)[0] + "/14"

pytestmark = pytest.mark.usefixtures("no_stuck_jobs_from_other_tests")


@pytest.fixture
def crash_env(pipeline, tmp_path, monkeypatch):
    client = redis.Redis.from_url(CRASH_REDIS_URL, decode_responses=True)
    client.flushdb()
    settings = dataclasses.replace(
        get_settings(), redis_url=CRASH_REDIS_URL, broker_url=CRASH_REDIS_URL
    )
    celery = make_celery(settings)
    workers: list[Any] = []

    def worker(failpoints: str | None = None, extra: dict[str, str] | None = None) -> Any:
        env = {"REDIS_URL": CRASH_REDIS_URL, "CELERY_BROKER_URL": CRASH_REDIS_URL, **(extra or {})}
        if failpoints:
            env |= {"FLOPEX_FAILPOINTS": failpoints, "FLOPEX_FAILPOINT_DIR": str(tmp_path)}
        for k, v in env.items():
            monkeypatch.setenv(k, v)
        w = start_worker(tmp_path / f"worker-{len(workers)}.log", concurrency=2)
        for k in env:
            monkeypatch.delenv(k)
        workers.append(w)
        _wait_for_worker(celery, w.proc, w.log)
        return w

    yield {"client": client, "settings": settings, "celery": celery, "worker": worker}
    for w in workers:
        if w.proc.poll() is None:
            w.proc.terminate()
            w.proc.wait(timeout=15)
    client.flushdb()


def submit(account: Any, settings: Any, celery: Any, **overrides: Any) -> uuid.UUID:
    request = InferenceRequest(
        model="llama-3.1-8b",
        prompt="Crash me gently.",
        max_output_tokens=32,
        performance_profile="economy",
    )
    request = dataclasses.replace(request, **overrides)
    with session_scope() as session:
        principal = accounts.authenticate(session, account.api_key)
        accepted = SubmitInference(session, principal, request, settings).run()
    dispatch_quotes(celery, accepted, settings)
    return accepted.job.id


def load(job_id: uuid.UUID) -> Job:
    with session_scope() as session:
        return session.get(Job, job_id)


def assert_books_balance(account: Any) -> None:
    with session_scope() as session:
        state = wallet.get_state(session, account.wallet_id)
        assert state.held_micros == 0
        assert wallet.ledger_sums(session, account.wallet_id) == state


def crash_at(env: dict[str, Any], account: Any, failpoint: str) -> uuid.UUID:
    """Submits a job to a worker that is killed (SIGKILL) when it reaches ``failpoint``."""
    dying = env["worker"](failpoint)
    job_id = submit(account, env["settings"], env["celery"])
    assert dying.proc.wait(timeout=60) == -9
    return job_id


def recover(env: dict[str, Any], job_id: uuid.UUID) -> Job:
    with session_scope() as session:
        # As seen by a sweeper running well after the worker died.
        later = datetime.now(UTC) + timedelta(minutes=10)
        report = sweep(session, env["celery"], env["client"], env["settings"], grace_s=0, now=later)
    assert str(job_id) in report.resumed + report.requoted
    assert wait_done(env["client"], job_id, 30)
    return load(job_id)


def test_killed_after_the_answer_is_recorded_settles_once(crash_env, make_account, pipeline):
    account = make_account()
    job_id = crash_at(crash_env, account, "after_result_recorded")

    job = load(job_id)
    assert job.status == "settling" and job.charge_micros > 0
    assert ledger_kinds(account) == ["topup", "hold"]  # the hold is still open
    assert chat_calls(pipeline)["alpha"] == 1

    crash_env["worker"]()
    job = recover(crash_env, job_id)
    assert job.status == "success" and job.provider_name == "alpha"
    assert sum(chat_calls(pipeline).values()) == 1  # the provider was never asked again
    assert ledger_kinds(account) == ["topup", "hold", "capture", "release"]
    assert_books_balance(account)


def test_killed_before_the_provider_call_still_completes(crash_env, make_account, pipeline):
    account = make_account()
    job_id = crash_at(crash_env, account, "before_provider_call")
    job = load(job_id)
    assert job.status == "executing" and [a["provider"] for a in job.attempts] == ["alpha"]

    crash_env["worker"]()
    job = recover(crash_env, job_id)
    assert job.status == "success"
    # The interrupted attempt is never re-sent: the next provider serves.
    assert [a.get("failure") for a in job.attempts] == ["interrupted", None]
    assert job.provider_name == "charlie"
    assert chat_calls(pipeline) == {"alpha": 0, "bravo": 0, "charlie": 1}
    assert ledger_kinds(account).count("capture") == 1
    assert_books_balance(account)


def test_a_resume_that_waited_while_the_job_moved_on_does_nothing(
    crash_env, make_account, pipeline
):
    """Two resumes of one job (the sweeper sent another while the first sat in a busy queue)
    must never run providers side by side: each carries the version it was sent for."""
    from app.jobs.execution import RouteAndExecute

    account = make_account()
    job_id = crash_at(crash_env, account, "before_provider_call")
    sent_for = load(job_id).version
    # Meanwhile another resume took the job further (any write bumps the version).
    with session_scope() as session:
        job = session.get(Job, job_id)
        job.updated_at = datetime.now(UTC)
    assert load(job_id).version == sent_for + 1
    with session_scope() as session:
        stale = RouteAndExecute(
            session, crash_env["client"], crash_env["settings"], crash_env["celery"]
        )
        assert stale.resume(job_id, version=sent_for) is None
    job = load(job_id)
    assert job.status == "executing" and job.version == sent_for + 1
    assert sum(chat_calls(pipeline).values()) == 0  # no provider was called by the stale one
    with session_scope() as session:
        current = RouteAndExecute(
            session, crash_env["client"], crash_env["settings"], crash_env["celery"]
        )
        assert current.resume(job_id, version=sent_for + 1).status == "success"
    assert chat_calls(pipeline) == {"alpha": 0, "bravo": 0, "charlie": 1}
    assert_books_balance(account)


def test_killed_while_routing_is_sent_again_and_completes_once(crash_env, make_account, pipeline):
    account = make_account()
    job_id = crash_at(crash_env, account, "after_claim")
    job = load(job_id)
    # The router read the job and died: nothing was written (no claim of its own), no attempt,
    # no provider called; the job is still quoting and the sweeper sends it again.
    assert job.status == "quoting" and not job.attempts
    assert sum(chat_calls(pipeline).values()) == 0

    crash_env["worker"]()
    job = recover(crash_env, job_id)
    assert job.status == "success" and job.provider_name == "alpha"
    assert [a.get("outcome") for a in job.attempts] == ["success"]
    assert sum(chat_calls(pipeline).values()) == 1
    assert ledger_kinds(account) == ["topup", "hold", "capture", "release"]
    assert_books_balance(account)


def test_lost_messages_are_requoted_and_complete_once(crash_env, make_account, pipeline):
    """A job accepted while its messages were lost (broker flushed) is found and completed."""
    account = make_account()
    job_id = submit(account, crash_env["settings"], crash_env["celery"])
    crash_env["client"].flushdb()  # nothing consumed them: no worker is running yet
    crash_env["worker"]()
    job = recover(crash_env, job_id)
    assert job.status == "success"
    assert sum(chat_calls(pipeline).values()) == 1
    assert ledger_kinds(account).count("capture") == 1
    assert_books_balance(account)


def test_a_fenced_off_worker_cannot_settle(pipeline, make_account, redis_client):
    """A slow worker whose job was taken over by the sweeper loses its next write."""
    from sqlalchemy.orm.exc import StaleDataError

    from app.db import session_factory

    account = make_account()
    settings = get_settings()
    with session_scope() as session:
        principal = accounts.authenticate(session, account.api_key)
        request = InferenceRequest(model="qwen-7b", prompt="fence", max_output_tokens=8)
        job_id = SubmitInference(session, principal, request, settings).run().job.id
    session = session_factory()()
    job = session.get(Job, job_id)
    # The sweeper moves the job on meanwhile (any write bumps the version).
    with session_scope() as other:
        other.get(Job, job_id).updated_at = job.updated_at
        other.get(Job, job_id).status = "failed"
    job.status = "executing"
    with pytest.raises(StaleDataError):
        session.commit()
    session.rollback()
    session.close()
    assert load(job_id).status == "failed"


def test_sweeper_leaves_fresh_jobs_alone(pipeline, make_account, redis_client, celery_app):
    account = make_account()
    with session_scope() as session:
        principal = accounts.authenticate(session, account.api_key)
        request = InferenceRequest(model="qwen-7b", prompt="fresh", max_output_tokens=8)
        job_id = SubmitInference(session, principal, request, get_settings()).run().job.id
    with session_scope() as session:
        report = sweep(session, celery_app, redis_client, get_settings())
    assert str(job_id) not in report.requoted + report.resumed
    # Close the job so it does not linger for other tests' sweeps.
    with session_scope() as session:
        later = datetime.now(UTC) + timedelta(minutes=10)
        report = sweep(session, celery_app, redis_client, get_settings(), grace_s=0, now=later)
    assert str(job_id) in report.requoted
    assert wait_done(redis_client, job_id, 30)
    assert load(job_id).status == "success"


def test_a_job_requoted_again_and_again_waits_twice_as_long_each_time(
    pipeline, make_account, redis_client, celery_app
):
    """Quote messages that wait in a backed-up queue are not lost: answering them with a new
    copy every sweep would grow the backlog. Each re-quote doubles the wait before the next."""
    from sqlalchemy import update

    from app.jobs.cancel import cancel
    from app.jobs.recovery import stuck_jobs

    settings = get_settings()
    account = make_account()
    with session_scope() as session:
        principal = accounts.authenticate(session, account.api_key)
        request = InferenceRequest(model="qwen-7b", prompt="queued", max_output_tokens=8)
        job_id = SubmitInference(session, principal, request, settings).run().job.id  # not sent
    deadline_s = max(p.quote_deadline_ms for p in settings.profiles.values()) / 1000
    grace_s = settings.sweep_quoting_grace_s
    created = load(job_id).updated_at

    def due(after_s: float) -> bool:
        with session_scope() as session:
            now = created + timedelta(seconds=deadline_s + after_s)
            return job_id in {
                j.id for j in stuck_jobs(session, settings, now, settings.sweep_grace_s)
            }

    assert not due(grace_s - 0.5) and due(grace_s + 0.5)  # never re-quoted yet: 3 s
    with session_scope() as session:  # as after two re-quotes
        session.execute(update(Job).where(Job.id == job_id).values(version=3))
    assert not due(grace_s * 4 - 0.5) and due(grace_s * 4 + 0.5)
    with session_scope() as session:
        session.execute(update(Job).where(Job.id == job_id).values(version=30))
    assert not due(299) and due(301)  # at most five minutes
    with session_scope() as session:  # close it, so it does not linger for other tests
        cancel(session, session.get(Job, job_id))


def test_a_job_claimed_by_a_router_that_died_is_quoted_again(
    pipeline, make_account, redis_client, celery_app
):
    """`routing` means claimed but no provider called yet: the sweeper puts it back to quoting."""
    from sqlalchemy import update

    account = make_account()
    with session_scope() as session:
        principal = accounts.authenticate(session, account.api_key)
        request = InferenceRequest(model="qwen-7b", prompt="orphaned claim", max_output_tokens=8)
        job_id = SubmitInference(session, principal, request, get_settings()).run().job.id
    with session_scope() as session:
        session.execute(
            update(Job).where(Job.id == job_id).values(status="routing", version=Job.version + 1)
        )
    with session_scope() as session:
        later = datetime.now(UTC) + timedelta(minutes=10)
        report = sweep(session, celery_app, redis_client, get_settings(), grace_s=0, now=later)
    assert str(job_id) in report.requoted
    assert wait_done(redis_client, job_id, 30)
    job = load(job_id)
    assert job.status == "success" and sum(chat_calls(pipeline).values()) == 1
    assert ledger_kinds(account).count("capture") == 1
    assert_books_balance(account)


def test_a_stream_whose_worker_died_after_a_delta_is_settled_for_it_not_sent_elsewhere(
    crash_env, make_account, pipeline
):
    """The client holds part of the answer: the sweeper's resume settles the job for what its
    events show was delivered (docs/billing.md, "Cut streams") and asks no other provider."""
    account = make_account()
    dying = crash_env["worker"]("after_stream_delta")
    job_id = submit(account, crash_env["settings"], crash_env["celery"], stream=True)
    assert dying.proc.wait(timeout=60) == -9
    delivered = events.delivered(crash_env["client"], job_id)
    assert delivered is not None and delivered[1] == 1

    crash_env["worker"]()
    job = recover(crash_env, job_id)
    assert job.status == "failed" and job.error_code == "provider_error"
    assert job.output_text == delivered[0] and job.output_tokens == 1
    assert job.attempts[-1]["failure"] == "interrupted"
    assert sum(chat_calls(pipeline).values()) == 1  # never sent to another provider
    assert ledger_kinds(account) == ["topup", "hold", "capture", "release"]
    with session_scope() as session:
        captured = -sum(
            e.amount_micros
            for e in session.scalars(select(LedgerEntry).where(LedgerEntry.job_id == job_id))
            if e.kind == "capture"
        )
    assert captured == job.charge_micros > 0


def test_a_settled_job_signals_its_waiters_even_when_the_durability_barrier_fails(
    crash_env, make_account, pipeline
):
    """The settlement commits, then the barrier that makes it durable raises (the connection
    died): the waiters must still be woken, to read the row (issue 19: they waited the whole
    sync timeout). The failpoint makes every barrier of this worker fail."""
    crash_env["worker"](extra={"FLOPEX_FAILPOINTS": "durability_barrier"})
    account = make_account()
    job_id = submit(account, crash_env["settings"], crash_env["celery"])
    assert wait_done(crash_env["client"], job_id, 20)
    assert load(job_id).status == "success"
    assert_books_balance(account)


def test_every_attempt_shares_one_job_deadline(crash_env, make_account, pipeline):
    """Every provider hangs: without a shared deadline the job takes providers x read timeout.
    With a 3 s deadline and a 2 s read timeout, the second attempt is cut short by the deadline
    and the third provider is never called."""
    for provider in pipeline.values():
        provider.configure(fault="hang")
    crash_env["worker"](extra={"FLOPEX_JOB_DEADLINE_S": "3"})
    account = make_account()
    job_id = submit(account, crash_env["settings"], crash_env["celery"])
    assert wait_done(crash_env["client"], job_id, 20)
    job = load(job_id)
    assert job.status == "failed" and job.error_code == "timeout"
    assert [a["failure"] for a in job.attempts] == ["timeout", "timeout"]
    assert sum(1 for calls in chat_calls(pipeline).values() if calls) == 2
    assert_books_balance(account)


def test_two_deliveries_of_one_job_call_one_provider_once(crash_env, make_account, pipeline):
    """Without a claim of their own, two routers of one job (a duplicate delivery, or the
    sweeper's copy while the first still routes) may both read it; the first write of each (the
    attempt, before any provider call) is fenced on the version read, so only one goes on."""
    from sqlalchemy.orm.exc import StaleDataError

    from app.db import Commit
    from app.jobs import rows
    from app.jobs.execution import RouteAndExecute

    account = make_account()
    job_id = submit(account, crash_env["settings"], crash_env["celery"])  # no worker: queued
    args = (crash_env["client"], crash_env["settings"], crash_env["celery"])
    with session_scope() as late:
        stale = late.get(Job, job_id)  # the second router read the job while it was quoting
        assert stale is not None and stale.status == "quoting"
        late.commit()
        with session_scope() as session:
            outcome = RouteAndExecute(session, *args).run(job_id)
        assert outcome is not None and outcome.status == "success"
        with pytest.raises(StaleDataError):  # its attempt's write: the job moved on
            rows.write(late, stale, commit=Commit.ALONE, status="executing", attempts=[{}])
        late.rollback()
    assert sum(chat_calls(pipeline).values()) == 1
    assert ledger_kinds(account).count("capture") == 1
    assert_books_balance(account)
