"""Liveness and readiness probes."""

from __future__ import annotations

from typing import Any

from flask import Response
from flask.views import MethodView
from flask_smorest import Blueprint

from app.api.schemas import HealthSchema, ReadySchema
from app.infra.db import probe_database
from app.infra.metrics import render
from app.infra.redis_client import is_redis_url, probe_client
from config.settings import get_settings

blp = Blueprint("health", __name__, description="Process health")

# Each check of /readyz gives up after this long (Redis: app.infra.redis_client.probe_client).
_PROBE_TIMEOUT_S = 2.0


@blp.route("/healthz")
class Healthz(MethodView):
    @blp.response(200, HealthSchema)
    def get(self) -> Any:
        """The process is up."""
        return {"status": "ok"}


@blp.route("/metrics")
class Metrics(MethodView):
    @blp.doc(
        responses={
            "200": {"description": "Prometheus text exposition", "content": {"text/plain": {}}}
        }
    )
    def get(self) -> Any:
        """Prometheus metrics for every process on this host (see docs/operations.md)."""
        settings = get_settings()
        # Queue depths live in the broker, which may be another Redis than REDIS_URL.
        broker = settings.broker_url if is_redis_url(settings.broker_url) else settings.redis_url
        body, content_type = render(lambda: probe_client(broker))
        return Response(body, mimetype=content_type.split(";")[0], content_type=content_type)


@blp.route("/readyz")
class Readyz(MethodView):
    @blp.response(200, ReadySchema)
    @blp.alt_response(503, schema=ReadySchema, description="a dependency is unreachable")
    def get(self) -> Any:
        """The database and the broker are reachable."""
        checks: dict[str, str] = {}
        settings = get_settings()
        try:
            probe_database(settings.database_url, _PROBE_TIMEOUT_S)
            checks["database"] = "ok"
        except Exception as exc:  # any failure means not ready
            checks["database"] = f"error: {type(exc).__name__}"
        redis_urls = {"redis": settings.redis_url}
        if settings.broker_url != settings.redis_url and is_redis_url(settings.broker_url):
            redis_urls["broker"] = settings.broker_url
        for name, url in redis_urls.items():
            try:
                probe_client(url).ping()
                checks[name] = "ok"
            except Exception as exc:
                checks[name] = f"error: {type(exc).__name__}"
        ready = all(v == "ok" for v in checks.values())
        return {"status": "ok" if ready else "unavailable", "checks": checks}, 200 if ready else 503
