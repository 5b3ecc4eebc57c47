"""The Celery worker's own metrics listener (FLOPEX_WORKER_METRICS_PORT, workers/signals.py): a
host that runs only workers exports what its processes wrote."""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import pytest

from config.settings import get_settings
from tests.conftest import ROOT, metric_samples, start_worker


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as resp:
        assert resp.status == 200
        return resp.read().decode()


def test_a_worker_only_host_exports_its_processes_series_on_the_worker_port(
    database: str, redis_client: Any, celery_app: Any, tmp_path: Path
) -> None:
    """A worker of a host of its own (its own PROMETHEUS_MULTIPROC_DIR, which no web process
    reads) serves the series its task wrote, and those a process of the host that has since
    exited wrote; no queue depth and nothing from other hosts."""
    host_dir = tmp_path / "prometheus"
    host_dir.mkdir()
    host_env = {"PROMETHEUS_MULTIPROC_DIR": str(host_dir)}
    # A process of this host that counted a job and exited (a recycled pool child, say).
    subprocess.run(
        [
            sys.executable,
            "-c",
            "from app.metrics import job_finished; job_finished('failed', 'sibling_marker')",
        ],
        cwd=ROOT,
        env={**os.environ, **host_env},
        check=True,
    )
    port = _free_port()
    queue = f"metrics-{uuid.uuid4().hex[:8]}"  # this worker alone takes what is sent here
    worker = start_worker(
        tmp_path / "worker.log",
        concurrency=2,
        queues=queue,
        env={**host_env, "FLOPEX_WORKER_METRICS_PORT": str(port)},
    )
    try:
        deadline = time.monotonic() + 60
        while True:  # the listener opens once the worker consumes
            assert worker.proc.poll() is None, worker.output()
            try:
                before = _scrape(port)
                break
            except (ConnectionError, urllib.error.URLError):
                assert time.monotonic() < deadline, f"no listener on {port}:\n{worker.output()}"
                time.sleep(0.05)

        # A board check of a provider that refuses connections: recorded by the worker.
        provider = f"probe-{uuid.uuid4().hex[:8]}"
        celery_app.send_task(
            "flopex.check_provider", args=[provider, "http://127.0.0.1:9", None], queue=queue
        )
        key = (("outcome", "connect"), ("provider", provider))
        deadline = time.monotonic() + 30
        while key not in metric_samples(
            text := _scrape(port), "flopex_quote_duration_seconds_count"
        ):
            assert worker.proc.poll() is None, worker.output()
            assert time.monotonic() < deadline, f"the quote never showed:\n{worker.output()}"
            time.sleep(0.05)

        assert metric_samples(text, "flopex_quote_duration_seconds_count")[key] == 1.0
        assert key not in metric_samples(before, "flopex_quote_duration_seconds_count")
        finished = metric_samples(text, "flopex_jobs_finished_total")
        assert finished == {(("code", "sibling_marker"), ("status", "failed")): 1.0}
        # Queue depth is the web's (one broker-wide value); this host served no HTTP.
        assert "flopex_queue_depth" not in text
        assert "flopex_http_request_duration_seconds" not in text
        assert f"worker metrics on http://127.0.0.1:{port}/metrics" in worker.output()
    finally:
        worker.stop()


def test_the_worker_listener_is_off_unless_set_and_starts_once_per_process(
    database: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from workers import signals

    monkeypatch.setattr(signals, "_metrics_servers", {})
    started = []
    try:
        monkeypatch.delenv("FLOPEX_WORKER_METRICS_PORT", raising=False)
        get_settings.cache_clear()
        assert signals._serve_metrics() is None

        port = _free_port()
        monkeypatch.setenv("FLOPEX_WORKER_METRICS_PORT", str(port))
        get_settings.cache_clear()
        server = signals._serve_metrics()
        assert server is not None
        started.append(server)
        assert server.server_address == ("127.0.0.1", port)  # loopback unless told otherwise
        assert signals._serve_metrics() is server  # a second ready signal binds nothing
        text = _scrape(port)
        assert "flopex_wallet_captures_total" in text and "flopex_queue_depth" not in text

        # A port another process holds: logged, and the worker carries on without a listener.
        monkeypatch.setattr(signals, "_metrics_servers", {})
        with caplog.at_level(logging.ERROR, logger="workers.signals"):
            assert signals._serve_metrics() is None
        assert "cannot listen on 127.0.0.1" in caplog.text

        for bad in ("0", "65536", "x"):
            monkeypatch.setenv("FLOPEX_WORKER_METRICS_PORT", bad)
            get_settings.cache_clear()
            with pytest.raises(ValueError):
                get_settings()
        monkeypatch.setenv("FLOPEX_WORKER_METRICS_PORT", "")
        get_settings.cache_clear()
        assert get_settings().worker_metrics_port is None
    finally:
        for server in started:
            server.shutdown()
            server.server_close()
        monkeypatch.undo()
        get_settings.cache_clear()
