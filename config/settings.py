"""Settings read from the environment, each with a documented default.

Every knob lives here so that no module reads ``os.environ`` on the request path. ``get_settings()``
is cached per process; tests that change the environment call ``get_settings.cache_clear()``.
The table in README.md mirrors this file.

Every value is parsed and range-checked in ``Settings.from_env``, which every process (web,
worker, beat, the ``flopex`` CLI) runs before doing any work: a malformed or out-of-range value
stops the process with a ``ValueError`` that names the variable, the form it expects and what it
got, instead of a bare parse error at start-up or a wrong charge later.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from functools import lru_cache
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROFILES = ("economy", "balanced", "fast")

# What FLOPEX_WEBHOOK_SECRET falls back to when unset or empty; create_app() (web, worker, beat)
# warns whenever the effective secret is this one: anyone who reads this file can forge a webhook
# signed with it.
DEV_WEBHOOK_SECRET = "dev-only-webhook-secret"

# The levels that every consumer of LOG_LEVEL understands: our JSON logging, Celery's `-l`
# (the Procfile passes LOG_LEVEL there) and gunicorn's loglevel. Aliases such as WARN or FATAL
# are left out because not all three accept them.
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")

# Job.markup is a VARCHAR(16): a markup written with more characters would be accepted here and
# then make every job's INSERT fail on PostgreSQL.
_MARKUP_MAX_CHARS = 16


def _env(name: str, default: str) -> str:
    # Empty counts as unset, so `FOO=` in an env file means "use the default".
    value = os.environ.get(name)
    return default if value is None or value == "" else value


def _invalid(name: str, expected: str, raw: str) -> ValueError:
    return ValueError(f"{name} must be {expected}, got {raw!r}")


def _int(name: str, default: int, *, minimum: int, what: str = "a whole number") -> int:
    """A whole number of at least ``minimum`` (``what`` names the unit in the error)."""
    raw = _env(name, str(default))
    expected = f"{what}, {minimum} or more"
    try:
        value = int(raw)
    except ValueError:
        raise _invalid(name, expected, raw) from None
    if value < minimum:
        raise _invalid(name, expected, raw)
    return value


def _seconds(name: str, default: float, *, zero_means: str | None = None) -> float:
    """A finite duration in seconds, above 0; 0 as well when ``zero_means`` says what it does
    (the settings that document 0 as "disables")."""
    raw = _env(name, str(default))
    expected = (
        f"a number of seconds, 0 or more (0 {zero_means})"
        if zero_means
        else "a number of seconds above 0"
    )
    try:
        value = float(raw)
    except ValueError:
        raise _invalid(name, expected, raw) from None
    # float() also accepts 'inf' and 'nan': neither is a usable timeout or interval.
    if not math.isfinite(value) or value < 0 or (value == 0 and not zero_means):
        raise _invalid(name, expected, raw)
    return value


def _fraction(name: str, default: float) -> float:
    """A share between 0 and 1 inclusive."""
    raw = _env(name, str(default))
    expected = "a number from 0 to 1"
    try:
        value = float(raw)
    except ValueError:
        raise _invalid(name, expected, raw) from None
    if not 0 <= value <= 1:  # also refuses nan
        raise _invalid(name, expected, raw)
    return value


def _markup(name: str, default: str) -> Decimal:
    """A fraction of provider cost, 0 <= markup < 1. 1 itself is refused: it would be a 100 %
    markup (double the provider cost), far more likely a typo for 1 % than a decision, the same
    mistake as 15 meant as 15 % (which charged 16 times the cost)."""
    raw = _env(name, default)
    expected = "a decimal fraction of at least 0 and below 1 (0.15 = 15 %)"
    try:
        value = Decimal(raw)
    except InvalidOperation:
        raise _invalid(name, expected, raw) from None
    # is_finite() first: comparing a NaN Decimal raises InvalidOperation.
    if not value.is_finite() or not 0 <= value < 1:
        raise _invalid(name, expected, raw)
    if len(str(value)) > _MARKUP_MAX_CHARS:
        raise _invalid(name, f"written in at most {_MARKUP_MAX_CHARS} characters", raw)
    return value


_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def _flag(name: str, default: bool) -> bool:
    """On or off. Anything else is an error, not off: `FLOPEX_WEBHOOK_ALLOW_PRIVATE=true` read
    as off (it once was) would refuse every loopback webhook of a developer's setup silently."""
    raw = _env(name, "1" if default else "0")
    value = raw.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise _invalid(name, "1 or 0 (true/false, yes/no, on/off)", raw)


