"""One Redis connection pool per process (re-created after a fork)."""

from __future__ import annotations

import os
from urllib.parse import urlsplit

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
            # One per open request at most (a sync wait, a stream), of up to 1000 per gevent
            # worker (config/gunicorn.conf.py); Redis accepts 10,000 clients by default.
            max_connections=2048,
        )
        _pid = os.getpid()
    return _client


_probes: dict[tuple[str, int], redis.Redis] = {}
_PROBE_TIMEOUT_S = 2.0


def probe_client(url: str) -> redis.Redis:
    """A client for checks that must answer quickly whatever Redis does (/readyz, the queue
    depth at scrape time): every operation gives up after two seconds. The main client cannot:
    its reads block for as long as a synchronous request may wait."""
    key = (url, os.getpid())
    client = _probes.get(key)
    if client is None:
        client = redis.Redis.from_url(
            url,
            decode_responses=True,
            socket_connect_timeout=_PROBE_TIMEOUT_S,
            socket_timeout=_PROBE_TIMEOUT_S,
            max_connections=8,
        )
        _probes[key] = client
    return client


def is_redis_url(url: str) -> bool:
    """A Redis URL (the broker may be configured as anything kombu supports)."""
    return urlsplit(url).scheme in ("redis", "rediss")


def reset_redis() -> None:
    global _client
    _client = None
    _probes.clear()
