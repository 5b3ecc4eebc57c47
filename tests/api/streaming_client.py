"""A real web server for the streaming tests, and a raw Server-Sent Events client.

The server is gunicorn with the project's own configuration (config/gunicorn.conf.py, so the
worker model under test is the production one), started on a free loopback port with this test
run's environment. The client reads the body as it arrives, line by line, over http.client: it
can stop after any event and drop the connection, as a client whose network broke would.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]


@dataclass
class WebServer:
    proc: subprocess.Popen[bytes]
    port: int
    log: Path

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def start_web(log: Path, env: dict[str, str] | None = None) -> WebServer:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    out = log.open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "gunicorn", "-c", "config/gunicorn.conf.py", "app:create_app()"],
        cwd=ROOT,
        env={
            **os.environ,
            "PORT": str(port),
            "BIND_HOST": "127.0.0.1",
            "WEB_CONCURRENCY": "1",
            **(env or {}),
        },
        stdout=out,
        stderr=subprocess.STDOUT,
    )
    server = WebServer(proc, port, log)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"gunicorn exited early:\n{log.read_text()}")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
            conn.request("GET", "/healthz")
            if conn.getresponse().status == 200:
                conn.close()
                return server
        except OSError:
            pass
        time.sleep(0.1)  # readiness poll of a process we just started
    server.stop()
    raise RuntimeError(f"gunicorn did not start:\n{log.read_text()}")


@dataclass
class SSE:
    """One event: ``event`` (None for an unnamed one), ``data`` (parsed JSON, exact decimals,
    or the raw text when it is not JSON), ``id``."""

    event: str | None
    data: Any
    id: str | None = None


@dataclass
class Stream:
    status: int
    headers: dict[str, str]
    conn: http.client.HTTPConnection
    response: http.client.HTTPResponse
    comments: list[str] = field(default_factory=list)

    def events(self) -> Iterator[SSE]:
        """Events as they arrive; stops at the end of the body."""
        event: str | None = None
        data: list[str] = []
        ident: str | None = None
        while True:
            raw = self.response.readline()
            if not raw:
                return
            line = raw.decode().rstrip("\r\n")
            if not line:
                if data:
                    text = "\n".join(data)
                    try:
                        parsed: Any = json.loads(text, parse_float=Decimal)
                    except ValueError:
                        parsed = text
                    yield SSE(event, parsed, ident)
                event, data, ident = None, [], None
                continue
            if line.startswith(":"):
                self.comments.append(line)
                continue
            name, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            if name == "event":
                event = value
            elif name == "data":
                data.append(value)
            elif name == "id":
                ident = value

    def body(self) -> Any:
        return json.loads(self.response.read(), parse_float=Decimal)

    def cut(self) -> None:
        """Drop the connection, as a client whose network broke."""
        sock = self.conn.sock
        if sock is not None:
            sock.shutdown(socket.SHUT_RDWR)
        self.conn.close()


def open_stream(
    server: WebServer,
    method: str,
    path: str,
    headers: dict[str, str],
    body: dict[str, Any] | None = None,
    timeout_s: float = 30,
) -> Stream:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=timeout_s)
    payload = None if body is None else json.dumps(body)
    sent = dict(headers)
    if payload is not None:
        sent["Content-Type"] = "application/json"
    conn.request(method, path, body=payload, headers=sent)
    response = conn.getresponse()
    return Stream(response.status, dict(response.getheaders()), conn, response)


def request_json(
    server: WebServer, method: str, path: str, headers: dict[str, str], body: Any = None
) -> tuple[int, Any, dict[str, str]]:
    stream = open_stream(server, method, path, headers, body)
    try:
        return stream.status, stream.body(), stream.headers
    finally:
        stream.conn.close()
