"""Per-request id, access log, latency metrics and the chunked-body limit for every request."""

from __future__ import annotations

import logging
import time
from typing import Any

from flask import Flask, Response, g, request
from werkzeug.exceptions import RequestEntityTooLarge

from app.infra.logs import job_id_var, new_request_id, request_id_var
from app.infra.metrics import REQUEST_LATENCY

log = logging.getLogger("flopex.access")


def _limit_chunked_body(max_bytes: int | None) -> None:
    """A chunked body has no Content-Length for MAX_CONTENT_LENGTH to check, and Werkzeug
    silently truncates it at the limit; read one byte past the limit to tell, and answer 413."""
    if (
        max_bytes is None
        or request.content_length is not None
        or request.method not in ("POST", "PUT", "PATCH")
    ):
        return
    if not request.environ.get("wsgi.input_terminated"):
        return
    data = request.environ["wsgi.input"].read(max_bytes + 1)
    if len(data) > max_bytes:
        raise RequestEntityTooLarge()
    request._cached_data = data  # what request.get_data() returns from now on


_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


def init_observability(app: Flask) -> None:
    @app.before_request
    def _start() -> None:
        g.started = time.perf_counter()
        g.request_id = new_request_id(request.headers.get("X-Request-ID"))
        g.tokens = (request_id_var.set(g.request_id), job_id_var.set(None))
        _limit_chunked_body(app.config["MAX_CONTENT_LENGTH"])

    @app.after_request
    def _finish(response: Response) -> Response:
        response.headers["X-Request-ID"] = g.get("request_id", "")
        started = g.get("started")
        if started is not None:
            elapsed = time.perf_counter() - started
            rule = request.url_rule.rule if request.url_rule else "unmatched"
            # Every label value comes from a closed set: a made-up method (`curl -X AAAA`) must
            # not mint a new time series.
            method = request.method if request.method in _METHODS else "other"
            REQUEST_LATENCY.labels(
                rule, method, str(response.status_code), g.get("profile", "")
            ).observe(elapsed)
            log.info(
                "%s %s %s",
                request.method,
                rule,
                response.status_code,
                extra={
                    "status": response.status_code,
                    "duration_ms": round(elapsed * 1000, 2),
                    # The caller's address (FLOPEX_TRUSTED_PROXY_HOPS: through the proxies).
                    "client": request.remote_addr,
                },
            )
        return response

    @app.teardown_request
    def _reset(_exc: BaseException | None) -> None:
        tokens: Any = g.pop("tokens", None)
        if tokens:
            request_id_var.reset(tokens[0])
            job_id_var.reset(tokens[1])
