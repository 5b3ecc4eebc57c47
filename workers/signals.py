"""Worker process hooks: JSON logging, the request id of each task, fresh connections per
process, the optional metrics listener (FLOPEX_WORKER_METRICS_PORT), and metrics files cleaned
up on exit."""

from __future__ import annotations

import logging
import os
from typing import Any
from wsgiref.simple_server import WSGIServer

from celery.signals import (
    setup_logging,
    task_postrun,
    task_prerun,
    worker_process_init,
    worker_process_shutdown,
    worker_ready,
    worker_shutdown,
)

from app.infra.db import dispose_engine
from app.infra.logs import (
    HEADER_JOB_ID,
    HEADER_REQUEST_ID,
    configure_logging,
    job_id_var,
    request_id_var,
)
from app.infra.metrics import mark_process_dead, serve_worker_metrics
from app.infra.redis_client import get_redis, reset_redis
from app.jobs.liveness import Heartbeat
from config.settings import get_settings

log = logging.getLogger(__name__)

# The metrics listener of this process, by pid: started at most once per process.
_metrics_servers: dict[int, WSGIServer] = {}
# This process's liveness heartbeat (app/jobs/liveness.py), by pid: one per process.
_heartbeats: dict[int, Heartbeat] = {}


def start_heartbeat() -> Heartbeat:
    pid = os.getpid()
    if pid not in _heartbeats:
        _heartbeats[pid] = Heartbeat(get_redis).start()
    return _heartbeats[pid]


@worker_ready.connect
def _heartbeat_main(**_: Any) -> None:
    # The process whose pool threads run the tasks (--pool threads, the Procfile's).
    start_heartbeat()


@worker_process_init.connect
def _heartbeat_child(**_: Any) -> None:
    # A prefork pool child runs tasks itself: it beats for itself.
    start_heartbeat()


@setup_logging.connect
def _logging(loglevel: Any = None, **_: Any) -> None:
    # Celery passes the -l level (as a number or a name); LOG_LEVEL applies when it passes none
    # (read through the settings, which refuse a level name logging does not know).
    configure_logging(loglevel if loglevel else get_settings().log_level)


@worker_process_init.connect
def _fresh_connections(**_: object) -> None:
    dispose_engine()
    reset_redis()


@task_prerun.connect
def _bind_ids(task: Any = None, **_: Any) -> None:
    request = getattr(task, "request", None)
    request_id_var.set(getattr(request, HEADER_REQUEST_ID, None))
    job_id_var.set(getattr(request, HEADER_JOB_ID, None))


@task_postrun.connect
def _unbind_ids(**_: Any) -> None:
    request_id_var.set(None)
    job_id_var.set(None)


@worker_ready.connect
def _serve_metrics(**_: Any) -> WSGIServer | None:
    """Starts the worker's metrics listener when FLOPEX_WORKER_METRICS_PORT is set.

    worker_ready is sent once, in the worker's main process only (never in a prefork pool
    child, and never by `celery beat`), once the worker consumes: the listener answering means
    the worker started. A port already taken (another worker process on this host was told
    the same port) is logged and the worker runs on without it: with PROMETHEUS_MULTIPROC_DIR
    the process that holds the port already serves the whole host, and a worker must not stop
    taking jobs over its metrics."""
    settings = get_settings()
    if settings.worker_metrics_port is None:
        return None
    pid = os.getpid()
    if pid in _metrics_servers:
        return _metrics_servers[pid]
    try:
        server = serve_worker_metrics(settings.worker_metrics_port, settings.worker_metrics_host)
    except OSError:
        log.exception(
            "worker metrics: cannot listen on %s:%s; this worker serves no metrics",
            settings.worker_metrics_host,
            settings.worker_metrics_port,
        )
        return None
    _metrics_servers[pid] = server
    log.info(
        "worker metrics on http://%s:%s/metrics",
        settings.worker_metrics_host,
        server.server_port,
    )
    return server


@worker_shutdown.connect
def _metrics_cleanup(**_: Any) -> None:
    # The main process: with --pool threads the only one that writes metrics.
    mark_process_dead(os.getpid())


@worker_process_shutdown.connect
def _pool_child_metrics_cleanup(**_: Any) -> None:
    # A prefork pool child, in the child itself just before it exits: its own pid.
    mark_process_dead(os.getpid())
