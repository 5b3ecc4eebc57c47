"""callback_url webhooks: the finished job is POSTed, signed, retried with backoff."""

from __future__ import annotations

import json
import ssl
import threading
import time
import uuid
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
import urllib3
from sqlalchemy import update

from app.infra.db import session_scope
from app.jobs import webhooks
from app.jobs.recovery import sweep
from app.models import Job
from config.settings import get_settings
from tests.conftest import chat_calls, decimal_json, ledger_kinds


class Receiver:
    """A loopback HTTP endpoint that records what it receives; answers the queued statuses first."""

    def __init__(self, statuses: list[int] | None = None, location: str | None = None) -> None:
        self.received: list[tuple[dict[str, str], bytes]] = []
        self.statuses = list(statuses or [])
        self.arrived = threading.Condition()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                status = receiver.statuses.pop(0) if receiver.statuses else 200
                self.send_response(status)
                if location is not None:
                    self.send_header("Location", location)
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

    def make(statuses: list[int] | None = None, location: str | None = None) -> Receiver:
        made.append(Receiver(statuses, location))
        return made[-1]

    yield make
    for r in made:
        r.server.shutdown()


BODY = {"model": "qwen-7b", "input": "hook me", "max_output_tokens": 8}


def submit_async(client: Any, account: Any, hook: Receiver) -> Any:
    return client.post(
        "/v1/inference",
        json={**BODY, "callback_url": hook.url},
        headers={**account.headers, "Prefer": "respond-async"},
    )


def test_finished_job_is_posted_signed_and_equal_to_get(client, pipeline, make_account, receiver):
    account = make_account()
    hook = receiver()
    resp = submit_async(client, account, hook)
    assert resp.status_code == 202
    job_id = resp.get_json()["id"]
    hook.wait_for(1)
    headers, body = hook.received[0]
    secret = client.get("/v1/webhook_secret", headers=account.headers).get_json()["secret"]
    assert webhooks.verify(secret, headers["Flopex-Signature"], body)
    assert not webhooks.verify(secret, headers["Flopex-Signature"], body + b" ")
    assert headers["Flopex-Event"] == "inference.completed"
    assert json.loads(body)["id"] == job_id
    assert_body_is_the_job_object(client, account, job_id, body, hook.url)
    # The customer can see the delivery's fate on the job.
    assert delivered(job_id)
    shown = client.get(f"/v1/inference/{job_id}", headers=account.headers).get_json()
    assert shown["webhook"] == {"url": hook.url, "status": "delivered"}


def assert_body_is_the_job_object(
    client: Any, account: Any, job_id: str, body: bytes, url: str
) -> None:
    """The webhook's body is GET /v1/inference/{id}, less the webhook's own state (it is sent
    while that is still pending), number for number."""
    shown = decimal_json(client.get(f"/v1/inference/{job_id}", headers=account.headers).data)
    state = shown.pop("webhook")
    assert state["url"] == url and state["status"] in ("pending", "delivered")
    assert "webhook" not in decimal_json(body)
    assert decimal_json(body) == shown


def test_failed_deliveries_are_retried_with_the_same_delivery_id(
    client, pipeline, make_account, receiver
):
    account = make_account()
    hook = receiver(statuses=[500, 503])
    client.post("/v1/inference", json={**BODY, "callback_url": hook.url}, headers=account.headers)
    hook.wait_for(3)
    deliveries = {h["Flopex-Delivery"] for h, _ in hook.received}
    assert len(deliveries) == 1


def test_a_redirect_is_a_failed_attempt_and_is_not_followed(
    client, pipeline, make_account, receiver
):
    account = make_account()
    inner = receiver()  # stands for an address inside our network
    hook = receiver(statuses=[307, 307], location=inner.url)
    client.post("/v1/inference", json={**BODY, "callback_url": hook.url}, headers=account.headers)
    hook.wait_for(3)  # two redirects answered, retried, then delivered
    assert inner.received == []
    assert len({h["Flopex-Delivery"] for h, _ in hook.received}) == 1


