"""The web server's worker: gunicorn's gevent worker with bounds on slow clients, and every answer
gunicorn writes itself (a 414, a 431, a 400 for a malformed request, a 408) in the API's one
error shape. Why gevent rather than threads: docs/architecture.md ("The web server").

Each connection is a greenlet, so an idle, slow or streaming connection costs memory, not one of
a fixed number of threads. The bounds:

- headers: the request line and headers must have arrived within ``WEB_HEADER_TIMEOUT_S`` of the
  connection being accepted (or of the previous response on a kept-alive connection); otherwise
  the connection is closed. A total deadline, not a per-read one: a header line per second does
  not keep a connection open.
- body: a body of up to the API's size limit (``FLOPEX_MAX_BODY_BYTES``) must have arrived in
  full within ``WEB_BODY_TIMEOUT_S`` of its headers; it is read here, before the application
  sees the request (so before authentication: a valid key is no way around the bound), and
  answered 408 ``request_timeout`` otherwise. A declared length above the limit is not read: the
  application answers it 413.
"""

from __future__ import annotations

import io
import json
import os
from typing import Any

import gevent
from gunicorn import util
from gunicorn.workers.ggevent import GeventWorker

HEADER_TIMEOUT_S = float(os.environ.get("WEB_HEADER_TIMEOUT_S", "10"))
BODY_TIMEOUT_S = float(os.environ.get("WEB_BODY_TIMEOUT_S", "30"))

# gunicorn's own answers (status -> our code). 4xx not listed: invalid_request.
_CODES = {
    408: "request_timeout",
    413: "request_too_large",
    414: "uri_too_long",
    431: "header_fields_too_large",
}


def error_document(status: int, message: str) -> bytes:
    from app.exceptions import error_body

    code = _CODES.get(status, "invalid_request" if status < 500 else "internal_error")
    return json.dumps({"error": error_body(code, message)}).encode()


def write_json_error(sock: Any, status_int: int, reason: str, mesg: str) -> None:
    """gunicorn.util.write_error's replacement: the same answer, as JSON in our error shape."""
    message = f"{reason}: {mesg}" if mesg else reason
    if status_int == 414:
        message = "The request line (method and URL) is too long."
    elif status_int == 431:
        message = "A request header, or the headers together, are too large."
    elif status_int >= 500:
        message = "An internal error occurred."
    body = error_document(status_int, message)
    head = (
        f"HTTP/1.1 {status_int} {reason}\r\nConnection: close\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    util.write_nonblock(sock, head.encode("latin1") + body)


def install_json_errors() -> None:
    # Every worker class writes its own errors through this module attribute.
    util.write_error = write_json_error


class FlopexGeventWorker(GeventWorker):
    def patch(self) -> None:
        # Before the application is imported (preload_app is off): the standard library by
        # gevent, and psycopg2, whose waits are in C, by psycogreen's wait callback. Without it
        # a query would block every greenlet of the process.
        super().patch()
        from psycogreen.gevent import patch_psycopg

        patch_psycopg()

    def init_process(self) -> None:
        install_json_errors()
        super().init_process()

    def timeout_ctx(self) -> gevent.Timeout:
        # Used by gunicorn around reading each request's line and headers (and the idle wait
        # between requests on a kept-alive connection). False: on expiry the block ends quietly,
        # no request was read, and the connection is closed.
        return gevent.Timeout(HEADER_TIMEOUT_S, False)

    def handle_request(self, listener_name: Any, req: Any, sock: Any, addr: Any) -> Any:
        if not _buffer_body(req):
            write_json_error(
                sock,
                408,
                "Request Timeout",
                f"The request body did not arrive within {BODY_TIMEOUT_S:g} s.",
            )
            # Ends the connection: what is left of the body must not be read as a request.
            raise StopIteration()
        return super().handle_request(listener_name, req, sock, addr)


def _max_body_bytes() -> int:
    from config.settings import get_settings

    return get_settings().max_body_bytes


def _buffer_body(req: Any) -> bool:
    """Reads ``req``'s body into memory within BODY_TIMEOUT_S; False when it did not arrive."""
    if req.body is None:
        return True
    limit = _max_body_bytes()
    declared = _content_length(req)
    if declared is not None and declared > limit:
        return True  # the application answers 413 without reading it
    chunks: list[bytes] = []
    size = 0
    with gevent.Timeout(BODY_TIMEOUT_S, False):
        # One byte past the limit is enough for the application to answer 413.
        while size <= limit:
            chunk = req.body.read(min(65536, limit + 1 - size))
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        req.body = io.BytesIO(b"".join(chunks))
        return True
    return False


def _content_length(req: Any) -> int | None:
    for name, value in req.headers:
        if name == "CONTENT-LENGTH":
            try:
                return int(value)
            except ValueError:
                return None
    return None
