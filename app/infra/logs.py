"""Structured JSON logs with a request id that follows a job from the web into every task.

The id comes from the client's ``X-Request-ID`` (if it is sane) or is generated; it is returned
in the response, stored on the job, sent with every Celery message as a header and set again in
the worker before each task runs, so one grep finds a job's whole story.
"""

from __future__ import annotations

import contextvars
import json
import logging
import re
import sys
import uuid
from datetime import UTC, datetime
from typing import Any

request_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "request_id", default=None
)
job_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("job_id", default=None)

_SANE_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")
HEADER_REQUEST_ID = "flopex_request_id"
HEADER_JOB_ID = "flopex_job_id"


def new_request_id(client_value: str | None) -> str:
    if client_value and _SANE_ID.match(client_value):
        return client_value
    return uuid.uuid4().hex


def task_headers(job_id: str | None = None, request_id: str | None = None) -> dict[str, str]:
    """The ids a task logs with: the current request's (or ``request_id``: the job's own, when
    the sweeper sends work on a job outside any request) and the job's."""
    headers = {}
    rid = request_id or request_id_var.get()
    if rid:
        headers[HEADER_REQUEST_ID] = rid
    jid = job_id or job_id_var.get()
    if jid:
        headers[HEADER_JOB_ID] = jid
    return headers


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        rid, jid = request_id_var.get(), job_id_var.get()
        if rid:
            entry["request_id"] = rid
        if jid:
            entry["job_id"] = jid
        for key in ("provider", "status", "duration_ms", "client", "task"):
            if hasattr(record, key):
                entry[key] = getattr(record, key)
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def configure_logging(level: str | int = "INFO") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper() if isinstance(level, str) else level)
    # Our own request log replaces werkzeug's access lines.
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
