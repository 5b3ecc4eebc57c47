"""config/settings.py read through the environment: every malformed or out-of-range value is a
ValueError that names its variable and shows what it got, the documented defaults and 0 values
still load, and the processes that build settings (the web app, the worker's logging hook,
gunicorn's config file, the ``flopex`` CLI) report such an error instead of carrying on."""

from __future__ import annotations

import logging
import re
import runpy
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import pytest

from config.settings import DEV_WEBHOOK_SECRET, ROOT, Settings, get_settings

# Every variable Settings.from_env reads that the test session's conftest may have set: the
# defaults test removes them all.
SETTINGS_VARS = (
    "FLOPEX_MARKUP",
    "FLOPEX_SYNC_TIMEOUT_S",
    "FLOPEX_PROVIDER_CONNECT_TIMEOUT_S",
    "FLOPEX_PROVIDER_READ_TIMEOUT_S",
    "FLOPEX_PROVIDER_RETRIES",
    "FLOPEX_MAX_BODY_BYTES",
    "FLOPEX_MAX_INPUT_CHARS",
    "FLOPEX_MAX_METADATA_BYTES",
    "FLOPEX_MAX_CUSTOMER_REF_LEN",
    "FLOPEX_BALANCED_WEIGHTS",
    "FLOPEX_HEALTH_WINDOW_S",
    "FLOPEX_DB_POOL_SIZE",
    "FLOPEX_SWEEP_GRACE_S",
    "FLOPEX_SWEEP_QUOTING_GRACE_S",
    "FLOPEX_SWEEP_INTERVAL_S",
    "FLOPEX_IDEMPOTENCY_TTL_S",
    "FLOPEX_MAX_WAIT_S",
    "FLOPEX_RATE_LIMIT_PER_MIN",
    "FLOPEX_RATE_LIMIT_BURST",
    "FLOPEX_BREAKER_THRESHOLD",
    "FLOPEX_BREAKER_WINDOW_S",
    "FLOPEX_BREAKER_COOLDOWN_S",
    "FLOPEX_QUOTE_REFRESH_S",
    "FLOPEX_JOB_DEADLINE_S",
    "FLOPEX_EXPLORE_RATE",
    "FLOPEX_FRESHNESS_S_FAST",
    "FLOPEX_FRESHNESS_S_BALANCED",
    "FLOPEX_FRESHNESS_S_ECONOMY",
    "FLOPEX_CATALOG_CACHE_S",
    "FLOPEX_AUTH_CACHE_S",
    "FLOPEX_AUTH_FAILURES_PER_MIN",
    "FLOPEX_TRUSTED_PROXY_HOPS",
    "FLOPEX_WEBHOOK_SECRET",
    "FLOPEX_WEBHOOK_ALLOW_PRIVATE",
    "FLOPEX_WEBHOOK_BACKOFF_S",
    "FLOPEX_QUOTE_DEADLINE_MS_FAST",
    "FLOPEX_QUOTE_DEADLINE_MS_BALANCED",
    "FLOPEX_QUOTE_DEADLINE_MS_ECONOMY",
    "LOG_LEVEL",
)