def _weights(name: str, default: str) -> tuple[Decimal, Decimal, Decimal]:
    """Three weights, each 0 or more, not all 0 (all 0 would rank every provider the same)."""
    raw = _env(name, default)
    expected = "three numbers, each 0 or more and not all 0, as cost,latency,reliability"
    try:
        values = tuple(Decimal(part.strip()) for part in raw.split(","))
    except InvalidOperation:
        raise _invalid(name, expected, raw) from None
    if len(values) != 3 or any(not v.is_finite() or v < 0 for v in values) or not any(values):
        raise _invalid(name, expected, raw)
    return values[0], values[1], values[2]


def _choice(name: str, default: str, choices: tuple[str, ...], *, fold_case: bool = False) -> str:
    raw = _env(name, default)
    value = raw.strip().upper() if fold_case else raw
    if value not in choices:
        shown = [c.lower() for c in choices] if fold_case else list(choices)
        raise _invalid(name, "one of " + ", ".join(shown), raw)
    return value


def _database_url(url: str) -> str:
    """PostgreSQL URLs as platforms hand them out (``postgres://``, Heroku's; ``postgresql://``
    with no driver, which SQLAlchemy 2.1 maps to psycopg 3, not installed) name psycopg2, the
    driver this project ships with."""
    for scheme in ("postgres://", "postgresql://"):
        if url.startswith(scheme):
            return "postgresql+psycopg2://" + url[len(scheme) :]
    return url


def _optional_port(name: str) -> int | None:
    """A TCP port, or None when the variable is unset or empty (the feature is off)."""
    if _env(name, "") == "":
        return None
    what = "a TCP port (leave it unset to turn it off)"
    port = _int(name, 0, minimum=1, what=what)
    if port > 65535:
        raise _invalid(name, f"{what}, 65535 or less", _env(name, ""))
    return port


