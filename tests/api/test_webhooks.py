"""callback_url webhooks: the finished job is POSTed, signed, retried with backoff."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from app import webhooks
from tests.conftest import chat_calls, ledger_kinds


class Receiver:
    """A loopback HTTP endpoint that records what it receives; answers the queued statuses first."""

    def __init__(self, statuses: list[int] | None = None) -> None:
        self.received: list[tuple[dict[str, str], bytes]] = []
        self.statuses = list(statuses or [])
        self.arrived = threading.Condition()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                status = receiver.statuses.pop(0) if receiver.statuses else 200
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()
                with receiver.arrived:
                    receiver.received.append((dict(self.headers), body))
                    receiver.arrived.notify_all()

            def log_message(self, *_: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"

    def wait_for(self, count: int, timeout: float = 30) -> None:
        with self.arrived:
            assert self.arrived.wait_for(lambda: len(self.received) >= count, timeout), (
                self.received
            )


@pytest.fixture
def receiver():
    made: list[Receiver] = []

    def make(statuses: list[int] | None = None) -> Receiver:
        made.append(Receiver(statuses))
        return made[-1]

    yield make
    for r in made:
        r.server.shutdown()


BODY = {"model": "qwen-7b", "input": "hook me", "max_output_tokens": 8}


def test_finished_job_is_posted_signed_and_equal_to_get(client, pipeline, make_account, receiver):
    account = make_account()
    hook = receiver()
    resp = client.post(
        "/v1/inference",
        json={**BODY, "callback_url": hook.url},
        headers={**account.headers, "Prefer": "respond-async"},
    )
    assert resp.status_code == 202
    job_id = resp.get_json()["id"]
    hook.wait_for(1)
    headers, body = hook.received[0]
    secret = client.get("/v1/webhook_secret", headers=account.headers).get_json()["secret"]
    assert webhooks.verify(secret, headers["Flopex-Signature"], body)
    assert not webhooks.verify(secret, headers["Flopex-Signature"], body + b" ")
    assert headers["Flopex-Event"] == "inference.completed"
    assert json.loads(body)["id"] == job_id
    assert body == client.get(f"/v1/inference/{job_id}", headers=account.headers).data


def test_failed_deliveries_are_retried_with_the_same_delivery_id(
    client, pipeline, make_account, receiver
):
    account = make_account()
    hook = receiver(statuses=[500, 503])
    client.post("/v1/inference", json={**BODY, "callback_url": hook.url}, headers=account.headers)
    hook.wait_for(3)
    deliveries = {h["Flopex-Delivery"] for h, _ in hook.received}
    assert len(deliveries) == 1


@pytest.mark.parametrize(
    "url",
    [
        "ftp://x/y",
        # Control characters and spaces are not URL characters; a NUL was a 500 (PostgreSQL
        # text cannot hold it), a CR/LF a header injection waiting to happen.
        "http://example.com/\x00",
        "http://example.com/a b",
        "http://example.com/\r\nX-Evil: 1",
        # urlsplit raises ValueError on these: they were 500s too.
        "http://[abc/x",
        "http://exa\uff03mple.com/",
    ],
)
def test_callback_url_must_be_an_http_url(client, pipeline, make_account, url):
    account = make_account()
    before = chat_calls(pipeline)
    resp = client.post("/v1/inference", json={**BODY, "callback_url": url}, headers=account.headers)
    assert resp.status_code == 400 and resp.get_json()["error"]["param"] == "callback_url"
    assert chat_calls(pipeline) == before and ledger_kinds(account) == ["topup"]


def test_private_destinations_are_recognised():
    assert not webhooks.public_destination("http://127.0.0.1:9/hook")
    assert not webhooks.public_destination("http://10.1.2.3/hook")
    assert not webhooks.public_destination("http://no-such-host.invalid/hook")


def test_signatures_expire():
    body = b"{}"
    header = webhooks.sign("whsec_x", 1_000, body)
    assert webhooks.verify("whsec_x", header, body, now=1_100)
    assert not webhooks.verify("whsec_x", header, body, now=2_000)
    assert not webhooks.verify("whsec_y", header, body, now=1_100)