def test_a_cancel_is_answered_even_when_its_webhook_cannot_be_queued(
    client, pipeline, make_account, receiver, monkeypatch
):
    from kombu.exceptions import OperationalError

    account = make_account()
    for provider in pipeline.values():
        provider.configure(latency_ms=1500)
    job_id = submit_async(client, account, receiver()).get_json()["id"]

    def broker_down(*_a, **_k):  # type: ignore[no-untyped-def]
        raise OperationalError("broker down")

    monkeypatch.setattr(webhooks, "send", broker_down)
    cancelled = client.post(f"/v1/inference/{job_id}/cancel", headers=account.headers)
    assert cancelled.status_code == 200 and cancelled.get_json()["status"] == "cancelled"
    assert webhook_row(job_id)[0] == "pending"  # the outbox sweeper posts it later
    set_webhook_row(job_id, webhook_status="failed")  # not for other tests' sweeps to post


def test_a_cancelled_job_is_posted_too(client, pipeline, make_account, receiver):
    account = make_account()
    hook = receiver()
    for provider in pipeline.values():
        provider.configure(latency_ms=1500)  # the job is still quoting when it is cancelled
    resp = submit_async(client, account, hook)
    job_id = resp.get_json()["id"]
    cancelled = client.post(f"/v1/inference/{job_id}/cancel", headers=account.headers)
    assert cancelled.status_code == 200 and cancelled.get_json()["status"] == "cancelled"
    hook.wait_for(1)
    headers, body = hook.received[0]
    assert headers["Flopex-Event"] == "inference.cancelled"
    assert_body_is_the_job_object(client, account, job_id, body, hook.url)


def test_a_dns_failure_is_retried_and_a_private_address_refused(
    client, pipeline, make_account, receiver, monkeypatch
):
    import dataclasses

    from tasks import webhooks as task_module

    account = make_account()
    hook = receiver()
    resp = submit_async(client, account, hook)
    hook.wait_for(1)  # the real delivery; what follows runs the task's body in this process
    strict = dataclasses.replace(task_module.get_settings(), webhook_allow_private=False)
    monkeypatch.setattr(task_module, "get_settings", lambda: strict)

    class Retried(Exception):
        pass

    def retry(**kwargs):  # type: ignore[no-untyped-def]
        raise Retried(kwargs)

    monkeypatch.setattr(task_module.deliver_webhook, "retry", retry)
    job_id = resp.get_json()["id"]
    assert delivered(job_id)
    set_webhook_row(job_id, webhook_status="pending")  # as if that delivery had been lost
    monkeypatch.setattr(webhooks, "destination", lambda url: ("unresolved", []))
    with pytest.raises(Retried) as retried:
        task_module.deliver_webhook.run(job_id, "d1")
    assert retried.value.args[0]["args"] == [job_id, "d1"]
    assert webhook_row(job_id)[0] == "pending"
    monkeypatch.setattr(webhooks, "destination", lambda url: ("private", []))
    assert task_module.deliver_webhook.run(job_id, "d1") == "refused"
    assert webhook_row(job_id)[0] == "refused"
    shown = client.get(f"/v1/inference/{job_id}", headers=account.headers).get_json()
    assert shown["webhook"]["status"] == "refused"  # the customer can see why none came
    assert task_module.deliver_webhook.run(job_id, "d1") == "done"  # ended: never sent again
    assert len(hook.received) == 1
    # A public destination: the POST goes to the address the check returned.
    set_webhook_row(job_id, webhook_status="pending")
    checked = []
    monkeypatch.setattr(
        webhooks, "destination", lambda url: checked.append(url) or (None, ["127.0.0.1"])
    )
    assert task_module.deliver_webhook.run(job_id, "d1") == "delivered"
    task_module._end(job_id, "failed")  # a late end of another chain
    assert webhook_row(job_id)[0] == "delivered"
    hook.wait_for(2)
    assert checked == [hook.url] and hook.received[1][0]["Flopex-Delivery"] == "d1"


def delivered(job_id: str, timeout: float = 30) -> bool:
    """The worker records the outcome after the receiver answered, in its own process, with no
    event this test could wait on: look until the row says so, within a deadline."""
    deadline = time.monotonic() + timeout
    while webhook_row(job_id)[0] != "delivered":
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def webhook_row(job_id: str) -> tuple[str | None, Any]:
    with session_scope() as session:
        job = session.get(Job, uuid.UUID(job_id))
        return job.webhook_status, job.webhook_attempted_at


