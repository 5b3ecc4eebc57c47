"""Liveness and readiness probes."""

from __future__ import annotations

import dataclasses
import socket
from collections.abc import Iterator

import pytest

from config.settings import get_settings


def test_healthz_is_always_ok(client):
    resp = client.get("/healthz")
    assert resp.status_code == 200 and resp.get_json() == {"status": "ok"}


def test_readyz_checks_database_and_redis(client):
    resp = client.get("/readyz")
    assert resp.status_code == 200
    assert resp.get_json()["checks"] == {"database": "ok", "redis": "ok"}


@pytest.fixture
def silent_server() -> Iterator[str]:
    """Accepts connections and never answers: a hung Redis."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    yield f"redis://127.0.0.1:{server.getsockname()[1]}/0"
    server.close()


def _with_urls(monkeypatch, **urls: str) -> None:
    from app.api import health

    settings = dataclasses.replace(get_settings(), **urls)
    monkeypatch.setattr(health, "get_settings", lambda: settings)


@pytest.mark.parametrize("how", ["refused", "hung"])
def test_readyz_reports_an_unreachable_or_hung_redis(client, monkeypatch, silent_server, how):
    url = "redis://127.0.0.1:1/0" if how == "refused" else silent_server
    _with_urls(monkeypatch, redis_url=url, broker_url=url)
    resp = client.get("/readyz")  # a hung Redis costs the probe's 2 s timeout, not minutes
    assert resp.status_code == 503
    body = resp.get_json()
    assert body["status"] == "unavailable"
    assert body["checks"]["database"] == "ok" and body["checks"]["redis"].startswith("error")


def test_readyz_checks_a_separate_broker_too(client, monkeypatch):
    _with_urls(monkeypatch, broker_url="redis://127.0.0.1:1/0")
    resp = client.get("/readyz")
    assert resp.status_code == 503
    checks = resp.get_json()["checks"]
    assert checks["redis"] == "ok" and checks["broker"].startswith("error")


@pytest.mark.parametrize("how", ["refused", "hung"])
def test_readyz_reports_an_unreachable_or_hung_database(client, monkeypatch, silent_server, how):
    """A PostgreSQL that accepts connections and never answers fails the check on the probe's
    own clock (TimeoutError), not libpq's or the kernel's; the pool is not involved."""
    port = 1 if how == "refused" else int(silent_server.rsplit(":", 1)[1].split("/")[0])
    _with_urls(monkeypatch, database_url=f"postgresql+psycopg2://postgres@127.0.0.1:{port}/x")
    resp = client.get("/readyz")
    assert resp.status_code == 503
    checks = resp.get_json()["checks"]
    assert checks["redis"] == "ok"
    assert checks["database"] == (
        "error: OperationalError" if how == "refused" else "error: TimeoutError"
    )


def test_the_database_probe_reads_every_part_of_the_url(database):
    """User, host, port, database and query options (here an application_name) reach libpq;
    a wrong database name is an error, not a silent success against another database."""
    import psycopg2

    from app.infra.db import probe_database

    probe_database(database + "?application_name=flopex-readyz", 2.0)
    with pytest.raises(psycopg2.OperationalError, match="does not exist"):
        probe_database(database.rsplit("/", 1)[0] + "/no_such_database_here", 2.0)