@pytest.fixture(autouse=True)
def fresh_settings(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Each test reads the environment it sets; afterwards the cached settings are dropped again
    so that the next test (and monkeypatch's restored environment) is not served this test's."""
    get_settings.cache_clear()
    yield
    get_settings.cache_clear()


def load(monkeypatch: pytest.MonkeyPatch, **env: str) -> Settings:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    get_settings.cache_clear()
    return get_settings()


BAD_VALUES = [
    # The audit's cases: unparseable values used to fail without naming their variable.
    ("FLOPEX_MARKUP", "15%"),
    ("FLOPEX_BALANCED_WEIGHTS", "a,b,c"),
    ("FLOPEX_SYNC_TIMEOUT_S", "60s"),
    ("FLOPEX_DB_POOL_SIZE", "10.5"),
    # ... and values that parsed but were out of range.
    ("FLOPEX_MARKUP", "15"),  # meant as 15 %: charged 16 times the provider cost
    ("FLOPEX_MARKUP", "1"),  # 100 %: refused as the likelier typo for 1 %
    ("FLOPEX_MARKUP", "-0.1"),
    ("FLOPEX_MARKUP", "NaN"),
    ("FLOPEX_MARKUP", "0.12345678901234567"),  # longer than Job.markup's VARCHAR(16)
    ("FLOPEX_PROVIDER_RETRIES", "-1"),
    ("FLOPEX_BALANCED_WEIGHTS", "-0.4,0.4,0.2"),
    ("FLOPEX_BALANCED_WEIGHTS", "0,0,0"),
    ("FLOPEX_BALANCED_WEIGHTS", "0.5,0.5"),
    ("FLOPEX_BALANCED_WEIGHTS", "0.4,0.4,NaN"),
    ("FLOPEX_SYNC_TIMEOUT_S", "-5"),
    ("FLOPEX_SYNC_TIMEOUT_S", "0"),
    ("FLOPEX_SYNC_TIMEOUT_S", "inf"),
    ("FLOPEX_PROVIDER_CONNECT_TIMEOUT_S", "0"),
    ("FLOPEX_PROVIDER_READ_TIMEOUT_S", "nan"),
    ("FLOPEX_SWEEP_INTERVAL_S", "0"),
    ("FLOPEX_SWEEP_GRACE_S", "0"),
    ("FLOPEX_SWEEP_QUOTING_GRACE_S", "-1"),
    ("FLOPEX_QUOTE_REFRESH_S", "0"),
    ("FLOPEX_JOB_DEADLINE_S", "-1"),
    ("FLOPEX_EXPLORE_RATE", "1.5"),
    ("FLOPEX_EXPLORE_RATE", "nan"),
    ("FLOPEX_FRESHNESS_S_FAST", "0"),
    ("FLOPEX_BREAKER_WINDOW_S", "0"),
    ("FLOPEX_BREAKER_COOLDOWN_S", "0"),
    ("FLOPEX_BREAKER_THRESHOLD", "0"),
    ("FLOPEX_WEBHOOK_BACKOFF_S", "0"),
    ("FLOPEX_DB_POOL_SIZE", "0"),
    ("FLOPEX_MAX_BODY_BYTES", "0"),
    ("FLOPEX_MAX_INPUT_CHARS", "-1"),
    ("FLOPEX_MAX_METADATA_BYTES", "16k"),
    ("FLOPEX_MAX_CUSTOMER_REF_LEN", "0"),
    ("FLOPEX_HEALTH_WINDOW_S", "0"),
    ("FLOPEX_IDEMPOTENCY_TTL_S", "0"),
    ("FLOPEX_MAX_WAIT_S", "-1"),
    ("FLOPEX_AUTH_CACHE_S", "-1"),
    ("FLOPEX_CATALOG_CACHE_S", "forever"),
    ("FLOPEX_AUTH_FAILURES_PER_MIN", "-1"),
    ("FLOPEX_RATE_LIMIT_PER_MIN", "-1"),
    ("FLOPEX_RATE_LIMIT_BURST", "0"),
    ("FLOPEX_TRUSTED_PROXY_HOPS", "-1"),
    ("FLOPEX_TRUSTED_PROXY_HOPS", "one"),
    ("FLOPEX_QUOTE_DEADLINE_MS_FAST", "0"),
    ("FLOPEX_QUOTE_DEADLINE_MS_BALANCED", "0.8"),
    ("FLOPEX_QUOTE_DEADLINE_MS_ECONOMY", "-2000"),
    ("LOG_LEVEL", "verbose"),
]


@pytest.mark.parametrize(("name", "value"), BAD_VALUES)
def test_a_bad_value_is_a_value_error_naming_its_variable_and_the_value(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str
) -> None:
    with pytest.raises(ValueError) as caught:
        load(monkeypatch, **{name: value})
    message = str(caught.value)
    assert message.startswith(f"{name} must be "), message
    assert message.endswith(f"got {value!r}"), message


def test_the_markup_message_says_the_form_expected(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match=re.escape("decimal fraction")) as caught:
        load(monkeypatch, FLOPEX_MARKUP="15%")
    assert "0.15 = 15 %" in str(caught.value)


def test_every_default_loads_when_nothing_is_set(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in SETTINGS_VARS:
        monkeypatch.delenv(name, raising=False)
    settings = load(monkeypatch)

    assert settings.markup == Decimal("0.15")
    assert settings.sync_timeout_s == 60.0
    assert (settings.provider_connect_timeout_s, settings.provider_read_timeout_s) == (2.0, 30.0)
    assert settings.provider_retries == 2
    assert settings.balanced_weights == (Decimal("0.4"), Decimal("0.4"), Decimal("0.2"))
    assert settings.db_pool_size == 10
    assert (settings.max_body_bytes, settings.max_input_chars) == (1_048_576, 400_000)
    assert (settings.max_metadata_bytes, settings.max_customer_ref_len) == (16_384, 255)
    assert settings.health_window_s == 300
    assert (settings.sweep_interval_s, settings.sweep_grace_s) == (5.0, 15.0)
    assert settings.sweep_quoting_grace_s == 3.0
    assert settings.idempotency_ttl_s == 86_400
    assert settings.max_wait_s == 60.0
    assert (settings.rate_limit_per_min, settings.rate_limit_burst) == (6000, 200)
    assert (settings.breaker_threshold, settings.breaker_window_s) == (5, 60.0)
    assert settings.breaker_cooldown_s == 30.0
    assert (settings.quote_refresh_s, settings.job_deadline_s) == (1.0, 50.0)
    assert settings.explore_rate == 0.05
    assert (settings.catalog_cache_s, settings.auth_cache_s) == (5.0, 2.0)
    assert settings.auth_failures_per_min == 30
    assert settings.trusted_proxy_hops == 0
    assert settings.webhook_secret == DEV_WEBHOOK_SECRET
    assert settings.webhook_allow_private is False
    assert settings.webhook_backoff_s == 1.0
    assert settings.log_level == "INFO"
    assert {name: p.quote_deadline_ms for name, p in settings.profiles.items()} == {
        "fast": 300,
        "balanced": 800,
        "economy": 2000,
    }
    assert {name: p.freshness_s for name, p in settings.profiles.items()} == {
        "fast": 2.0,
        "balanced": 5.0,
        "economy": 15.0,
    }


def test_an_empty_value_means_the_default(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = load(
        monkeypatch,
        FLOPEX_MARKUP="",
        FLOPEX_DB_POOL_SIZE="",
        FLOPEX_SYNC_TIMEOUT_S="",
        LOG_LEVEL="",
    )
    assert settings.markup == Decimal("0.15")
    assert settings.db_pool_size == 10
    assert settings.sync_timeout_s == 60.0
    assert settings.log_level == "INFO"


def test_values_at_the_edges_of_their_ranges_load(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = load(
        monkeypatch,
        FLOPEX_MARKUP="0",
        FLOPEX_PROVIDER_RETRIES="0",
        FLOPEX_BALANCED_WEIGHTS=" 0 , 1 ,0",
        FLOPEX_SYNC_TIMEOUT_S="0.5",
        FLOPEX_DB_POOL_SIZE="1",
        FLOPEX_MAX_CUSTOMER_REF_LEN="1",
        FLOPEX_TRUSTED_PROXY_HOPS="1",
        FLOPEX_EXPLORE_RATE="0",
        FLOPEX_QUOTE_DEADLINE_MS_FAST="1",
        LOG_LEVEL="warning",
    )
    assert settings.markup == 0
    assert settings.provider_retries == 0
    assert settings.balanced_weights == (Decimal(0), Decimal(1), Decimal(0))
    assert settings.sync_timeout_s == 0.5
    assert settings.db_pool_size == 1
    assert settings.max_customer_ref_len == 1
    assert settings.trusted_proxy_hops == 1
    assert settings.explore_rate == 0
    assert settings.profiles["fast"].quote_deadline_ms == 1
    assert settings.log_level == "WARNING"

    assert load(monkeypatch, FLOPEX_MARKUP="0.9999").markup == Decimal("0.9999")


def test_the_documented_zeros_still_load(monkeypatch: pytest.MonkeyPatch) -> None:
    """0 disables the caches and the failed-key guard, turns long polls off, and (globally or
    per account) refuses every request: the README documents each, so each must load."""
    settings = load(
        monkeypatch,
        FLOPEX_AUTH_CACHE_S="0",
        FLOPEX_CATALOG_CACHE_S="0",
        FLOPEX_AUTH_FAILURES_PER_MIN="0",
        FLOPEX_MAX_WAIT_S="0",
        FLOPEX_RATE_LIMIT_PER_MIN="0",
    )
    assert settings.auth_cache_s == 0
    assert settings.catalog_cache_s == 0
    assert settings.auth_failures_per_min == 0
    assert settings.max_wait_s == 0
    assert settings.rate_limit_per_min == 0


def _create_app_logged(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> list[Any]:
    """create_app() as a web or worker process runs it (not testing), with the JSON logging
    setup replaced (it would take the root logger away from caplog); returns the levels it was
    asked to configure."""
    import app.logs
    from app import create_app

    levels: list[Any] = []
    monkeypatch.setattr(app.logs, "configure_logging", levels.append)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="app"):
        create_app()
    return levels


def _secret_warnings(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [
        r
        for r in caplog.records
        if r.levelno == logging.WARNING and "FLOPEX_WEBHOOK_SECRET" in r.getMessage()
    ]


def test_an_empty_webhook_secret_is_the_development_one_and_is_warned_about(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("FLOPEX_WEBHOOK_SECRET", "")
    get_settings.cache_clear()
    assert get_settings().webhook_secret == DEV_WEBHOOK_SECRET

    _create_app_logged(monkeypatch, caplog)
    assert len(_secret_warnings(caplog)) == 1


@pytest.mark.parametrize("secret", [None, DEV_WEBHOOK_SECRET])
def test_an_unset_or_copied_development_secret_is_warned_about(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, secret: str | None
) -> None:
    if secret is None:
        monkeypatch.delenv("FLOPEX_WEBHOOK_SECRET", raising=False)
    else:
        monkeypatch.setenv("FLOPEX_WEBHOOK_SECRET", secret)
    get_settings.cache_clear()
    _create_app_logged(monkeypatch, caplog)
    assert len(_secret_warnings(caplog)) == 1


def test_a_real_webhook_secret_is_not_warned_about_and_log_level_comes_from_settings(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("FLOPEX_WEBHOOK_SECRET", "a-production-secret")
    monkeypatch.setenv("LOG_LEVEL", "error")
    get_settings.cache_clear()
    levels = _create_app_logged(monkeypatch, caplog)
    assert _secret_warnings(caplog) == []
    assert levels == ["ERROR"]


def test_a_bad_log_level_stops_the_app_naming_log_level(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from app import create_app

    monkeypatch.setenv("LOG_LEVEL", "verbose")
    get_settings.cache_clear()
    with pytest.raises(ValueError, match=r"^LOG_LEVEL must be one of debug, info, warning"):
        create_app()


def test_the_worker_logging_hook_falls_back_to_the_checked_log_level(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from workers import signals

    levels: list[Any] = []
    monkeypatch.setattr(signals, "configure_logging", levels.append)
    monkeypatch.setenv("LOG_LEVEL", "debug")
    get_settings.cache_clear()
    signals._logging(loglevel=None)
    signals._logging(loglevel="WARNING")  # Celery's -l wins when it passes one
    assert levels == ["DEBUG", "WARNING"]

    monkeypatch.setenv("LOG_LEVEL", "verbose")
    get_settings.cache_clear()
    with pytest.raises(ValueError, match=r"^LOG_LEVEL"):
        signals._logging(loglevel=None)


def test_gunicorn_config_reads_the_checked_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    conf = str(ROOT / "config" / "gunicorn.conf.py")
    monkeypatch.setenv("FLOPEX_SYNC_TIMEOUT_S", "45.5")
    monkeypatch.setenv("LOG_LEVEL", "WARNING")
    get_settings.cache_clear()
    values = runpy.run_path(conf)
    assert values["timeout"] == 45 + 30
    assert values["loglevel"] == "warning"

    monkeypatch.setenv("FLOPEX_SYNC_TIMEOUT_S", "60s")
    get_settings.cache_clear()
    with pytest.raises(ValueError, match=r"^FLOPEX_SYNC_TIMEOUT_S must be"):
        runpy.run_path(conf)


@pytest.mark.parametrize(
    ("name", "value"), [("FLOPEX_MARKUP", "15%"), ("FLOPEX_DB_POOL_SIZE", "10.5")]
)
def test_the_cli_prints_a_bad_setting_as_one_line_and_exits_2(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], name: str, value: str
) -> None:
    from app.cli import main

    monkeypatch.setenv(name, value)
    get_settings.cache_clear()
    assert main(["account", "show", "00000000-0000-0000-0000-000000000000"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert len(lines) == 1
    assert lines[0].startswith(f"flopex: {name} must be ")
    assert lines[0].endswith(repr(value))


@pytest.mark.parametrize(
    ("given", "used"),
    [
        ("postgres://u:p@db:5432/x", "postgresql+psycopg2://u:p@db:5432/x"),
        ("postgresql://u@db/x?sslmode=require", "postgresql+psycopg2://u@db/x?sslmode=require"),
        ("postgresql+psycopg2://u@db/x", "postgresql+psycopg2://u@db/x"),
        ("sqlite:///var/x.sqlite3", "sqlite:///var/x.sqlite3"),
    ],
)
def test_platform_style_database_urls_use_the_shipped_driver(
    monkeypatch: pytest.MonkeyPatch, given: str, used: str
) -> None:
    assert load(monkeypatch, DATABASE_URL=given).database_url == used


@pytest.mark.parametrize(
    ("given", "allowed"), [("1", True), ("true", True), ("Yes", True), ("0", False), ("off", False)]
)
def test_webhook_allow_private_reads_the_usual_spellings(
    monkeypatch: pytest.MonkeyPatch, given: str, allowed: bool
) -> None:
    assert load(monkeypatch, FLOPEX_WEBHOOK_ALLOW_PRIVATE=given).webhook_allow_private is allowed


def test_webhook_allow_private_refuses_anything_else(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match=r"^FLOPEX_WEBHOOK_ALLOW_PRIVATE must be 1 or 0"):
        load(monkeypatch, FLOPEX_WEBHOOK_ALLOW_PRIVATE="maybe")