def set_webhook_row(job_id: str, **values: Any) -> None:
    with session_scope() as session:
        session.execute(update(Job).where(Job.id == uuid.UUID(job_id)).values(**values))


def test_a_lost_delivery_is_queued_again_by_the_sweeper_once(
    client, pipeline, make_account, receiver, redis_client, celery_app
):
    account = make_account()
    hook = receiver()
    job_id = submit_async(client, account, hook).get_json()["id"]
    hook.wait_for(1)
    assert delivered(job_id)
    # The worker died between the job's final commit and queueing its webhook.
    set_webhook_row(job_id, webhook_status="pending", webhook_attempted_at=None)
    later = datetime.now(UTC) + timedelta(minutes=2)
    with session_scope() as session:
        report = sweep(session, celery_app, redis_client, get_settings(), now=later)
    assert job_id in report.webhooks
    with session_scope() as session:  # the delivery it queued is in flight: left alone
        again = sweep(session, celery_app, redis_client, get_settings(), now=later)
        assert job_id not in again.webhooks
    hook.wait_for(2)
    first, again = hook.received[0], hook.received[1]
    assert again[1] == first[1]
    assert again[0]["Flopex-Delivery"] == first[0]["Flopex-Delivery"]  # receivers dedupe on it
    assert delivered(job_id)  # nothing is owed any more, however late the next sweep runs
    with session_scope() as session:
        much_later = datetime.now(UTC) + timedelta(hours=2)
        late = sweep(session, celery_app, redis_client, get_settings(), now=much_later)
        assert job_id not in late.webhooks


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
        "https://example.com:99999/hook",  # a port out of range: a 500 in the delivery task
    ],
)
def test_callback_url_must_be_an_http_url(client, pipeline, make_account, url):
    account = make_account()
    before = chat_calls(pipeline)
    resp = client.post("/v1/inference", json={**BODY, "callback_url": url}, headers=account.headers)
    assert resp.status_code == 400 and resp.get_json()["error"]["param"] == "callback_url"
    assert chat_calls(pipeline) == before and ledger_kinds(account) == ["topup"]


def test_private_destinations_are_recognised():
    assert webhooks.destination("http://127.0.0.1:9/hook") == ("private", [])
    assert webhooks.destination("http://10.1.2.3/hook") == ("private", [])
    assert webhooks.destination("http://no-such-host.invalid/hook") == ("unresolved", [])
    assert webhooks.destination("https://93.184.216.34/hook") == (None, ["93.184.216.34"])


class TlsReceiver(Receiver):
    """The Receiver behind TLS, with a certificate for ``name`` from a throwaway CA."""

    def __init__(self, ca: Any, name: str) -> None:
        super().__init__()
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ca.issue_cert(name).configure_cert(context)
        self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
        self.port = self.server.server_address[1]


@pytest.fixture
def tls_hook() -> Any:
    import trustme

    ca = trustme.CA()
    # A name that resolves nowhere: reaching it at all proves the connection went to the
    # pinned address, not to a lookup of the name.
    hook = TlsReceiver(ca, "hooks.example.test")
    with ca.cert_pem.tempfile() as ca_file:
        yield hook, ca_file
    hook.server.shutdown()


def test_a_post_goes_to_the_checked_address_with_the_name_for_host_and_tls(tls_hook):
    hook, ca_file = tls_hook
    url = f"https://hooks.example.test:{hook.port}/hook?x=1"
    status = webhooks.post(
        url, b"{}", {"X-T": "1"}, addresses=["127.0.0.1"], timeout=(3, 10), ca_certs=ca_file
    )
    assert status == 200
    hook.wait_for(1)
    headers, body = hook.received[0]
    assert body == b"{}" and headers["Host"] == f"hooks.example.test:{hook.port}"


