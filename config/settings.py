"""Settings read from the environment, each with a documented default.

Every knob lives here so that no module reads ``os.environ`` on the request path. ``get_settings()``
is cached per process; tests that change the environment call ``get_settings.cache_clear()``.
The table in README.md mirrors this file.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from decimal import Decimal
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from app.providers.breaker import BreakerConfig

ROOT = Path(__file__).resolve().parent.parent
PROFILES = ("economy", "balanced", "fast")


def _env(name: str, default: str) -> str:
    value = os.environ.get(name)
    return default if value is None or value == "" else value


def _int(name: str, default: int) -> int:
    return int(_env(name, str(default)))


def _float(name: str, default: float) -> float:
    return float(_env(name, str(default)))


def _optional_port(name: str) -> int | None:
    """A TCP port, or None when the variable is unset or empty (the feature is off)."""
    value = _env(name, "")
    if value == "":
        return None
    port = int(value)
    if not 1 <= port <= 65535:
        raise ValueError(f"{name} is a TCP port, 1 to 65535 (leave it unset to turn it off)")
    return port


@dataclass(frozen=True)
class ProfilePolicy:
    """What a performance profile sets besides the ranking rule."""

    quote_deadline_ms: int
    queue: str
    # Celery message priority inside the Redis transport: lower runs first.
    priority: int


@dataclass(frozen=True)
class Settings:
    database_url: str
    redis_url: str
    broker_url: str
    catalog_path: Path
    markup: Decimal
    sync_timeout_s: float
    provider_connect_timeout_s: float
    provider_read_timeout_s: float
    provider_retries: int
    max_body_bytes: int
    max_input_chars: int
    max_metadata_bytes: int
    max_customer_ref_len: int
    balanced_weights: tuple[Decimal, Decimal, Decimal]
    health_window_s: int
    db_pool_size: int
    sweep_grace_s: float
    sweep_quoting_grace_s: float
    sweep_interval_s: float
    idempotency_ttl_s: int
    max_wait_s: float
    rate_limit_per_min: int
    breaker_threshold: int
    breaker_window_s: float
    breaker_cooldown_s: float
    probe_interval_s: float
    catalog_cache_s: float
    auth_cache_s: float
    auth_failures_per_min: int
    trusted_proxy_hops: int
    webhook_secret: str
    webhook_allow_private: bool
    webhook_backoff_s: float
    quote_source: str
    rate_limit_burst: int
    # The Celery worker's own /metrics listener (workers/signals.py); None: not served.
    worker_metrics_port: int | None = None
    worker_metrics_host: str = "127.0.0.1"
    profiles: dict[str, ProfilePolicy] = field(default_factory=dict)

    @property
    def breaker(self) -> BreakerConfig:
        from app.providers.breaker import BreakerConfig

        return BreakerConfig(self.breaker_threshold, self.breaker_window_s, self.breaker_cooldown_s)

    @classmethod
    def from_env(cls) -> Settings:
        redis_url = _env("REDIS_URL", "redis://127.0.0.1:6379/0")
        weights = tuple(
            Decimal(w.strip()) for w in _env("FLOPEX_BALANCED_WEIGHTS", "0.4,0.4,0.2").split(",")
        )
        if _env("FLOPEX_QUOTE_SOURCE", "live") not in ("live", "probe"):
            raise ValueError("FLOPEX_QUOTE_SOURCE is live or probe")
        if _int("FLOPEX_TRUSTED_PROXY_HOPS", 0) < 0:
            raise ValueError("FLOPEX_TRUSTED_PROXY_HOPS is a count of proxies, 0 or more")
        worker_metrics_port = _optional_port("FLOPEX_WORKER_METRICS_PORT")
        if len(weights) != 3:
            raise ValueError(
                "FLOPEX_BALANCED_WEIGHTS needs three numbers: cost,latency,reliability"
            )
        return cls(
            database_url=_env("DATABASE_URL", f"sqlite:///{ROOT / 'var' / 'flopex.sqlite3'}"),
            redis_url=redis_url,
            broker_url=_env("CELERY_BROKER_URL", redis_url),
            catalog_path=Path(_env("FLOPEX_CATALOG", str(ROOT / "config" / "catalog.dev.toml"))),
            markup=Decimal(_env("FLOPEX_MARKUP", "0.15")),
            sync_timeout_s=_float("FLOPEX_SYNC_TIMEOUT_S", 60.0),
            provider_connect_timeout_s=_float("FLOPEX_PROVIDER_CONNECT_TIMEOUT_S", 2.0),
            provider_read_timeout_s=_float("FLOPEX_PROVIDER_READ_TIMEOUT_S", 30.0),
            provider_retries=_int("FLOPEX_PROVIDER_RETRIES", 2),
            max_body_bytes=_int("FLOPEX_MAX_BODY_BYTES", 1_048_576),
            max_input_chars=_int("FLOPEX_MAX_INPUT_CHARS", 400_000),
            max_metadata_bytes=_int("FLOPEX_MAX_METADATA_BYTES", 16_384),
            max_customer_ref_len=_int("FLOPEX_MAX_CUSTOMER_REF_LEN", 255),
            balanced_weights=weights,  # type: ignore[arg-type]
            health_window_s=_int("FLOPEX_HEALTH_WINDOW_S", 300),
            db_pool_size=_int("FLOPEX_DB_POOL_SIZE", 10),
            sweep_grace_s=_float("FLOPEX_SWEEP_GRACE_S", 15.0),
            sweep_quoting_grace_s=_float("FLOPEX_SWEEP_QUOTING_GRACE_S", 3.0),
            sweep_interval_s=_float("FLOPEX_SWEEP_INTERVAL_S", 5.0),
            idempotency_ttl_s=_int("FLOPEX_IDEMPOTENCY_TTL_S", 86_400),
            max_wait_s=_float("FLOPEX_MAX_WAIT_S", 60.0),
            rate_limit_per_min=_int("FLOPEX_RATE_LIMIT_PER_MIN", 6000),
            rate_limit_burst=_int("FLOPEX_RATE_LIMIT_BURST", 200),
            breaker_threshold=_int("FLOPEX_BREAKER_THRESHOLD", 5),
            breaker_window_s=_float("FLOPEX_BREAKER_WINDOW_S", 60.0),
            breaker_cooldown_s=_float("FLOPEX_BREAKER_COOLDOWN_S", 30.0),
            probe_interval_s=_float("FLOPEX_PROBE_INTERVAL_S", 10.0),
            catalog_cache_s=_float("FLOPEX_CATALOG_CACHE_S", 5.0),
            auth_cache_s=_float("FLOPEX_AUTH_CACHE_S", 2.0),
            auth_failures_per_min=_int("FLOPEX_AUTH_FAILURES_PER_MIN", 30),
            trusted_proxy_hops=_int("FLOPEX_TRUSTED_PROXY_HOPS", 0),
            webhook_secret=_env("FLOPEX_WEBHOOK_SECRET", "dev-only-webhook-secret"),
            webhook_allow_private=_env("FLOPEX_WEBHOOK_ALLOW_PRIVATE", "0") == "1",
            webhook_backoff_s=_float("FLOPEX_WEBHOOK_BACKOFF_S", 1.0),
            quote_source=_env("FLOPEX_QUOTE_SOURCE", "live"),
            worker_metrics_port=worker_metrics_port,
            # Loopback unless told otherwise: setting only the port must not publish the
            # worker's series beyond the host (docs/operations.md, "Metrics").
            worker_metrics_host=_env("FLOPEX_WORKER_METRICS_HOST", "127.0.0.1"),
            profiles={
                "fast": ProfilePolicy(_int("FLOPEX_QUOTE_DEADLINE_MS_FAST", 300), "fast", 0),
                "balanced": ProfilePolicy(
                    _int("FLOPEX_QUOTE_DEADLINE_MS_BALANCED", 800), "balanced", 3
                ),
                "economy": ProfilePolicy(
                    _int("FLOPEX_QUOTE_DEADLINE_MS_ECONOMY", 2000), "economy", 6
                ),
            },
        )


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings.from_env()
