"""Bringing the real Flopex stack up for a benchmark, watching its processes and taking it down.

Everything here is started by the benchmark and stopped by it: a fresh PostgreSQL database, a
dedicated (flushed) Redis database, one sandbox provider process per catalog provider, the
gunicorn web server and the Celery worker. Each child leads its own process group (so Ctrl-C is
handled by the benchmark alone) and asks the kernel for SIGTERM should the benchmark die without
cleaning up.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import redis
import requests
from sqlalchemy import create_engine, text
from sqlalchemy.exc import OperationalError
from sqlalchemy.pool import NullPool

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from scripts.dev import (  # noqa: E402
    Child,
    StartupError,
    ensure_alive,
    free_port,
    gunicorn_control_args,
    stop_children,
    web_ready,
)

BIN = Path(sys.executable).parent
LOOPBACK = frozenset({"127.0.0.1", "localhost", "::1"})
QUEUES = ("fast", "balanced", "economy")
SANDBOX_MODEL_ID = "meta-llama/Llama-3.1-8B-Instruct"
# (input, output) USD per million tokens for the first three providers, as in the dev catalog:
# the cheapest is also the one `lowest_cost` picks, so the load lands on p01.
PRICES = [("0.05", "0.08"), ("0.10", "0.12"), ("0.18", "0.20")]
READY_TIMEOUT_S = 60.0
SANDBOX_READY_TIMEOUT_S = 20.0
POLL_S = 0.1
_LISTENING = re.compile(r"listening on (\S+)")
_DB_NAME = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")

try:
    _LIBC: Any = ctypes.CDLL(None, use_errno=True)
except OSError:  # pragma: no cover - not Linux
    _LIBC = None
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """preexec_fn: SIGTERM this child when the benchmark process dies, however it dies."""
    if _LIBC is not None:
        _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def say(message: str) -> None:
    print(message, flush=True)


def require_loopback(url: str) -> None:
    host = urlsplit(url.replace("postgresql+psycopg2", "postgresql")).hostname or ""
    if host not in LOOPBACK:
        raise StartupError(f"{url}: the benchmark only talks to 127.0.0.1, not {host!r}")


def spawn(name: str, argv: list[str], log: Path) -> Child:
    out = log.open("ab")
    try:
        proc = subprocess.Popen(
            argv,
            cwd=ROOT,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )
    finally:
        out.close()
    return Child(name, proc)


def tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return f"(no log at {path})"
    return "\n".join(text.splitlines()[-lines:])


def wait_for(
    check: Callable[[], bool], timeout_s: float, alive: Callable[[], None] = lambda: None
) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        alive()
        if check():
            return True
        time.sleep(POLL_S)
    return False


# -- PostgreSQL and Redis ----------------------------------------------------------------------


def database_url(admin_url: str, name: str) -> str:
    return admin_url.rsplit("/", 1)[0] + "/" + name


def _admin_engine(admin_url: str) -> Any:
    return create_engine(admin_url, isolation_level="AUTOCOMMIT", poolclass=NullPool)


def drop_database(admin_url: str, name: str) -> None:
    if not _DB_NAME.match(name):
        raise StartupError(f"refusing database name {name!r}")
    engine = _admin_engine(admin_url)
    try:
        with engine.connect() as conn:
            conn.execute(
                text(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE datname = :name AND pid <> pg_backend_pid()"
                ),
                {"name": name},
            )
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}"'))
    finally:
        engine.dispose()


def recreate_database(admin_url: str, name: str) -> str:
    try:
        drop_database(admin_url, name)
        engine = _admin_engine(admin_url)
        try:
            with engine.connect() as conn:
                conn.execute(text(f'CREATE DATABASE "{name}"'))
        finally:
            engine.dispose()
    except OperationalError as exc:
        raise StartupError(f"PostgreSQL at {admin_url} is not usable: {exc.orig}") from exc
    return database_url(admin_url, name)


def flush_redis(url: str) -> None:
    client = redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=2)
    try:
        client.flushdb()
    except redis.RedisError as exc:
        raise StartupError(f"Redis at {url} is not usable: {exc}") from exc
    finally:
        client.close()


def broker_backlog(client: redis.Redis) -> int:
    """Messages waiting in the Celery queues (every priority sub-list) plus those a worker has
    taken but not acknowledged (ETA tasks such as the backstop route wait there)."""
    total = 0
    for key in client.scan_iter(count=500):
        name = key.decode() if isinstance(key, bytes) else key
        if name.startswith(QUEUES) and client.type(key) in (b"list", "list"):
            total += int(client.llen(key))
    total += int(client.hlen("unacked"))
    return total


# -- sandbox providers -------------------------------------------------------------------------


@dataclass
class SandboxNode:
    name: str
    child: Child
    log: Path
    record: Path
    base_url: str = ""

    @property
    def control_url(self) -> str:
        return self.base_url.rsplit("/v1", 1)[0] + "/_sandbox"


def start_sandboxes(count: int, tmp: Path, latency_ms: int) -> list[SandboxNode]:
    nodes: list[SandboxNode] = []
    try:
        for i in range(1, count + 1):
            name = f"p{i:02d}"
            log, record = tmp / f"sandbox-{name}.log", tmp / f"sandbox-{name}.rec"
            price_in, price_out = PRICES[(i - 1) % len(PRICES)]
            argv = [
                sys.executable, str(ROOT / "bench" / "sandbox_node.py"),
                "--record", str(record),
                "--name", name, "--host", "127.0.0.1", "--port", "0",
                "--latency-ms", str(latency_ms),
                "--model", SANDBOX_MODEL_ID,
                "--price-input", price_in, "--price-output", price_out,
            ]  # fmt: skip
            nodes.append(SandboxNode(name, spawn(f"sandbox {name}", argv, log), log, record))
        for node in nodes:

            def listening(node: SandboxNode = node) -> bool:
                match = _LISTENING.search(node.log.read_text(errors="replace"))
                if match:
                    node.base_url = match.group(1)
                return bool(match)

            if not wait_for(
                listening, SANDBOX_READY_TIMEOUT_S, lambda: ensure_alive([n.child for n in nodes])
            ):
                raise StartupError(f"sandbox {node.name} did not start:\n{tail(node.log)}")
    except BaseException:
        stop_children([n.child for n in nodes], timeout_s=5)
        raise
    return nodes


def configure_sandboxes(nodes: Iterable[SandboxNode], **changes: Any) -> None:
    for node in nodes:
        resp = requests.post(f"{node.control_url}/config", json=changes, timeout=5)
        resp.raise_for_status()


def reset_sandboxes(nodes: Iterable[SandboxNode]) -> None:
    """Clears each sandbox's request log (it keeps every request body in memory)."""
    for node in nodes:
        requests.post(f"{node.control_url}/reset", timeout=5).raise_for_status()


