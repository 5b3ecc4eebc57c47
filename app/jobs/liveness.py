"""Worker liveness in Redis, so the sweeper can tell a dead worker's job from a slow one.

Each worker process refreshes ``flopex:alive:{process}`` every ``HEARTBEAT_S``; the key expires
``TTL_S`` after the last refresh. A task that routes, executes or settles a job first records
its process as the job's holder (``flopex:holder:{job}``). The sweeper resumes a job whose holder
has no heartbeat as soon as it sees it, instead of waiting out the worst case of the job's step
(for an executing job, every provider attempt's timeouts: minutes at the defaults). Bound, and
why these numbers: docs/operations.md ("Recovery from a dead worker").

Only a positive sign of death takes the fast path: a job with no holder recorded (Redis was
emptied, or the key expired) or whose holder is alive waits for the age thresholds as before. A
worker that is merely stalled longer than ``TTL_S`` has its job resumed elsewhere: the version
fence stops it at its next write (the job still ends once, charged once), at the cost of the
provider call it had in flight.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import uuid
from collections.abc import Callable, Iterable

import redis

log = logging.getLogger(__name__)

HEARTBEAT_S = float(os.environ.get("FLOPEX_WORKER_HEARTBEAT_S", "3"))
TTL_S = float(os.environ.get("FLOPEX_WORKER_HEARTBEAT_TTL_S", "15"))
# A holder record outlives any step of a job (then it no longer matters).
HOLDER_TTL_S = 3600
# After a Redis restart (with its AOF) holders are back but heartbeats expired while it was down:
# every worker would look dead until its next beat. No verdicts until Redis has been up this long.
RESTART_GRACE_S = TTL_S


def process_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _alive_key(process: str) -> str:
    return f"flopex:alive:{process}"


def _holder_key(job_id: uuid.UUID | str) -> str:
    return f"flopex:holder:{job_id}"


def beat(client: redis.Redis, process: str | None = None) -> None:
    client.set(_alive_key(process or process_name()), "1", px=int(TTL_S * 1000))


def hold(client: redis.Redis, job_id: uuid.UUID | str) -> None:
    """Records this process as the job's holder (before it claims the job: a claim that then
    fails only leaves a live holder named, which never speeds anything up)."""
    client.set(_holder_key(job_id), process_name(), ex=HOLDER_TTL_S)


def forget(client: redis.Redis, job_ids: Iterable[uuid.UUID | str]) -> None:
    """The sweeper handed these jobs on: their former holders no longer speak for them."""
    keys = [_holder_key(j) for j in job_ids]
    if keys:
        client.delete(*keys)


def held_by_the_dead(client: redis.Redis, job_ids: list[uuid.UUID]) -> list[uuid.UUID]:
    """The jobs among ``job_ids`` whose recorded holder has no heartbeat. Two round trips."""
    if not job_ids:
        return []
    if int(client.info("server").get("uptime_in_seconds", 0)) < RESTART_GRACE_S:
        return []
    holders = client.mget([_holder_key(j) for j in job_ids])
    # The client decodes responses (app/redis_client.py): holders are str.
    named = [(j, str(h)) for j, h in zip(job_ids, holders, strict=True) if h]
    if not named:
        return []
    pipe = client.pipeline(transaction=False)
    for _, holder in named:
        pipe.exists(_alive_key(holder))
    alive = pipe.execute()
    return [j for (j, _), up in zip(named, alive, strict=True) if not up]


class Heartbeat:
    """Refreshes this process's key from a daemon thread until the process exits. A Redis
    fault skips a beat (and is logged once per outage): the key then expires, which is right
    when the process cannot reach Redis to take work anyway."""

    def __init__(self, client_factory: Callable[[], redis.Redis]) -> None:
        self._client_factory = client_factory
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="flopex-heartbeat", daemon=True)

    def start(self) -> Heartbeat:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        failing = False
        while True:
            try:
                beat(self._client_factory())
                failing = False
            except redis.RedisError as exc:
                if not failing:
                    log.warning("worker heartbeat: %s", exc)
                failing = True
            if self._stop.wait(HEARTBEAT_S):
                return
