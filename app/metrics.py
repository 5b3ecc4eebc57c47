"""Prometheus metrics, safe under many processes.

With ``PROMETHEUS_MULTIPROC_DIR`` set (in the environment of every process of a host, before
this module is imported: docs/operations.md; ``make run`` leaves it unset, so its /metrics shows
the web process's own series only), every gunicorn worker and Celery worker on a host writes to that
directory and ``/metrics`` on any web process aggregates them all. Without it, each process
exposes only its own.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
    os.makedirs(os.environ["PROMETHEUS_MULTIPROC_DIR"], exist_ok=True)

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import REGISTRY, Collector

_FAST = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)

REQUEST_LATENCY = Histogram(
    "flopex_http_request_duration_seconds",
    "HTTP request latency",
    ["endpoint", "method", "status", "profile"],
    buckets=_FAST,
)
QUOTE_LATENCY = Histogram(
    "flopex_quote_duration_seconds",
    "Quote (live ping) latency",
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


def render(get_client) -> tuple[bytes, str]:  # type: ignore[no-untyped-def]
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
    else:
        registry = REGISTRY
    extra = CollectorRegistry()
    extra.register(QueueDepthCollector(get_client))
    return generate_latest(registry) + generate_latest(extra), CONTENT_TYPE_LATEST


def mark_process_dead(pid: int) -> None:
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid)