def read_service_times(nodes: Iterable[SandboxNode]) -> dict[tuple[str, str], float]:
    """(provider, tag) -> the provider's own service time in ms for that chat completion."""
    result: dict[tuple[str, str], float] = {}
    for node in nodes:
        with contextlib.suppress(FileNotFoundError), node.record.open() as fh:
            for line in fh:
                tag, _, ms = line.strip().partition(" ")
                with contextlib.suppress(ValueError):
                    result[(node.name, tag)] = float(ms)
    return result


# -- the catalog and the load account ----------------------------------------------------------


def catalog_toml(nodes: list[SandboxNode], main_providers: int, fanout_sizes: list[int]) -> str:
    """`llama-3.1-8b` on the first `main_providers` sandboxes (the load), and one alias
    `bench-fanout-<n>` per fan-out size on the first n."""
    lines: list[str] = ["# Written by bench/run.py for one benchmark run.", ""]
    for node in nodes:
        lines += ["[[providers]]", f'name = "{node.name}"', f'base_url = "{node.base_url}"', ""]
    aliases = {"llama-3.1-8b": main_providers}
    aliases.update({f"bench-fanout-{n}": n for n in fanout_sizes})
    for alias in aliases:
        lines += [
            "[[models]]",
            f'alias = "{alias}"',
            "max_output_tokens = 128000",
            "context_length = 131072",
            "",
        ]
    for alias, n in aliases.items():
        for i, node in enumerate(nodes[:n]):
            price_in, price_out = PRICES[i % len(PRICES)]
            if i >= len(PRICES):
                # Providers past the third are dearer still, so the winner stays p01.
                price_in, price_out = f"0.2{i}", f"0.3{i}"
            lines += [
                "[[offerings]]",
                f'model = "{alias}"',
                f'provider = "{node.name}"',
                f'provider_model_id = "{SANDBOX_MODEL_ID}"',
                f'input_price_usd_per_million = "{price_in}"',
                f'output_price_usd_per_million = "{price_out}"',
                "",
            ]
    return "\n".join(lines)


