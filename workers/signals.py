"""Worker process hooks: never share database or Redis sockets across a fork."""

from __future__ import annotations

from celery.signals import worker_process_init

from app.db import dispose_engine
from app.redis_client import reset_redis


@worker_process_init.connect
def _fresh_connections(**_: object) -> None:
    dispose_engine()
    reset_redis()
