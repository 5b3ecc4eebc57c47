"""Smoke test of `make run` with its embedded defaults: no DATABASE_URL, no REDIS_URL.

One launch of ``scripts/dev.py`` serves every test in this module (they run in file order): the
banner, two billed requests through the whole stack, then Ctrl-C and a check that nothing is left.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path

import pytest
import requests

from tests.api_document import DOC_REQUEST

ROOT = Path(__file__).resolve().parents[2]
DEV_SCRIPT = ROOT / "scripts" / "dev.py"
READY_PREFIX = "flopex ready on "
READY_TIMEOUT_S = 90.0
EXIT_TIMEOUT_S = 30.0
DEMO_KEY = "fpx_demotest1_" + "AbCdEfGh12345678IjKlMnOp"
DOCUMENTED_REQUEST = DOC_REQUEST
# Variables that would point the launcher at real services instead of its embedded defaults.
_SCRUBBED = ("DATABASE_URL", "REDIS_URL", "CELERY_BROKER_URL", "FLOPEX_CATALOG", "PORT")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@dataclass
class Launch:
    """The running launcher and everything it has printed so far."""

    proc: subprocess.Popen[str]
    lines: list[str] = field(default_factory=list)
    ready: threading.Event = field(default_factory=threading.Event)
    var: Path | None = None

    def pump(self) -> None:
        # Keeps draining the pipe after the banner so the children never block on a full pipe.
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))
            if line.startswith(READY_PREFIX):
                self.ready.set()

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def tail(self, n: int = 150) -> str:
        return "\n".join(self.lines[-n:])

    def banner_value(self, label: str) -> str:
        for line in self.lines:
            if line.startswith(label):
                return line[len(label) :].strip()
        raise AssertionError(f"no {label!r} line in the launcher output:\n{self.output}")

    @property
    def pids(self) -> dict[str, int]:
        pairs = re.findall(r"(\w+)=(\d+)", self.banner_value("pids:"))
        return {name: int(pid) for name, pid in pairs}

    @property
    def base_url(self) -> str:
        return self.banner_value(READY_PREFIX)


@pytest.fixture(scope="module")
def launch(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Launch]:
    env = {k: v for k, v in os.environ.items() if k not in _SCRUBBED}
    # Named var/ as in the repository: the README's commands run as written from its parent.
    var = tmp_path_factory.mktemp("stack") / "var"
    env.update(
        PORT=str(_free_port()),
        FLOPEX_VAR_DIR=str(var),
        FLOPEX_DEMO_API_KEY=DEMO_KEY,
        PYTHONUNBUFFERED="1",
    )
    proc = subprocess.Popen(
        [sys.executable, str(DEV_SCRIPT)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    running = Launch(proc, var=var)
    pump = threading.Thread(target=running.pump, daemon=True)
    pump.start()
    try:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not running.ready.wait(0.2):
            if proc.poll() is not None or time.monotonic() > deadline:
                pump.join(timeout=2)
                pytest.fail(
                    f"launcher not ready (exit code {proc.poll()}):\n{running.output}",
                    pytrace=False,
                )
        yield running
    finally:
        _force_stop(running)
        pump.join(timeout=5)


def _force_stop(running: Launch) -> None:
    """Last resort when a test failed half-way: never leave a stack behind."""
    proc = running.proc
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=EXIT_TIMEOUT_S)
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    with contextlib.suppress(AssertionError):
        for pid in running.pids.values():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)


def _infer(launch: Launch) -> requests.Response:
    return requests.post(
        f"{launch.base_url}/v1/inference",
        headers={"Authorization": f"Bearer {DEMO_KEY}"},
        json=DOCUMENTED_REQUEST,
        timeout=30,
    )


def test_banner_shows_the_configured_key_and_a_working_curl(launch: Launch) -> None:
    assert launch.banner_value("API key:") == DEMO_KEY
    assert set(launch.pids) == {"redis", "worker", "web"}
    assert launch.base_url.startswith("http://127.0.0.1:")
    assert f"curl -s {launch.base_url}/v1/inference \\" in launch.lines
    assert f'-H "Authorization: Bearer {DEMO_KEY}"' in launch.output
    assert "'" + json.dumps(DOCUMENTED_REQUEST, separators=(",", ":")) + "'" in launch.output


def test_documented_request_is_served_and_billed(launch: Launch) -> None:
    first = _infer(launch)
    assert first.status_code == 200, f"{first.text}\nlauncher output:\n{launch.tail()}"
    body = json.loads(first.text, parse_float=Decimal)
    assert body["id"]
    assert body["object"] == "inference"
    assert body["status"] == "success"
    assert body["usage"]["total_tokens"] > 0
    assert body["billing"]["cost_usd"] > 0
    assert body["billing"]["balance_remaining_usd"] < 10
    assert body["created_at"].endswith("Z")  # SQLite returns it without a zone; still UTC

    second = _infer(launch)
    assert second.status_code == 200, f"{second.text}\nlauncher output:\n{launch.tail()}"
    after = json.loads(second.text, parse_float=Decimal)
    assert after["id"] != body["id"]
    assert (
        body["billing"]["balance_remaining_usd"] - after["billing"]["balance_remaining_usd"]
        == after["billing"]["cost_usd"]
    )


def _readme_block(heading: str) -> str:
    """The first ```sh block after ``heading`` in the README."""
    text = (ROOT / "README.md").read_text()
    after = text[text.index(heading) :]
    start = after.index("```sh\n") + len("```sh\n")
    return after[start : after.index("```", start)]


def test_the_readmes_first_request_works_when_pasted(launch: Launch) -> None:
    block = _readme_block("## Using the API")
    assert "export FLOPEX_KEY=" in block
    port = launch.base_url.rsplit(":", 1)[1]
    assert launch.var is not None
    env = {k: v for k, v in os.environ.items() if k != "FLOPEX_KEY"}
    out = subprocess.run(
        ["bash", "-e", "-c", block.replace("127.0.0.1:8000", f"127.0.0.1:{port}")],
        cwd=launch.var.parent,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    answer = json.loads(out.stdout)
    assert answer["status"] == "success", out.stdout


def test_a_worker_that_dies_is_started_again(launch: Launch) -> None:
    worker = launch.pids["worker"]
    os.killpg(worker, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while not any("started it again" in line for line in launch.lines):
        assert time.monotonic() < deadline, launch.tail()
        assert launch.proc.poll() is None, launch.tail()
        time.sleep(0.1)  # waiting for the supervisor's next round
    resp = requests.post(
        f"{launch.base_url}/v1/inference",
        headers={"Authorization": f"Bearer {DEMO_KEY}"},
        # No latency limit: a worker that just started may quote slowly on a busy machine.
        json={"model": "llama-3.1-8b", "input": "Still there?", "max_output_tokens": 16},
        timeout=90,
    )
    assert resp.status_code == 200, resp.text


def test_sigint_stops_everything(launch: Launch) -> None:
    pids = launch.pids
    launch.proc.send_signal(signal.SIGINT)
    try:
        code = launch.proc.wait(timeout=EXIT_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"launcher still running {EXIT_TIMEOUT_S:.0f} s after SIGINT:\n{launch.output}")
    assert code == 0, launch.output
    deadline = time.monotonic() + 10
    while any(_alive(pid) for pid in pids.values()) and time.monotonic() < deadline:
        time.sleep(0.1)
    survivors = {name: pid for name, pid in pids.items() if _alive(pid)}
    assert not survivors, f"left running: {survivors}\n{launch.output}"