@dataclass(frozen=True)
class LoadAccount:
    account_id: uuid.UUID
    wallet_id: uuid.UUID
    api_key: str


def bootstrap_database(
    catalog_path: Path, balance_usd: str, name: str, count: int = 1
) -> list[LoadAccount]:
    """Migrate (app.migrate.upgrade), load the catalog and create the `count` accounts that
    carry the load, each with `balance_usd` of credit, in this process (DATABASE_URL is set)."""
    from app import accounts, wallet
    from app.catalog import load_catalog
    from app.db import dispose_engine, session_scope
    from app.migrate import upgrade
    from app.money import usd_to_micros
    from config.settings import get_settings

    get_settings.cache_clear()
    upgrade(os.environ["DATABASE_URL"])
    with session_scope() as session:
        load_catalog(session, catalog_path)
    created = []
    with session_scope() as session:
        for i in range(count):
            account = accounts.create_account(session, f"{name} {i + 1}")
            _, raw = accounts.issue_key(session, account.id, name="bench")
            principal = accounts.authenticate(session, raw)
            assert principal is not None
            wallet.top_up(session, principal.wallet_id, usd_to_micros(balance_usd), "bench credit")
            created.append(LoadAccount(account.id, principal.wallet_id, raw))
    dispose_engine()
    return created


# -- web and worker ----------------------------------------------------------------------------


def start_web(port: int, tmp: Path) -> Child:
    os.environ["PORT"] = str(port)
    os.environ["BIND_HOST"] = "127.0.0.1"
    argv = [str(BIN / "gunicorn"), "-c", "config/gunicorn.conf.py", *gunicorn_control_args(tmp)]
    return spawn("web", [*argv, "app:create_app()"], tmp / "web.log")


def start_worker(
    node_name: str, concurrency: int, log_level: str, tmp: Path, beat: bool = False
) -> Child:
    """One Celery worker process (thread pool); its log is <tmp>/<node_name>.log. With ``beat``
    it also runs celery beat (the quote board's refresh, as in production)."""
    argv = [
        str(BIN / "celery"), "-A", "workers.main", "worker",
        "--pool", "threads", "--concurrency", str(concurrency),
        "-Q", ",".join(QUEUES),
        "--without-gossip", "--without-mingle", "--without-heartbeat",
        "-n", f"{node_name}@%h",
        "-l", log_level,
    ]  # fmt: skip
    if beat:
        argv += ["-B", "-s", str(tmp / f"{node_name}-beat-schedule")]
    return spawn(node_name, argv, tmp / f"{node_name}.log")


def worker_answers(probe: Any, node_name: str) -> bool:
    try:
        replies = probe.control.ping(timeout=0.5) or []
    except Exception:  # the broker not answering yet just means "not yet"
        return False
    return any(name.startswith(node_name + "@") for reply in replies for name in reply)