def test_an_address_that_refuses_the_connection_passes_to_the_next(tls_hook):
    """A receiver published on two addresses, one of them down (an unreachable IPv6 beside a
    working IPv4): the attempt connects to the next one instead of failing every retry."""
    hook, ca_file = tls_hook
    url = f"https://hooks.example.test:{hook.port}/hook"
    status = webhooks.post(
        url, b"{}", {}, addresses=["127.0.0.2", "127.0.0.1"], timeout=(3, 10), ca_certs=ca_file
    )
    assert status == 200
    hook.wait_for(1)
    assert len(hook.received) == 1
    with pytest.raises(urllib3.exceptions.NewConnectionError):  # every address down
        webhooks.post(url, b"{}", {}, addresses=["127.0.0.2"], timeout=(3, 10), ca_certs=ca_file)


def test_a_pinned_post_still_checks_the_certificate_against_the_name(tls_hook):
    hook, ca_file = tls_hook
    with pytest.raises(urllib3.exceptions.HTTPError):
        webhooks.post(
            f"https://elsewhere.example.test:{hook.port}/hook",
            b"{}",
            {},
            addresses=["127.0.0.1"],
            timeout=(3, 10),
            ca_certs=ca_file,
        )
    assert hook.received == []


def test_signatures_expire():
    body = b"{}"
    header = webhooks.sign("whsec_x", 1_000, body)
    assert webhooks.verify("whsec_x", header, body, now=1_100)
    assert not webhooks.verify("whsec_x", header, body, now=2_000)
    assert not webhooks.verify("whsec_y", header, body, now=1_100)


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:9/x",
        "http://10.0.0.5/hook",
        "https://[::1]/hook",
        "http://LOCALHOST:8080/hook",
        "http://api.localhost./hook",
        "http://169.254.169.254/latest/meta-data",
    ],
)
def test_a_callback_url_that_names_a_private_host_is_refused_at_submission(
    client, make_account, monkeypatch, url
):
    """The customer hears at once (400, nothing held or created), not from a webhook that never
    comes; a host name is checked at delivery (no DNS lookup on the request path)."""
    import dataclasses

    from app.api import schemas

    strict = dataclasses.replace(schemas.get_settings(), webhook_allow_private=False)
    monkeypatch.setattr(schemas, "get_settings", lambda: strict)
    account = make_account()
    resp = client.post(
        "/v1/inference",
        json={"model": "qwen-7b", "input": "hi", "max_output_tokens": 8, "callback_url": url},
        headers=account.headers,
    )
    assert resp.status_code == 400
    error = resp.get_json()["error"]
    assert error["code"] == "invalid_request" and error["param"] == "callback_url"
    assert client.get("/v1/inference", headers=account.headers).get_json()["data"] == []


def test_only_hosts_private_on_their_face_are_refused_without_a_lookup():
    assert not webhooks.names_private_host("https://hooks.example.com/x")
    assert not webhooks.names_private_host("https://8.8.8.8/x")
    assert not webhooks.names_private_host("https://localhost.example.com/x")
    assert webhooks.names_private_host("http://[fe80::1]/x")


@pytest.mark.parametrize(
    "url",
    [
        "http://100.100.100.200/latest/meta-data",  # shared space (CGNAT; a cloud's metadata)
        "http://127.1/hook",  # IPv4 shorthands the resolver accepts
        "http://0x7f000001/hook",
        "http://2130706433/hook",
        "http://[::ffff:10.0.0.1]/hook",  # IPv4 written as IPv6
        "http://224.0.0.1/hook",
        "http://192.0.2.10/hook",  # documentation range
    ],
)
def test_every_spelling_of_a_non_public_address_is_recognised(url):
    assert webhooks.names_private_host(url)
    assert webhooks.destination(url) == ("private", [])


def test_a_delivery_tries_at_most_two_addresses_per_family(monkeypatch):
    """A name with hundreds of unreachable records must not hold a worker for minutes."""
    records = [f"2606:4700::{i:x}" for i in range(1, 50)] + [f"8.8.4.{i}" for i in range(1, 50)]
    monkeypatch.setattr(
        webhooks.socket,
        "getaddrinfo",
        lambda host, port, type=0: [(0, 0, 0, "", (a, 0)) for a in records],
    )
    problem, addresses = webhooks.destination("https://many.example.com/hook")
    assert problem is None
    assert addresses == ["2606:4700::1", "2606:4700::2", "8.8.4.1", "8.8.4.2"]
