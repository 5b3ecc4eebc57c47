"""Async jobs: Prefer: respond-async, polling with long-poll, listing, cancel, sync degrading to
202, tenant isolation."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest

from app import wallet
from app.db import session_scope
from tests.conftest import chat_calls, decimal_json, ledger_kinds, metric_samples

BODY = {
    "model": "qwen-7b",
    "input": "Async hello.",
    "max_output_tokens": 16,
    "customer_ref": "batch-1",
    "metadata": {"k": 1},
}
ASYNC = {"Prefer": "respond-async"}


def submit(client: Any, account: Any, body: dict[str, Any] | None = None, **headers: str) -> Any:
    return client.post("/v1/inference", json=body or BODY, headers={**account.headers, **headers})


def test_async_submit_then_long_poll_to_the_exact_final_body(client, pipeline, make_account):
    account = make_account()
    resp = submit(client, account, **ASYNC)
    assert resp.status_code == 202, resp.text
    assert resp.headers["Preference-Applied"] == "respond-async"
    job = resp.get_json()
    assert job["object"] == "inference" and job["status"] == "queued"
    assert (
        job["model"] == "qwen-7b"
        and job["customer_ref"] == "batch-1"
        and job["metadata"] == {"k": 1}
    )
    assert job["created_at"].endswith("Z")
    assert resp.headers["Location"] == f"/v1/inference/{job['id']}"

    final = client.get(f"{resp.headers['Location']}?wait=30", headers=account.headers)
    assert final.status_code == 200
    body = decimal_json(final.data)
    assert body["status"] == "success" and body["id"] == job["id"]
    assert body["output_text"] and body["billing"]["cost_usd"] > 0
    # Polling again gives the same bytes; the job was charged once.
    again = client.get(resp.headers["Location"], headers=account.headers)
    assert again.data == final.data
    entries = ledger_kinds(account)
    assert entries[:3] == ["topup", "hold", "capture"] and entries.count("capture") == 1
    # Nothing is released when the charge used the whole hold.
    assert entries[3:] in ([], ["release"])
    with session_scope() as session:
        balance = wallet.get_state(session, account.wallet_id).balance_micros
    assert Decimal(balance) / 10**6 == body["billing"]["balance_remaining_usd"]


def test_sync_call_past_its_wait_answers_202_and_the_job_completes(client, pipeline, make_account):
    account = make_account()
    for provider in pipeline.values():
        provider.configure(latency_ms=1500)
    resp = submit(client, account, Prefer="wait=1")
    assert resp.status_code == 202, resp.text
    job = resp.get_json()
    assert job["status"] in ("queued", "running")
    final = client.get(f"/v1/inference/{job['id']}?wait=30", headers=account.headers).get_json()
    assert final["status"] == "success"
    assert ledger_kinds(account).count("capture") == 1


def test_long_poll_returns_when_the_job_finishes(client, pipeline, make_account):
    account = make_account()
    for provider in pipeline.values():
        provider.configure(latency_ms=300)
    job = submit(client, account, **ASYNC).get_json()
    resp = client.get(f"/v1/inference/{job['id']}?wait=30", headers=account.headers)
    assert resp.get_json()["status"] == "success"
    # Without wait, a poll answers at once with the current state.
    assert (
        client.get(f"/v1/inference/{job['id']}?wait=0", headers=account.headers).status_code == 200
    )


def test_list_filters_and_paginates(client, pipeline, make_account):
    account = make_account()
    ids = []
    for ref in ("a", "b", "a"):
        r = submit(client, account, {**BODY, "customer_ref": ref})
        assert r.status_code == 200
        ids.append(r.get_json()["id"])
    page = client.get("/v1/inference?limit=2", headers=account.headers).get_json()
    assert page["object"] == "list" and page["has_more"] is True
    assert [j["id"] for j in page["data"]] == [ids[2], ids[1]]
    nxt = client.get(
        f"/v1/inference?limit=2&starting_after={page['next_cursor']}", headers=account.headers
    ).get_json()
    assert [j["id"] for j in nxt["data"]] == [ids[0]] and nxt["has_more"] is False

    refs = client.get("/v1/inference?customer_ref=a", headers=account.headers).get_json()
    assert [j["id"] for j in refs["data"]] == [ids[2], ids[0]]
    by_model = client.get("/v1/inference?model=qwen-7b", headers=account.headers).get_json()
    assert [j["id"] for j in by_model["data"]] == ids[::-1]
    assert (
        client.get("/v1/inference?model=llama-3.1-8b", headers=account.headers).get_json()["data"]
        == []
    )
    assert (
        len(client.get("/v1/inference?status=success", headers=account.headers).get_json()["data"])
        == 3
    )
    assert (
        client.get("/v1/inference?status=queued", headers=account.headers).get_json()["data"] == []
    )
    future = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
    past = (datetime.now(UTC) - timedelta(hours=1)).isoformat()
    assert (
        client.get(
            "/v1/inference", query_string={"created_after": future}, headers=account.headers
        ).get_json()["data"]
        == []
    )
    assert (
        len(
            client.get(
                "/v1/inference", query_string={"created_after": past}, headers=account.headers
            ).get_json()["data"]
        )
        == 3
    )
    for bad in ("status=done", "limit=0", "created_after=yesterday", "starting_after=nope", "x=1"):
        assert client.get(f"/v1/inference?{bad}", headers=account.headers).status_code == 400, bad
    # PostgreSQL text cannot hold NUL: a clear 400, not a 500 (found by the fuzz test).
    nul = client.get("/v1/inference?customer_ref=a%00b", headers=account.headers)
    assert nul.status_code == 400
    assert nul.get_json()["error"]["code"] == "invalid_request"
    assert nul.get_json()["error"]["param"] == "customer_ref"


def _finished(client: Any) -> dict[tuple[tuple[str, str], ...], float]:
    """flopex_jobs_finished_total as GET /metrics shows it, by (code, status)."""
    return metric_samples(
        client.get("/metrics").get_data(as_text=True), "flopex_jobs_finished_total"
    )


CANCELLED = (("code", ""), ("status", "cancelled"))


def test_cancel_before_execution_releases_the_hold(client, pipeline, make_account):
    account = make_account()
    for provider in pipeline.values():
        provider.configure(latency_ms=1500)  # the quotes take a while: the job stays queued
    job = submit(client, account, {**BODY, "performance_profile": "economy"}, **ASYNC).get_json()
    cancelled_before = _finished(client).get(CANCELLED, 0.0)
    resp = client.post(f"/v1/inference/{job['id']}/cancel", headers=account.headers)
    assert resp.status_code == 200, resp.text
    body = resp.get_json()
    assert body["status"] == "cancelled" and body["error"]["code"] == "job_cancelled"
    assert ledger_kinds(account) == ["topup", "hold", "release"]
    with session_scope() as session:
        state = wallet.get_state(session, account.wallet_id)
        assert state.held_micros == 0 and state.balance_micros == 10 * 10**6
    # The routing that was under way finds the job cancelled and calls no provider.
    final = client.get(f"/v1/inference/{job['id']}?wait=5", headers=account.headers).get_json()
    assert final["status"] == "cancelled"
    assert sum(chat_calls(pipeline).values()) == 0
    again = client.post(f"/v1/inference/{job['id']}/cancel", headers=account.headers)
    assert again.status_code == 409 and again.get_json()["error"]["code"] == "job_not_cancellable"
    # Counted once, by the cancellation: not by the refused second one, nor by the routing that
    # found the job cancelled.
    assert _finished(client).get(CANCELLED, 0.0) == cancelled_before + 1


def test_a_finished_job_cannot_be_cancelled(client, pipeline, make_account):
    account = make_account()
    job = submit(client, account).get_json()
    resp = client.post(f"/v1/inference/{job['id']}/cancel", headers=account.headers)
    assert resp.status_code == 409
    error = resp.get_json()["error"]
    # An error about a job that exists names it (docs/api.md).
    assert error["code"] == "job_not_cancellable" and error["job_id"] == job["id"]


def test_job_path_errors_name_the_job_id_parameter(client, pipeline, make_account):
    account = make_account()
    for resp in (
        client.get("/v1/inference/not-a-uuid", headers=account.headers),
        client.post(f"/v1/inference/{'0' * 32}/cancel", headers=account.headers),
    ):
        assert resp.status_code == 404
        # The path parameter is {job_id} in the OpenAPI document; the error says the same.
        assert resp.get_json()["error"]["param"] == "job_id"
        assert "job_id" not in resp.get_json()["error"]  # no job exists to name


def test_created_after_and_created_before_are_exclusive(client, pipeline, make_account):
    account = make_account()
    job = submit(client, account).get_json()
    at = datetime.fromisoformat(job["created_at"].replace("Z", "+00:00"))
    micro = timedelta(microseconds=1)

    def listed(**query: str) -> list[str]:
        resp = client.get("/v1/inference", query_string=query, headers=account.headers)
        assert resp.status_code == 200, resp.text
        return [j["id"] for j in resp.get_json()["data"]]

    assert listed(created_after=job["created_at"]) == []
    assert listed(created_before=job["created_at"]) == []
    assert listed(created_after=(at - micro).isoformat()) == [job["id"]]
    assert listed(created_before=(at + micro).isoformat()) == [job["id"]]
    spec = client.get("/openapi.json").get_json()
    params = {p["name"]: p for p in spec["paths"]["/v1/inference"]["get"]["parameters"]}
    assert "strictly after" in params["created_after"]["description"]
    assert "strictly before" in params["created_before"]["description"]


def test_other_accounts_jobs_are_404_and_never_listed(client, pipeline, make_account):
    owner, other = make_account(), make_account()
    job = submit(client, owner).get_json()
    for path in (
        f"/v1/inference/{job['id']}",
        "/v1/inference/not-a-uuid",
        "/v1/inference/" + "0" * 32,
    ):
        resp = client.get(path, headers=other.headers)
        assert resp.status_code == 404 and resp.get_json()["error"]["code"] == "job_not_found"
    cancel = client.post(f"/v1/inference/{job['id']}/cancel", headers=other.headers)
    assert cancel.status_code == 404
    assert client.get("/v1/inference", headers=other.headers).get_json()["data"] == []
    cursor = client.get(f"/v1/inference?starting_after={job['id']}", headers=other.headers)
    assert cursor.status_code == 404
    assert cursor.get_json()["error"]["param"] == "starting_after"


def test_async_idempotency_replays_the_same_job(client, pipeline, make_account):
    account = make_account()
    first = submit(client, account, **ASYNC, **{"Idempotency-Key": "async-1"})
    second = submit(client, account, **ASYNC, **{"Idempotency-Key": "async-1"})
    assert first.status_code == second.status_code == 202
    assert second.data == first.data and second.headers["Idempotent-Replayed"] == "true"
    assert second.headers["Location"] == first.headers["Location"]
    client.get(f"{first.headers['Location']}?wait=30", headers=account.headers)
    assert sum(chat_calls(pipeline).values()) == 1


def test_a_prefer_header_is_never_an_error(client, pipeline, make_account):
    # RFC 7240 §2: a preference the server does not understand or cannot parse is ignored.
    account = make_account()
    resp = submit(client, account, Prefer='wait=soon, wait=5, x-unknown="1", ;;, =3')
    assert resp.status_code == 200, resp.text
    # The first wait counts (§2), and it was unusable: nothing bounded the wait, nothing applied.
    assert "Preference-Applied" not in resp.headers
    assert submit(client, account, Prefer="wait=-1").status_code == 200
    assert submit(client, account, Prefer="wait=1.5").status_code == 200


def test_an_honoured_wait_is_named_in_preference_applied(client, pipeline, make_account):
    account = make_account()
    resp = submit(client, account, Prefer="wait=20")
    assert resp.status_code == 200 and resp.headers["Preference-Applied"] == "wait=20"
    # More than the cap: the value actually allowed.
    capped = submit(client, account, Prefer="wait=100000")
    assert capped.headers["Preference-Applied"] == "wait=60"
    # With respond-async the call did not wait: only respond-async was applied.
    both = submit(client, account, Prefer="respond-async, wait=20")
    assert both.status_code == 202 and both.headers["Preference-Applied"] == "respond-async"
    client.get(f"{both.headers['Location']}?wait=30", headers=account.headers)


def assert_one_provider_call(job: dict[str, Any]) -> None:
    """The job called one provider once: every call is recorded as an attempt before it is
    made. (A count of the sandboxes' calls would also see earlier tests' jobs, which the
    sweeps below, run as if ten minutes later, pick up too.)"""
    assert [(a["provider"], a.get("outcome")) for a in job["routing"]["attempts"]] == [
        (job["provider"], "success")
    ]


def swept_to_success(
    client: Any, account: Any, job_id: str, celery_app: Any, redis_client: Any
) -> None:
    """The sweeper, run as if ten minutes later, quotes the stranded job again; it then
    succeeds, charged once, after one provider call."""
    from app.jobs.recovery import sweep
    from config.settings import get_settings

    with session_scope() as session:
        later = datetime.now(UTC) + timedelta(minutes=10)
        report = sweep(session, celery_app, redis_client, get_settings(), grace_s=0, now=later)
    assert job_id in report.requoted
    final = client.get(f"/v1/inference/{job_id}?wait=30", headers=account.headers).get_json()
    assert final["status"] == "success"
    assert ledger_kinds(account).count("capture") == 1
    assert_one_provider_call(final)


@pytest.mark.parametrize(
    "failure",
    [
        "OperationalError",  # no connection to the broker
        "BatchPublishError",  # the batch's pipeline failed: delivery uncertain
    ],
)
def test_a_job_accepted_while_the_broker_is_down_completes_via_the_sweeper(
    client, pipeline, make_account, monkeypatch, celery_app, redis_client, failure
):
    from kombu import exceptions

    from app.jobs import command

    account = make_account()

    def broker_down(*_args, **_kwargs):
        raise getattr(exceptions, failure)("connection refused")

    monkeypatch.setattr(command, "dispatch", broker_down)
    resp = submit(client, account, **{"Idempotency-Key": "broker-down"})
    assert resp.status_code == 202  # durable: accepted, not lost
    job = resp.get_json()
    assert job["status"] == "queued" and sum(chat_calls(pipeline).values()) == 0
    monkeypatch.undo()

    swept_to_success(client, account, job["id"], celery_app, redis_client)
    # The key stayed with the job: a retry waits for and replays its outcome.
    replay = submit(client, account, **{"Idempotency-Key": "broker-down"})
    assert replay.status_code == 200 and replay.get_json()["id"] == job["id"]
    again = client.get(f"/v1/inference/{job['id']}", headers=account.headers).get_json()
    assert_one_provider_call(again)
    assert ledger_kinds(account).count("capture") == 1


def test_an_async_job_is_published_once_its_answer_is_sent(
    client, pipeline, make_account, monkeypatch
):
    from app.jobs import command

    account = make_account()
    published = []
    dispatch = command.dispatch

    def recording(celery, accepted, settings):
        published.append(str(accepted.job.id))
        dispatch(celery, accepted, settings)

    monkeypatch.setattr(command, "dispatch", recording)
    resp = client.post(
        "/v1/inference", json=BODY, headers={**account.headers, **ASYNC}, buffered=False
    )
    assert resp.status_code == 202
    job = resp.get_json()
    assert published == []  # the server has not closed the response yet
    resp.close()  # what a WSGI server does once the last byte is sent
    assert published == [job["id"]]
    final = client.get(f"/v1/inference/{job['id']}?wait=30", headers=account.headers).get_json()
    assert final["status"] == "success"


def test_an_async_job_whose_publish_fails_after_its_202_completes_via_the_sweeper(
    client, pipeline, make_account, monkeypatch, celery_app, redis_client, caplog
):
    from kombu.exceptions import OperationalError

    from app.jobs import command

    account = make_account()

    def broker_down(*_args, **_kwargs):
        raise OperationalError("connection refused")

    monkeypatch.setattr(command, "dispatch", broker_down)
    resp = submit(client, account, **ASYNC)
    assert resp.status_code == 202
    job = resp.get_json()
    assert "left for the sweeper" in caplog.text and job["id"] in caplog.text
    monkeypatch.undo()

    swept_to_success(client, account, job["id"], celery_app, redis_client)