# -- process accounting ------------------------------------------------------------------------

_CLK_TCK = os.sysconf("SC_CLK_TCK")


def read_stat(pid: int) -> tuple[str, int, float] | None:
    """(comm, ppid, user+system CPU seconds) from /proc/<pid>/stat; None if it is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    comm = raw[raw.index("(") + 1 : raw.rindex(")")]
    fields = raw[raw.rindex(")") + 2 :].split()
    # fields[0] is state (field 3); ppid is field 4, utime 14, stime 15.
    return comm, int(fields[1]), (int(fields[11]) + int(fields[12])) / _CLK_TCK


def children_of(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            stat = read_stat(int(entry))
            if stat is not None and stat[1] == pid:
                found.append(int(entry))
    return sorted(found)


def status_kb(pid: int, key: str) -> int | None:
    """A `VmHWM` / `VmRSS` line of /proc/<pid>/status, in kB."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def system_jiffies() -> tuple[int, int]:
    """(busy, total) jiffies of all CPUs since boot."""
    parts = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = parts[3] + (parts[4] if len(parts) > 4 else 0)
    return sum(parts) - idle, sum(parts)


@dataclass
class Stack:
    """Everything one benchmark run starts; `shutdown` undoes exactly that."""

    tmp: Path
    admin_url: str
    db_name: str
    redis_url: str
    sandboxes: list[SandboxNode] = field(default_factory=list)
    web: Child | None = None
    workers: list[Child] = field(default_factory=list)
    base_url: str = ""
    db_created: bool = False
    keep_db: bool = False
    _pg_conn: Any = None
    _redis: redis.Redis | None = None

    # -- lifecycle ---------------------------------------------------------------------------

    def children(self) -> list[Child]:
        found = [self.web] if self.web is not None else []
        return found + self.workers + [n.child for n in self.sandboxes]

    def start_services(self, worker_procs: int, worker_concurrency: int, log_level: str) -> None:
        for i in range(worker_procs):
            node = f"bench{i + 1}-{os.getpid()}"
            beat = i == 0  # exactly one beat: the quote board's clock
            self.workers.append(start_worker(node, worker_concurrency, log_level, self.tmp, beat))
        port = free_port()
        self.web = start_web(port, self.tmp)
        self.base_url = f"http://127.0.0.1:{port}"
        self.wait_ready()

    def wait_ready(self) -> None:
        from celery import Celery

        def alive() -> None:
            try:
                ensure_alive(self.children())
            except StartupError as exc:
                raise StartupError(f"{exc}\n{self.log_tails()}") from None

        deadline = time.monotonic() + READY_TIMEOUT_S
        if not wait_for(lambda: web_ready(self.base_url), READY_TIMEOUT_S, alive):
            raise StartupError(f"web not ready within {READY_TIMEOUT_S:.0f} s\n{self.log_tails()}")
        probe = Celery("flopex-bench-probe", broker=self.redis_url)
        probe.conf.broker_connection_timeout = 2
        try:
            for worker in self.workers:
                remaining = max(1.0, deadline - time.monotonic())
                if not wait_for(lambda w=worker: worker_answers(probe, w.name), remaining, alive):
                    raise StartupError(
                        f"worker {worker.name} did not answer a ping within "
                        f"{READY_TIMEOUT_S:.0f} s\n{self.log_tails()}"
                    )
        finally:
            probe.close()

    def log_tails(self) -> str:
        parts = []
        for name in ["web", *(w.name for w in self.workers)]:
            parts.append(f"--- {name} log ({self.tmp / f'{name}.log'}) ---")
            parts.append(tail(self.tmp / f"{name}.log"))
        return "\n".join(parts)

    def shutdown(self) -> None:
        # Web first (no new jobs), then the worker, then the providers; each: SIGTERM to the
        # group, SIGKILL after a bounded wait.
        with contextlib.suppress(Exception):
            stop_children([c for c in (self.web, *self.workers) if c is not None], timeout_s=10)
        with contextlib.suppress(Exception):
            stop_children([n.child for n in self.sandboxes], timeout_s=5)
        if self._pg_conn is not None:
            with contextlib.suppress(Exception):
                self._pg_conn.close()
        if self._redis is not None:
            with contextlib.suppress(Exception):
                self._redis.flushdb()
                self._redis.close()
        with contextlib.suppress(Exception):
            from app.db import dispose_engine

            dispose_engine()
        if self.db_created and not self.keep_db:
            with contextlib.suppress(Exception):
                drop_database(self.admin_url, self.db_name)

    # -- helpers used while running ------------------------------------------------------------

    @property
    def redis(self) -> redis.Redis:
        if self._redis is None:
            self._redis = redis.Redis.from_url(self.redis_url, socket_timeout=5)
        return self._redis

    def check_alive(self) -> None:
        try:
            ensure_alive(self.children())
        except StartupError as exc:
            raise StartupError(f"{exc}\n{self.log_tails()}") from None

    def live_jobs(self) -> int:
        from sqlalchemy import func, select

        from app.db import session_scope
        from app.jobs import states
        from app.models import Job

        with session_scope() as session:
            return int(
                session.scalar(select(func.count()).where(Job.status.in_(list(states.LIVE)))) or 0
            )

    def drain(self, timeout_s: float = 30.0) -> bool:
        """Until no job is live and the broker holds no message (bounded)."""

        def idle() -> bool:
            return self.live_jobs() == 0 and broker_backlog(self.redis) == 0

        return wait_for(idle, timeout_s, self.check_alive)

    # -- process accounting --------------------------------------------------------------------

    def _pg(self) -> Any:
        if self._pg_conn is None:
            import psycopg2

            dsn = self.admin_url.replace("postgresql+psycopg2://", "postgresql://")
            self._pg_conn = psycopg2.connect(dsn)
            self._pg_conn.autocommit = True
        return self._pg_conn

    def postgres_pids(self) -> list[int]:
        """Backends serving the benchmark database plus PostgreSQL's background processes (WAL
        writer, checkpointer...), not the backends of other databases on the same server."""
        with self._pg().cursor() as cur:
            cur.execute(
                "SELECT pid FROM pg_stat_activity WHERE (datname = %s OR backend_type <> "
                "'client backend') AND pid <> pg_backend_pid()",
                (self.db_name,),
            )
            return [int(r[0]) for r in cur.fetchall()]

    def pg_counters(self) -> dict[str, int]:
        """Cumulative transaction and row counters of the benchmark database."""
        with self._pg().cursor() as cur:
            cur.execute(
                "SELECT xact_commit, xact_rollback, tup_inserted, tup_updated, tup_returned "
                "FROM pg_stat_database WHERE datname = %s",
                (self.db_name,),
            )
            row = cur.fetchone() or (0, 0, 0, 0, 0)
        keys = ("commits", "rollbacks", "rows_inserted", "rows_updated", "rows_returned")
        return dict(zip(keys, (int(v) for v in row), strict=True))

    def redis_pid(self) -> int | None:
        with contextlib.suppress(Exception):
            return int(self.redis.info("server")["process_id"])
        return None

    def process_groups(self) -> dict[str, list[int]]:
        groups: dict[str, list[int]] = {"loadgen": [os.getpid()]}
        if self.web is not None:
            groups["web"] = [self.web.pid, *children_of(self.web.pid)]
        if self.workers:
            groups["worker"] = [pid for w in self.workers for pid in (w.pid, *children_of(w.pid))]
        groups["sandboxes"] = [n.child.pid for n in self.sandboxes]
        groups["postgres"] = self.postgres_pids()
        rpid = self.redis_pid()
        groups["redis"] = [rpid] if rpid else []
        return groups

    def cpu_snapshot(self) -> dict[str, Any]:
        groups = self.process_groups()
        per_pid = {
            name: {pid: stat[2] for pid in pids if (stat := read_stat(pid)) is not None}
            for name, pids in groups.items()
        }
        return {"t": time.monotonic(), "groups": per_pid, "system": system_jiffies()}

    def peak_rss_mb(self) -> dict[str, float | None]:
        """Largest VmHWM so far of each process kind (web: master and workers; worker)."""

        def largest(pids: list[int]) -> float | None:
            peaks = [kb for pid in pids if (kb := status_kb(pid, "VmHWM")) is not None]
            return round(max(peaks) / 1024, 1) if peaks else None

        web = [self.web.pid, *children_of(self.web.pid)] if self.web is not None else []
        workers = [p for w in self.workers for p in (w.pid, *children_of(w.pid))]
        return {"web": largest(web), "worker": largest(workers)}

    def memory(self) -> dict[str, Any]:
        """Peak (VmHWM) and current (VmRSS) resident memory of each process, in MB."""

        def one(pid: int) -> dict[str, float | None]:
            hwm, rss = status_kb(pid, "VmHWM"), status_kb(pid, "VmRSS")
            return {
                "pid": pid,
                "peak_mb": None if hwm is None else round(hwm / 1024, 1),
                "rss_mb": None if rss is None else round(rss / 1024, 1),
            }

        result: dict[str, Any] = {}
        if self.web is not None:
            result["web_master"] = one(self.web.pid)
            result["web_workers"] = [one(p) for p in children_of(self.web.pid)]
        if self.workers:
            # One entry per Celery process (thread pool: no children), the largest first.
            procs = [one(p) for w in self.workers for p in (w.pid, *children_of(w.pid))]
            procs.sort(key=lambda m: -(m["peak_mb"] or 0))
            result["worker"] = procs[0]
            result["worker_processes"] = procs
        result["sandboxes"] = [one(n.child.pid) for n in self.sandboxes]
        return result


