"""Worker liveness (app/jobs/liveness.py) and the sweeper's use of it: a job whose worker died
is resumed as soon as the worker's heartbeat has expired, not after the worst case of its step."""

from __future__ import annotations

import time
import uuid
from datetime import UTC, datetime
from typing import Any

import pytest

from app.jobs import liveness
from app.jobs.notify import wait_done
from app.jobs.recovery import sweep
from tests.jobs import test_recovery
from tests.jobs.test_recovery import crash_at, load


@pytest.fixture(autouse=True)
def _redis_up_long_enough(monkeypatch: pytest.MonkeyPatch) -> None:
    # The test's Redis may have started seconds ago (the restart guard has its own test).
    monkeypatch.setattr(liveness, "RESTART_GRACE_S", 0)


# The crash tests' fixture: a worker of its own on a Redis database of its own.
crash_env = test_recovery.crash_env


def test_a_holder_without_a_heartbeat_is_dead_and_only_then(redis_client: Any) -> None:
    client = redis_client
    alive, dead, unheld = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    liveness.hold(client, alive)
    liveness.beat(client)
    client.set(
        f"flopex:holder:{dead}", f"elsewhere:{uuid.uuid4().hex}"
    )  # its process never beat (or stopped)
    assert liveness.held_by_the_dead(client, [alive, dead, unheld]) == [dead]
    liveness.forget(client, [dead])
    assert liveness.held_by_the_dead(client, [alive, dead, unheld]) == []


def test_a_heartbeat_expires_when_its_process_stops_beating(redis_client: Any) -> None:
    client = redis_client
    process = f"host:{uuid.uuid4().hex}"
    liveness.beat(client, process)
    ttl_ms = client.pttl(f"flopex:alive:{process}")
    assert 0 < ttl_ms <= liveness.TTL_S * 1000


@pytest.mark.usefixtures("no_stuck_jobs_from_other_tests")
def test_a_dead_workers_executing_job_is_resumed_at_once(
    crash_env: Any, make_account: Any, pipeline: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from app.infra.db import session_scope
    from app.jobs.recovery import stuck_jobs

    # The dying worker beats every 0.2 s with a 1 s TTL, so its death shows within a second.
    monkeypatch.setenv("FLOPEX_WORKER_HEARTBEAT_S", "0.2")
    monkeypatch.setenv("FLOPEX_WORKER_HEARTBEAT_TTL_S", "1")
    account = make_account()
    job_id = crash_at(crash_env, account, "before_provider_call")
    assert load(job_id).status == "executing"
    client, settings = crash_env["client"], crash_env["settings"]
    holder = client.get(f"flopex:holder:{job_id}")
    assert holder, "the worker did not record itself as the job's holder"

    def stuck_now() -> bool:
        with session_scope() as session:
            found = stuck_jobs(session, settings, datetime.now(UTC), 15.0, client=client)
            return job_id in {job.id for job in found}

    # While a live process holds it, a young executing job is left alone.
    live = f"live:{uuid.uuid4().hex}"
    client.set(f"flopex:holder:{job_id}", live)
    liveness.beat(client, live)
    assert not stuck_now()
    client.set(f"flopex:holder:{job_id}", holder)

    deadline = time.monotonic() + 30
    while not liveness.held_by_the_dead(client, [job_id]):
        assert time.monotonic() < deadline, "the dead worker's heartbeat never expired"
        time.sleep(0.1)  # waiting for its key to expire

    crash_env["worker"]()
    with session_scope() as session:
        # Now, with the default grace: the age thresholds alone would wait for every provider
        # attempt's timeouts first.
        report = sweep(session, crash_env["celery"], client, settings, now=datetime.now(UTC))
    assert report.resumed == [str(job_id)]
    assert wait_done(client, job_id, 30)
    job = load(job_id)
    assert job.status == "success"
    assert [a.get("failure") for a in job.attempts] == ["interrupted", None]
