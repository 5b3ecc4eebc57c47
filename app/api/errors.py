"""Every failure, ours or Werkzeug's or the validator's, leaves as
``{"error": {"type", "code", "message", "param"}}`` with a fitting status."""

from __future__ import annotations

import logging
import re
from typing import Any

import psycopg2
import redis
from flask import Flask, jsonify, request
from sqlalchemy import exc as sa_exc
from werkzeug.exceptions import HTTPException

from app.exceptions import FlopexError, error_body
from app.infra.broker import PUBLISH_ERRORS
from app.infra.logs import job_id_var

log = logging.getLogger(__name__)

_HTTP_CODES = {
    400: "invalid_request",
    401: "invalid_api_key",
    404: "not_found",
    405: "method_not_allowed",
    413: "request_too_large",
    415: "unsupported_media_type",
}


# RFC 6750 §3: a 401 names the scheme that would be accepted. A key that was sent but is not
# valid is an invalid_token; a request without one gets the bare challenge.
_CHALLENGE = 'Bearer realm="flopex"'
_CHALLENGE_INVALID = 'Bearer realm="flopex", error="invalid_token"'


# Faults of the infrastructure, not of the request: a database or Redis connection that failed,
# a pool with no connection to lend in time, a broker that refused a message. They are answered
# 503 service_unavailable with Retry-After, never 500: the client may retry (with its
# Idempotency-Key) and, when a job was already accepted, the answer names it. Errors that mean
# a bug (IntegrityError, ProgrammingError, DataError: the other DBAPIErrors) stay 500.
INFRASTRUCTURE_ERRORS: tuple[type[BaseException], ...] = (
    sa_exc.OperationalError,
    sa_exc.InterfaceError,
    sa_exc.TimeoutError,
    sa_exc.DisconnectionError,
    psycopg2.OperationalError,
    psycopg2.InterfaceError,
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
    *PUBLISH_ERRORS,
)
RETRY_AFTER_S = 1


def is_infrastructure_fault(err: BaseException) -> bool:
    if isinstance(err, INFRASTRUCTURE_ERRORS):
        return True
    # Any other DBAPI error raised on a connection that was lost at the same time.
    return isinstance(err, sa_exc.DBAPIError) and bool(err.connection_invalidated)


def error_response(
    code: str, message: str, param: str | None, status: int, job_id: Any = None
) -> Any:
    body = error_body(code, message, param)
    if job_id is not None:
        body["job_id"] = str(job_id)
    resp = jsonify({"error": body})
    resp.status_code = status
    if status == 401:
        sent = request.headers.get("Authorization", "").strip()
        resp.headers["WWW-Authenticate"] = _CHALLENGE_INVALID if sent else _CHALLENGE
    return resp


def _first_problem(messages: Any, prefix: str = "") -> tuple[str | None, str]:
    """webargs reports {"json": {"field": ["msg"]}}; name the first field and its message."""
    if isinstance(messages, dict):
        for key, value in messages.items():
            if key in ("json", "_schema", "query", "headers", "form"):
                return _first_problem(value, prefix)
            param = f"{prefix}{key}"
            _, msg = _first_problem(value, f"{param}.")
            return param, msg
    if isinstance(messages, list) and messages:
        return None, str(messages[0])
    return None, str(messages)


def register(app: Flask) -> None:
    @app.errorhandler(FlopexError)
    def _domain(err: FlopexError) -> Any:
        response = error_response(
            err.code, err.message, err.param, err.http_status, getattr(err, "job_id", None)
        )
        retry_after = getattr(err, "retry_after_s", None)
        if retry_after is None and err.http_status == 503:
            retry_after = 1  # every 503 says when to come back (no_provider_available too)
        if retry_after is not None:
            response.headers["Retry-After"] = str(retry_after)
        # Headers an error class declares (a 415's Accept-Encoding).
        response.headers.update(getattr(err, "headers", None) or {})
        return response

    @app.errorhandler(HTTPException)
    def _http(err: HTTPException) -> Any:
        status = err.code or 500
        if status in (400, 422) and "messages" in (getattr(err, "data", None) or {}):
            # The request validator (webargs/marshmallow): a 400 invalid_request naming the param.
            messages = (getattr(err, "data", None) or {}).get("messages", {})
            param, message = _first_problem(messages)
            if param is None and message == "Invalid input type.":
                message = "The request body must be a JSON object."
            if param and message == "Unknown field.":
                message = f"Unrecognized request parameter: {param}."
            elif param:
                message = f"{param}: {message}"
            return error_response("invalid_request", message, param, 400)
        if status == 413:
            return error_response(
                "request_too_large",
                f"The request body exceeds {app.config['MAX_CONTENT_LENGTH']} bytes.",
                None,
                413,
            )
        code = _HTTP_CODES.get(status, "internal_error" if status >= 500 else "invalid_request")
        message = err.description or err.name
        if status == 404 and request.url_rule is None:
            # No route matched (not a missing resource behind a real route).
            message = _unknown_route(app, request.method, request.path)
        response = error_response(code, message, None, status)
        if status == 405:
            # RFC 9110 §15.5.6: a 405 lists the methods the resource supports. Werkzeug knows
            # them (its own page carries them); the JSON envelope must not lose them.
            allow = [v for k, v in err.get_headers() if k.lower() == "allow"]
            if allow:
                response.headers["Allow"] = allow[0]
        return response

    @app.errorhandler(Exception)
    def _unexpected(err: Exception) -> Any:
        if is_infrastructure_fault(err):
            return service_unavailable(err)
        log.exception("unhandled error")
        return error_response("internal_error", "An internal error occurred.", None, 500)


def _unknown_route(app: Flask, method: str, path: str) -> str:
    routes = sorted(
        {
            # /v1/models/<path:model_id> is shown as /v1/models/{model_id}, as the spec names it.
            re.sub(r"<(?:\w+:)?(\w+)>", r"{\1}", rule.rule)
            for rule in app.url_map.iter_rules()
            if rule.rule.startswith("/v1/")
        }
    )
    shown = path if len(path) <= 100 else path[:100] + "..."
    return (
        f"No route {method} {shown}. The API's routes: {', '.join(routes)}; "
        "every operation is documented at /docs (OpenAPI: /openapi.json)."
    )


def service_unavailable(err: BaseException) -> Any:
    # Logged without the traceback at warning: an outage answers many requests this way.
    log.warning("infrastructure fault: %s: %s", type(err).__name__, err)
    job_id = job_id_var.get()
    message = "A service the exchange depends on is briefly unavailable; retry"
    if job_id is not None:
        message += f" (your job {job_id} was accepted: GET /v1/inference/{job_id} shows it)"
    else:
        message += " (with the same Idempotency-Key, nothing is done twice)"
    response = error_response("service_unavailable", message + ".", None, 503, job_id)
    response.headers["Retry-After"] = str(RETRY_AFTER_S)
    return response
