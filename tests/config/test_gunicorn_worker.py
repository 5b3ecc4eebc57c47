"""The real web server (config/gunicorn.conf.py, config/gunicorn_worker.py): slow clients are
bounded and cannot starve the others, and the server's own answers are JSON in our error shape.

The fixture's bounds are 2 s for the headers and 2 s for the body. 200 slow connections is more
than the 64 threads (2 x 32) the server ran with before gevent workers, with which every other
request waited until they gave up."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import requests

SLOW_CONNECTIONS = 200


def _connect(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    return sock


def _read_until_closed(sock: socket.socket) -> bytes:
    """Everything the server sends before it closes the connection (30 s at most: a failure)."""
    data = b""
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            return data
        data += chunk


@contextmanager
def _slow_clients(port: int, opening: bytes, count: int) -> Iterator[list[socket.socket]]:
    socks = []
    try:
        for _ in range(count):
            sock = _connect(port)
            sock.sendall(opening)
            socks.append(sock)
        yield socks
    finally:
        for sock in socks:
            sock.close()


def _json_error(raw: bytes) -> tuple[int, dict[str, Any]]:
    head, _, body = raw.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    assert b"content-type: application/json" in head.lower()
    return status, json.loads(body)["error"]


def _served(web_server: Any, account: Any) -> None:
    """Ordinary requests, one of them reading the database, are answered meanwhile."""
    assert requests.get(f"{web_server.base_url}/healthz", timeout=10).status_code == 200
    wallet = requests.get(f"{web_server.base_url}/v1/wallet", headers=account.headers, timeout=10)
    assert wallet.status_code == 200, wallet.text


def test_slow_headers_are_cut_off_and_do_not_starve_others(
    web_server: Any, make_account: Any
) -> None:
    account = make_account("1.00")
    # A request line, then nothing: headers that trickle (or never come).
    with _slow_clients(web_server.port, b"GET /healthz HTTP/1.1\r\n", SLOW_CONNECTIONS) as socks:
        _served(web_server, account)
        # One keeps sending a header line now and then: the deadline is for all of them.
        trickler = socks[0]
        started = time.monotonic()
        trickler.settimeout(0.5)
        closed = False
        while time.monotonic() - started < 20 and not closed:
            try:
                trickler.sendall(b"X-Slow: 1\r\n")
                closed = trickler.recv(1024) == b""
            except TimeoutError:
                continue
            except OSError:
                closed = True
        assert closed, "a connection trickling its headers was still open after 20 s"
        for sock in socks[1:]:
            sock.settimeout(30)
            assert _read_until_closed(sock) == b""
        _served(web_server, account)


def test_slow_body_gets_408_even_with_a_valid_key(web_server: Any, make_account: Any) -> None:
    account = make_account("1.00")
    opening = (
        b"POST /v1/inference HTTP/1.1\r\nHost: flopex\r\nContent-Type: application/json\r\n"
        b"Authorization: Bearer " + account.api_key.encode() + b"\r\nContent-Length: 200\r\n\r\n{"
    )
    with _slow_clients(web_server.port, opening, SLOW_CONNECTIONS) as socks:
        _served(web_server, account)
        for sock in socks:
            status, error = _json_error(_read_until_closed(sock))
            assert (status, error["code"]) == (408, "request_timeout")
        _served(web_server, account)
    # Nothing reached the application: no job, no hold.
    listed = requests.get(
        f"{web_server.base_url}/v1/inference", headers=account.headers, timeout=10
    ).json()
    assert listed["data"] == []


def test_a_body_that_arrives_in_time_is_served(web_server: Any) -> None:
    # Sent in pieces, but within the bound: the buffered body reaches the application whole.
    with _connect(web_server.port) as sock:
        sock.sendall(
            b"POST /v1/inference HTTP/1.1\r\nHost: flopex\r\nContent-Type: application/json\r\n"
            b"Content-Length: 2\r\nConnection: close\r\n\r\n{"
        )
        sock.sendall(b"}")
        status, error = _json_error(_read_until_closed(sock))
    # Parsed (not a timeout, not "not valid JSON"): the key is what is missing.
    assert (status, error["code"]) == (401, "invalid_api_key")


@pytest.mark.parametrize(
    ("request_bytes", "status", "code"),
    [
        (b"GET /" + b"a" * 10_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 414, "uri_too_long"),
        (
            b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 9_000 + b"\r\n\r\n",
            431,
            "header_fields_too_large",
        ),
        (b"GET /healthz HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n", 400, "invalid_request"),
    ],
)
def test_the_servers_own_answers_are_json(
    web_server: Any, request_bytes: bytes, status: int, code: str
) -> None:
    with _connect(web_server.port) as sock:
        sock.sendall(request_bytes)
        got_status, error = _json_error(_read_until_closed(sock))
    assert (got_status, error["code"]) == (status, code)
    assert error["type"] == "invalid_request_error"
    assert error["message"]


def test_inference_through_the_web_server(
    web_server: Any, pipeline: Any, make_account: Any
) -> None:
    """The whole path under gevent (psycopg2 made cooperative by psycogreen, Redis, Celery's
    publish): many synchronous requests at once, each charged once."""
    from tests.conftest import run_together

    account = make_account("5.00")

    def one(i: int) -> Any:
        return lambda: requests.post(
            f"{web_server.base_url}/v1/inference",
            headers={**account.headers, "Idempotency-Key": f"web-{i}"},
            json={"model": "llama-3.1-8b", "input": f"hello {i}", "max_output_tokens": 8},
            timeout=60,
        )

    answers = run_together([one(i) for i in range(40)])
    assert [a.status_code for a in answers] == [200] * 40, [a.text for a in answers]
    assert {a.json()["status"] for a in answers} == {"success"}


def test_open_long_polls_hold_no_database_connection(
    web_server: Any, catalog: Any, make_account: Any, redis_client: Any
) -> None:
    """More long-polls than the web process has database connections (4 + 4 in tests), all
    waiting at once: an ordinary request is still answered while they wait. (A waiting request
    used to hold a pooled connection for its whole wait: the 9th one and every other request
    then waited for a connection.)"""
    import threading

    account = make_account("5.00")
    base = web_server.base_url
    accepted = requests.post(
        f"{base}/v1/inference",
        json={"model": "llama-3.1-8b", "input": "x", "max_output_tokens": 8},
        headers={**account.headers, "Prefer": "respond-async"},
        timeout=30,
    )
    assert accepted.status_code == 202, accepted.text
    job_id = accepted.json()["id"]  # no worker in this test: it stays queued
    waiting = 40
    blocked_before = int(redis_client.info("clients")["blocked_clients"])
    answers: list[int] = []

    def poll() -> None:
        resp = requests.get(
            f"{base}/v1/inference/{job_id}?wait=20", headers=account.headers, timeout=60
        )
        answers.append(resp.status_code)

    polls = [threading.Thread(target=poll) for _ in range(waiting)]
    for t in polls:
        t.start()
    deadline = time.monotonic() + 30
    while int(redis_client.info("clients")["blocked_clients"]) < blocked_before + waiting:
        assert time.monotonic() < deadline, "the long-polls never all waited"
        time.sleep(0.05)  # waiting for every poll to block on its completion signal
    wallet = requests.get(f"{base}/v1/wallet", headers=account.headers, timeout=15)
    assert wallet.status_code == 200, wallet.text
    assert answers == []  # answered while every poll was still waiting
    for t in polls:
        t.join(timeout=60)
    assert answers == [200] * waiting
