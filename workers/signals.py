"""Worker process hooks: JSON logging, the request id of each task, fresh connections per
process, and metrics files cleaned up on exit."""

from __future__ import annotations

import os
from typing import Any

from celery.signals import (
    setup_logging,
    task_postrun,
    task_prerun,
    worker_process_init,
    worker_shutdown,
)

from app.db import dispose_engine
from app.logs import HEADER_JOB_ID, HEADER_REQUEST_ID, configure_logging, job_id_var, request_id_var
from app.metrics import mark_process_dead
from app.redis_client import reset_redis


@setup_logging.connect
def _logging(loglevel: Any = None, **_: Any) -> None:
    # Celery passes the -l level (as a number or a name); LOG_LEVEL applies when it passes none.
    configure_logging(loglevel if loglevel else os.environ.get("LOG_LEVEL", "INFO"))


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


@worker_shutdown.connect
def _metrics_cleanup(**_: Any) -> None:
    mark_process_dead(os.getpid())
