"""One Redis connection pool per process (re-created after a fork)."""

from __future__ import annotations

import os

import redis

from config.settings import get_settings

_client: redis.Redis | None = None
_pid: int | None = None


def get_redis() -> redis.Redis:
    global _client, _pid
    if _client is None or _pid != os.getpid():
        _client = redis.Redis.from_url(
            get_settings().redis_url,
            decode_responses=True,
            health_check_interval=30,
            socket_connect_timeout=5,
            # Blocking reads (BLPOP for sync waits and long polls) must outlive their own timeout.
            socket_timeout=max(get_settings().sync_timeout_s, get_settings().max_wait_s) + 30,
            max_connections=256,
        )
        _pid = os.getpid()
    return _client


def reset_redis() -> None:
    global _client
    _client = None
