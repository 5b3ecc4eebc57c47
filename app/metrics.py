"""Prometheus metrics, safe under many processes.

With ``PROMETHEUS_MULTIPROC_DIR`` set (in the environment of every process of a host, before
this module is imported: docs/operations.md; ``make run`` leaves it unset, so its /metrics shows
the web process's own series only), every gunicorn worker and Celery worker on a host writes to that
directory and ``/metrics`` on any web process aggregates them all. Without it, each process
exposes only its own.

Two endpoints serve that aggregation: the web's ``/metrics`` (``render``, which adds the
broker's queue depths) and, when ``FLOPEX_WORKER_METRICS_PORT`` is set, the Celery worker's own
listener (``serve_worker_metrics``, without queue depths), for hosts that run no web process.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
    # Created, never emptied: a starting process cannot tell whether a sibling still writes
    # there. Emptying it once per boot is the operator's step (docs/operations.md, "Metrics").
    os.makedirs(os.environ["PROMETHEUS_MULTIPROC_DIR"], exist_ok=True)

from wsgiref.simple_server import WSGIServer

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    start_http_server,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import REGISTRY, Collector
from sqlalchemy import event
from sqlalchemy.orm import Session, SessionTransaction

_FAST = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)

REQUEST_LATENCY = Histogram(
    "flopex_http_request_duration_seconds",
    "HTTP request latency",
    ["endpoint", "method", "status", "profile"],
    buckets=_FAST,
)
QUOTE_LATENCY = Histogram(
    "flopex_quote_duration_seconds",
    "Quote board check (ping) latency",
    ["provider", "outcome"],
    buckets=_FAST,
)
PROVIDER_LATENCY = Histogram(
    "flopex_provider_execution_duration_seconds",
    "Provider execution latency",
    ["provider", "outcome"],
    buckets=_FAST,
)
PROVIDER_ERRORS = Counter(
    "flopex_provider_errors_total", "Failed provider executions", ["provider", "kind"]
)
JOBS_FINISHED = Counter("flopex_jobs_finished_total", "Jobs by final status", ["status", "code"])
WALLET_CAPTURES = Counter("flopex_wallet_captures_total", "Wallet captures")
WALLET_CAPTURED_MICROS = Counter("flopex_wallet_captured_micros_total", "Micro-USD captured")
# Streams the web is relaying now (summed over its live processes), and how relays ended:
# `ended` (the terminal event was sent), `client_left`, `error` (a fault of ours).
STREAMS_OPEN = Gauge(
    "flopex_streams_open", "SSE streams being relayed", multiprocess_mode="livesum"
)
STREAMS_CLOSED = Counter("flopex_streams_closed_total", "SSE relays that ended", ["how"])

QUEUES = ("fast", "balanced", "economy")


class QueueDepthCollector(Collector):
    """Messages waiting in each Celery queue, read from the broker at scrape time."""

    def __init__(self, get_client) -> None:  # type: ignore[no-untyped-def]
        self._get_client = get_client

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily(
            "flopex_queue_depth", "Messages waiting per queue", labels=["queue"]
        )
        try:
            client = self._get_client()
            pipe = client.pipeline(transaction=False)
            for queue in QUEUES:
                pipe.llen(queue)
            for queue, depth in zip(QUEUES, pipe.execute(), strict=True):
                family.add_metric([queue], depth)
        except Exception:  # a scrape must never fail because the broker is down
            pass
        yield family


def host_registry() -> CollectorRegistry:
    """The series an endpoint of this process serves: with ``PROMETHEUS_MULTIPROC_DIR``, every
    file in that directory (all processes of the host, dead ones included, so counters never go
    back); otherwise this process's own registry."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return registry
    return REGISTRY


def render(get_client) -> tuple[bytes, str]:  # type: ignore[no-untyped-def]
    """The web's /metrics: the host's series and the broker's queue depths."""
    extra = CollectorRegistry()
    extra.register(QueueDepthCollector(get_client))
    return generate_latest(host_registry()) + generate_latest(extra), CONTENT_TYPE_LATEST


def serve_worker_metrics(port: int, host: str) -> WSGIServer:
    """Serves the host's series (``host_registry``) on ``host:port`` from a daemon thread of
    this process, for hosts that run Celery workers and no web process. Queue depths are left
    out: they are one broker-wide value that every web /metrics already exports, and a scrape
    of a worker should not depend on the broker answering. Raises OSError if the port is taken.
    """
    server, _ = start_http_server(port, addr=host, registry=host_registry())
    return server


def job_finished(status: str, error_code: str | None) -> None:
    """Counts a job that reached its final state. Called once per job, after the commit that
    made the state final: the job's version fence lets only one writer make it final."""
    JOBS_FINISHED.labels(status, error_code or "").inc()


# Final states written in a transaction the caller commits (a cancellation): counted when that
# transaction commits, never if it rolls back, whichever caller commits it.
_FINISHED_ON_COMMIT = "flopex_jobs_finished_on_commit"


def job_finished_on_commit(session: Session, status: str, error_code: str | None) -> None:
    session.info.setdefault(_FINISHED_ON_COMMIT, []).append((status, error_code))


@event.listens_for(Session, "after_commit")
def _count_committed(session: Session) -> None:
    # A released savepoint is not a commit yet: its outer transaction may still roll back.
    if session.in_nested_transaction():
        return
    for status, error_code in session.info.pop(_FINISHED_ON_COMMIT, ()):
        job_finished(status, error_code)


@event.listens_for(Session, "after_transaction_end")
def _drop_uncommitted(session: Session, transaction: SessionTransaction) -> None:
    # Runs after _count_committed on a commit (nothing left then); on a rollback or a close
    # without commit, the final state was never written, so it is not counted.
    if transaction.parent is None:
        session.info.pop(_FINISHED_ON_COMMIT, None)


def mark_process_dead(pid: int) -> None:
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid)