def cpu_delta(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """CPU seconds each group used between two snapshots (a process that started in between
    counts from zero), and how busy the whole machine was."""
    used: dict[str, float] = {}
    for name, pids in after["groups"].items():
        start = before["groups"].get(name, {})
        used[name] = round(sum(cpu - start.get(pid, 0.0) for pid, cpu in pids.items()), 3)
    busy0, total0 = before["system"]
    busy1, total1 = after["system"]
    wall = after["t"] - before["t"]
    busy_s = (busy1 - busy0) / _CLK_TCK
    return {
        "wall_s": round(wall, 3),
        "cpu_s": used,
        "machine_busy_pct": round(100.0 * (busy1 - busy0) / max(1, total1 - total0), 1),
        # CPU the machine spent outside the benchmark's processes (other jobs on a shared box;
        # also the kernel's softirq work that /proc/<pid>/stat does not attribute), in cores.
        "other_cores": round(max(0.0, busy_s - sum(used.values())) / max(wall, 1e-9), 2),
    }


def machine_busy(sample_s: float = 1.0) -> float:
    """How busy the whole machine is right now, in % of all cores."""
    busy0, total0 = system_jiffies()
    time.sleep(sample_s)
    busy1, total1 = system_jiffies()
    return 100.0 * (busy1 - busy0) / max(1, total1 - total0)


def wait_for_quiet_machine(max_wait_s: float, threshold_pct: float = 15.0) -> float:
    """Waits (bounded) until the machine is idle enough to measure; returns the last busy %."""
    deadline = time.monotonic() + max_wait_s
    busy = machine_busy()
    warned = False
    while busy > threshold_pct and time.monotonic() < deadline:
        if not warned:
            say(
                f"bench: the machine is {busy:.0f}% busy before the benchmark started; waiting "
                f"up to {max_wait_s:.0f} s for it to quieten"
            )
            warned = True
        busy = machine_busy(2.0)
    return round(busy, 1)