@dataclass(frozen=True)
class ProfilePolicy:
    """What a performance profile sets besides the ranking rule."""

    # How long a board refresh's ping may take before the provider counts as not live.
    quote_deadline_ms: int
    queue: str
    # A board entry older than this is refreshed before a job of this profile is routed on it.
    freshness_s: float


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
    quote_refresh_s: float
    catalog_cache_s: float
    auth_cache_s: float
    auth_failures_per_min: int
    trusted_proxy_hops: int
    webhook_secret: str
    webhook_allow_private: bool
    webhook_backoff_s: float
    job_deadline_s: float
    explore_rate: float
    rate_limit_burst: int
    log_level: str
    # The Celery worker's own /metrics listener (workers/signals.py); None: not served.
    worker_metrics_port: int | None = None
    worker_metrics_host: str = "127.0.0.1"
    # The console's session cookie (app/console/): its signing key (empty: derived from the
    # webhook secret) and whether it is sent over HTTPS only.
    console_secret: str = ""
    console_cookie_secure: bool = False
    # Streaming (docs/api.md, "Streaming"): how long a job's events are kept after its last
    # one, the most a job's event stream holds, the keep-alive interval, and each web
    # process's Redis connections for relaying streams (one per open stream).
    stream_events_ttl_s: int = 600
    stream_max_events: int = 131_072
    stream_keepalive_s: float = 15.0
    stream_redis_connections: int = 1024
    profiles: dict[str, ProfilePolicy] = field(default_factory=dict)

    @classmethod
    def from_env(cls) -> Settings:
        """Every setting parsed and range-checked here, in one place (see the module docstring).
        Durations are above 0 unless 0 has a documented meaning; counts of things that must
        exist (pool connections, bytes, characters, failures before the breaker opens) are 1 or
        more; retries and the rate limits may be 0."""
        redis_url = _env("REDIS_URL", "redis://127.0.0.1:6379/0")
        worker_metrics_port = _optional_port("FLOPEX_WORKER_METRICS_PORT")
        return cls(
            database_url=_database_url(
                _env("DATABASE_URL", f"sqlite:///{ROOT / 'var' / 'flopex.sqlite3'}")
            ),
            redis_url=redis_url,
            broker_url=_env("CELERY_BROKER_URL", redis_url),
            catalog_path=Path(_env("FLOPEX_CATALOG", str(ROOT / "config" / "catalog.dev.toml"))),
            markup=_markup("FLOPEX_MARKUP", "0.15"),
            sync_timeout_s=_seconds("FLOPEX_SYNC_TIMEOUT_S", 60.0),
            provider_connect_timeout_s=_seconds("FLOPEX_PROVIDER_CONNECT_TIMEOUT_S", 2.0),
            provider_read_timeout_s=_seconds("FLOPEX_PROVIDER_READ_TIMEOUT_S", 30.0),
            # 0 is a valid choice: one attempt per provider, then the fallback.
            provider_retries=_int("FLOPEX_PROVIDER_RETRIES", 2, minimum=0),
            max_body_bytes=_int(
                "FLOPEX_MAX_BODY_BYTES", 1_048_576, minimum=1, what="a whole number of bytes"
            ),
            max_input_chars=_int(
                "FLOPEX_MAX_INPUT_CHARS", 400_000, minimum=1, what="a whole number of characters"
            ),
            max_metadata_bytes=_int(
                "FLOPEX_MAX_METADATA_BYTES", 16_384, minimum=1, what="a whole number of bytes"
            ),
            max_customer_ref_len=_int(
                "FLOPEX_MAX_CUSTOMER_REF_LEN", 255, minimum=1, what="a whole number of characters"
            ),
            balanced_weights=_weights("FLOPEX_BALANCED_WEIGHTS", "0.4,0.4,0.2"),
            health_window_s=_int(
                "FLOPEX_HEALTH_WINDOW_S", 300, minimum=1, what="a whole number of seconds"
            ),
            # The engine opens this many connections plus as many overflow (app/db.py).
            db_pool_size=_int("FLOPEX_DB_POOL_SIZE", 10, minimum=1),
            # A grace of 0 would count a job as stuck the moment it changed state, and the
            # sweeper would re-drive jobs that are progressing normally.
            sweep_grace_s=_seconds("FLOPEX_SWEEP_GRACE_S", 15.0),
            sweep_quoting_grace_s=_seconds("FLOPEX_SWEEP_QUOTING_GRACE_S", 3.0),
            # A beat schedule of 0 s would send sweeps back to back.
            sweep_interval_s=_seconds("FLOPEX_SWEEP_INTERVAL_S", 5.0),
            # 0 would expire every Idempotency-Key record at once: retries would run twice.
            idempotency_ttl_s=_int(
                "FLOPEX_IDEMPOTENCY_TTL_S", 86_400, minimum=1, what="a whole number of seconds"
            ),
            # A cap, not a timeout: 0 makes `Prefer: wait` and `?wait=` answer at once
            # (app/jobs/notify.py never blocks for less than 10 ms, so 0 cannot hang).
            max_wait_s=_seconds("FLOPEX_MAX_WAIT_S", 60.0, zero_means="turns long polls off"),
            # 0 refuses every request of every account without its own limit (app/ratelimit.py).
            rate_limit_per_min=_int(
                "FLOPEX_RATE_LIMIT_PER_MIN", 6000, minimum=0, what="a whole number of requests"
            ),
            # The limiter treats a burst below 1 as 1 (app/ratelimit.py): refuse the 0 that
            # looks like "no requests" but is not.
            rate_limit_burst=_int(
                "FLOPEX_RATE_LIMIT_BURST", 200, minimum=1, what="a whole number of requests"
            ),
            # A threshold of 0 would behave as 1 (the breaker opens at fails >= threshold).
            breaker_threshold=_int(
                "FLOPEX_BREAKER_THRESHOLD", 5, minimum=1, what="a whole number of failures"
            ),
            breaker_window_s=_seconds("FLOPEX_BREAKER_WINDOW_S", 60.0),
            # A cool-down of 0 would close an opened breaker at once: no protection at all.
            breaker_cooldown_s=_seconds("FLOPEX_BREAKER_COOLDOWN_S", 30.0),
            quote_refresh_s=_seconds("FLOPEX_QUOTE_REFRESH_S", 1.0),
            catalog_cache_s=_seconds("FLOPEX_CATALOG_CACHE_S", 5.0, zero_means="disables"),
            auth_cache_s=_seconds("FLOPEX_AUTH_CACHE_S", 2.0, zero_means="disables"),
            # 0 disables the guard (app/api/auth.py only consults it when above 0).
            auth_failures_per_min=_int(
                "FLOPEX_AUTH_FAILURES_PER_MIN", 30, minimum=0, what="a whole number of failures"
            ),
            trusted_proxy_hops=_int(
                "FLOPEX_TRUSTED_PROXY_HOPS", 0, minimum=0, what="a count of proxies"
            ),
            webhook_secret=_env("FLOPEX_WEBHOOK_SECRET", DEV_WEBHOOK_SECRET),
            webhook_allow_private=_flag("FLOPEX_WEBHOOK_ALLOW_PRIVATE", False),
            # 0 would spend every retry of a failing delivery within milliseconds.
            webhook_backoff_s=_seconds("FLOPEX_WEBHOOK_BACKOFF_S", 1.0),
            # Every attempt of a job shares it: below the sync wait, so that a synchronous
            # caller hears the outcome even when every provider hangs.
            job_deadline_s=_seconds("FLOPEX_JOB_DEADLINE_S", 50.0),
            explore_rate=_fraction("FLOPEX_EXPLORE_RATE", 0.05),
            log_level=_choice("LOG_LEVEL", "INFO", LOG_LEVELS, fold_case=True),
            worker_metrics_port=worker_metrics_port,
            # Loopback unless told otherwise: setting only the port must not publish the
            # worker's series beyond the host (docs/operations.md, "Metrics").
            worker_metrics_host=_env("FLOPEX_WORKER_METRICS_HOST", "127.0.0.1"),
            console_secret=_env("FLOPEX_CONSOLE_SECRET", ""),
            console_cookie_secure=_flag("FLOPEX_CONSOLE_COOKIE_SECURE", False),
            stream_events_ttl_s=_int(
                "FLOPEX_STREAM_EVENTS_TTL_S", 600, minimum=1, what="a whole number of seconds"
            ),
            stream_max_events=_int(
                "FLOPEX_STREAM_MAX_EVENTS", 131_072, minimum=16, what="a whole number of events"
            ),
            stream_keepalive_s=_seconds("FLOPEX_STREAM_KEEPALIVE_S", 15.0),
            stream_redis_connections=_int("FLOPEX_STREAM_REDIS_CONNECTIONS", 1024, minimum=1),
            profiles={
                "fast": ProfilePolicy(
                    _deadline_ms("FAST", 300), "fast", _seconds("FLOPEX_FRESHNESS_S_FAST", 2.0)
                ),
                "balanced": ProfilePolicy(
                    _deadline_ms("BALANCED", 800),
                    "balanced",
                    _seconds("FLOPEX_FRESHNESS_S_BALANCED", 5.0),
                ),
                "economy": ProfilePolicy(
                    _deadline_ms("ECONOMY", 2000),
                    "economy",
                    _seconds("FLOPEX_FRESHNESS_S_ECONOMY", 15.0),
                ),
            },
        )


def _deadline_ms(profile: str, default: int) -> int:
    # A deadline of 0 has passed before any provider is pinged: every refresh would find the
    # provider not live (app/providers/board.py).
    return _int(
        f"FLOPEX_QUOTE_DEADLINE_MS_{profile}",
        default,
        minimum=1,
        what="a whole number of milliseconds",
    )


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings.from_env()
