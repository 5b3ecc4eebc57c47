"""app/jobs/notify.py: the completion signal reaches every waiter, whenever it started waiting."""

from __future__ import annotations

import threading
import uuid

from app.jobs.notify import signal_done, wait_done


def test_a_signal_sent_before_anyone_waits_is_kept(redis_client):
    job_id = uuid.uuid4()
    signal_done(redis_client, job_id)
    assert wait_done(redis_client, job_id, 1.0)
    assert wait_done(redis_client, job_id, 1.0)  # and kept for the next waiter too


def test_every_concurrent_waiter_wakes_on_one_signal(redis_client):
    job_id = uuid.uuid4()
    woke: list[bool] = []
    ready = threading.Barrier(6)

    def waiter() -> None:
        ready.wait()
        woke.append(wait_done(redis_client, job_id, 10.0))

    threads = [threading.Thread(target=waiter) for _ in range(5)]
    for t in threads:
        t.start()
    ready.wait()
    signal_done(redis_client, job_id)
    for t in threads:
        t.join(timeout=15)
    assert woke == [True] * 5


def test_without_a_signal_the_wait_times_out(redis_client):
    assert wait_done(redis_client, uuid.uuid4(), 0.05) is False
