"""Liveness and readiness probes."""

from __future__ import annotations


def test_healthz_is_always_ok(client):
    resp = client.get("/healthz")
    assert resp.status_code == 200 and resp.get_json() == {"status": "ok"}


def test_readyz_checks_database_and_redis(client):
    resp = client.get("/readyz")
    assert resp.status_code == 200
    assert resp.get_json()["checks"] == {"database": "ok", "redis": "ok"}


def test_readyz_reports_an_unreachable_redis(client, monkeypatch):
    import redis

    from app.api import health

    monkeypatch.setattr(
        health, "get_redis", lambda: redis.Redis(port=1, socket_connect_timeout=0.2)
    )
    resp = client.get("/readyz")
    assert resp.status_code == 503
    body = resp.get_json()
    assert body["status"] == "unavailable"
    assert body["checks"]["database"] == "ok" and body["checks"]["redis"].startswith("error")
