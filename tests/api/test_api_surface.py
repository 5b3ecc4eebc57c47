"""The API's surface as a client sees it: the routing trace (ranking, fallback, attempts),
timestamps and number types, HTTP headers of errors (Allow, WWW-Authenticate, 415), strict
JSON (no repeated keys), ledger cursors, error messages and the OpenAPI document's details."""

from __future__ import annotations

import gzip
import json
import re
import uuid
from datetime import datetime
from decimal import Decimal
from typing import Any

import pytest

from app.api.parser import load_json
from app.api.prefer import parse_prefer
from app.db import session_scope
from app.exceptions import InvalidRequest
from app.models import Job
from tests.conftest import decimal_json
from tests.factories import MINIMAL_REQUEST as VALID
from tests.factories import footprint, make_probe_results

RFC3339_UTC = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z")
ECONOMY = {**VALID, "performance_profile": "economy"}


@pytest.fixture
def account(catalog, make_account):
    return make_account("10.00")


def post(client: Any, account: Any, body: dict[str, Any], **headers: str) -> Any:
    return client.post("/v1/inference", json=body, headers={**account.headers, **headers})


def stored(job_id: str) -> Job:
    with session_scope() as session:
        job = session.get(Job, uuid.UUID(job_id))
        assert job is not None
        session.expunge(job)
        return job


# -- routing trace -----------------------------------------------------------------------------


def test_the_ranking_is_in_the_response_with_the_stored_scores(client, pipeline, account):
    resp = post(client, account, {**VALID, "performance_profile": "balanced"})
    assert resp.status_code == 200, resp.text
    body = decimal_json(resp.data)
    routing = body["routing"]
    job = stored(body["id"])
    # The order and scores the job stored, the scores as exact numbers (six places).
    assert routing["order"] == [
        {"provider": r["provider"], "score": Decimal(r["score"])} for r in job.routing["order"]
    ]
    assert sorted(r["provider"] for r in routing["order"]) == ["alpha", "bravo", "charlie"]
    scores = [r["score"] for r in routing["order"]]
    assert scores == sorted(scores)  # the ranking is by ascending score
    assert all(r["score"].as_tuple().exponent == -6 for r in routing["order"])
    assert routing["ranked_first"] == routing["winner"] == body["provider"] == "charlie"
    # Served by the first ranked: the reason is the ranking's own, in plain words.
    assert "charlie ranked first among 3 eligible of 3 quotes" in routing["reason"]
    assert "None" not in routing["reason"] and "live=" not in routing["reason"]

    economy = post(client, account, ECONOMY).get_json()["routing"]
    assert economy["order"] == [{"provider": p} for p in ("alpha", "charlie", "bravo")]


def test_a_fallback_names_the_server_as_winner_and_tells_what_happened(client, pipeline, account):
    pipeline["alpha"].configure(fault="error")  # pings fine, every completion fails
    resp = post(client, account, ECONOMY)
    assert resp.status_code == 200, resp.text
    body = resp.get_json()
    routing = body["routing"]
    assert body["provider"] == routing["winner"] == "charlie"
    assert routing["ranked_first"] == routing["order"][0]["provider"] == "alpha"
    # Every attempt has the same shape: an outcome, and the failure kind when it failed.
    attempts = [{k: v for k, v in a.items() if k != "latency_ms"} for a in routing["attempts"]]
    assert attempts == [
        {"provider": "alpha", "outcome": "failed", "failure": "http"},
        {"provider": "charlie", "outcome": "success"},
    ]
    assert all(isinstance(a["latency_ms"], int) for a in routing["attempts"])
    reason = routing["reason"]
    assert "alpha ranked first" in reason and "won" not in reason
    assert reason.endswith("; alpha failed (http); charlie served")
    # GET answers the same trace.
    again = client.get(f"/v1/inference/{body['id']}", headers=account.headers).get_json()
    assert again["routing"] == routing


def test_when_every_provider_fails_there_is_no_winner(client, pipeline, account):
    for provider in pipeline.values():
        provider.configure(fault="error")
    resp = post(client, account, ECONOMY)
    assert resp.status_code == 502, resp.text
    job_id = resp.get_json()["error"]["job_id"]
    job = client.get(f"/v1/inference/{job_id}", headers=account.headers).get_json()
    routing = job["routing"]
    assert routing["winner"] is None and routing["ranked_first"] == "alpha"
    assert {a["outcome"] for a in routing["attempts"]} == {"failed"}
    assert routing["reason"].endswith(
        "; alpha failed (http); charlie failed (http); bravo failed (http)"
    )


def test_stored_rows_of_the_previous_shape_render_in_the_new_one(database):
    from app.jobs.render import routing_summary

    # A row written before this change: "won" in its reason, an attempt without outcome.
    job = Job(
        status="success",
        provider_name="charlie",
        performance_profile="economy",
        routing_strategy="lowest_cost",
        quotes=[],
        routing={
            "order": [{"provider": "alpha"}, {"provider": "charlie"}],
            "dropped": [],
            "winner": "alpha",
            "reason": "economy/lowest_cost: lowest estimated charge; alpha won among 2 eligible",
        },
        attempts=[
            {"provider": "alpha", "failure": "timeout", "status": None, "latency_ms": 5},
            {"provider": "bravo", "started_at": "..."},  # its worker died mid-call
            {"provider": "charlie", "outcome": "success", "latency_ms": 7},
        ],
    )
    routing = routing_summary(job)
    assert routing["winner"] == "charlie" and routing["ranked_first"] == "alpha"
    assert routing["attempts"] == [
        {"provider": "alpha", "outcome": "failed", "failure": "timeout", "latency_ms": 5},
        {"provider": "bravo", "outcome": "failed", "failure": "interrupted"},
        {"provider": "charlie", "outcome": "success", "latency_ms": 7},
    ]
    assert routing["reason"] == (
        "economy/lowest_cost: lowest estimated charge; alpha ranked first among 2 eligible; "
        "alpha failed (timeout); bravo failed (interrupted); charlie served"
    )


# -- timestamps and numbers --------------------------------------------------------------------


def test_a_successful_job_carries_finished_at(client, pipeline, account):
    resp = post(client, account, VALID)
    body = resp.get_json()
    assert RFC3339_UTC.fullmatch(body["finished_at"]), body.get("finished_at")
    assert body["finished_at"] >= body["created_at"]
    polled = client.get(f"/v1/inference/{body['id']}", headers=account.headers)
    assert polled.data == resp.data  # the same object, finished_at included


def test_success_rates_are_numbers_and_probe_times_rfc3339(client, pipeline, account, redis_client):
    from app.providers import health
    from config.settings import get_settings

    make_probe_results(redis_client)  # every provider has a board check
    for name in pipeline:  # and an execution, so a success rate (checks do not count)
        health.record_outcome(redis_client, name, True, get_settings().health_window_s)
    body = decimal_json(post(client, account, VALID).data)
    rates = [q["success_rate"] for q in body["routing"]["quotes"]]
    assert rates and all(isinstance(r, Decimal) for r in rates), rates
    providers = decimal_json(client.get("/v1/providers", headers=account.headers).data)["data"]
    for p in providers:
        assert isinstance(p["success_rate"], Decimal)
        assert RFC3339_UTC.fullmatch(p["checked_at"]), p["checked_at"]
    # The same provider's rate is written the same way in both places.
    assert {type(p["success_rate"]) for p in providers} == {type(r) for r in rates}


# -- HTTP details of errors --------------------------------------------------------------------


def test_405_lists_the_allowed_methods(client, account):
    resp = client.delete("/v1/inference", headers=account.headers)
    assert resp.status_code == 405
    assert resp.get_json()["error"]["code"] == "method_not_allowed"
    assert {"GET", "POST"} <= {m.strip() for m in resp.headers["Allow"].split(",")}
    resp = client.get(f"/v1/inference/{uuid.uuid4()}/cancel", headers=account.headers)
    assert resp.status_code == 405 and "POST" in resp.headers["Allow"]


def test_401_carries_a_bearer_challenge(client, catalog):
    missing = client.get("/v1/wallet")
    assert missing.status_code == 401
    assert missing.headers["WWW-Authenticate"] == 'Bearer realm="flopex"'
    bad = client.get("/v1/wallet", headers={"Authorization": "Bearer fpx_nothere00_aaaa"})
    assert bad.status_code == 401 and bad.get_json()["error"]["code"] == "invalid_api_key"
    assert bad.headers["WWW-Authenticate"] == 'Bearer realm="flopex", error="invalid_token"'


@pytest.mark.parametrize("coding", ["gzip", "deflate", "br", "identity, gzip"])
def test_a_compressed_body_is_415(client, account, coding):
    before = footprint(account)
    resp = client.post(
        "/v1/inference",
        data=gzip.compress(json.dumps(VALID).encode()),
        headers={
            **account.headers,
            "Content-Type": "application/json",
            "Content-Encoding": coding,
        },
    )
    assert resp.status_code == 415, resp.text
    error = resp.get_json()["error"]
    assert error["code"] == "unsupported_media_type" and error["param"] == "Content-Encoding"
    assert resp.headers["Accept-Encoding"] == "identity"
    assert footprint(account) == before


@pytest.mark.parametrize(
    "headers",
    [
        {"Content-Type": "application/json", "Content-Encoding": "identity"},
        {"Content-Type": "text/plain"},  # read as JSON whatever the type (docs/api.md)
        {"Content-Type": "application/x-www-form-urlencoded"},
    ],
)
def test_an_uncompressed_body_is_read_whatever_its_type(client, account, headers):
    # The body is parsed: the answer is about its content (an unknown model), not its type.
    resp = client.post(
        "/v1/inference",
        data=json.dumps({**VALID, "model": "gpt-9"}).encode(),
        headers={**account.headers, **headers},
    )
    assert resp.status_code == 404, resp.text
    assert resp.get_json()["error"]["code"] == "model_not_found"


# -- strict JSON -------------------------------------------------------------------------------


def test_a_repeated_key_is_400_naming_it(client, account):
    before = footprint(account)
    raw = b'{"model": "qwen-7b", "model": "llama-3.1-8b", "input": "x", "max_output_tokens": 8}'
    resp = client.post(
        "/v1/inference", data=raw, headers={**account.headers, "Content-Type": "application/json"}
    )
    assert resp.status_code == 400, resp.text
    error = resp.get_json()["error"]
    assert error["code"] == "invalid_request" and error["param"] == "model"
    assert (
        error["message"].startswith("The request body is not valid JSON")
        and '"model"' in (error["message"])
    )
    assert footprint(account) == before


def test_repeated_keys_are_found_at_any_depth():
    with pytest.raises(InvalidRequest) as err:
        load_json(b'{"metadata": {"a": [{"k": 1, "k": 2}], "env": "x"}, "model": "m"}')
    assert err.value.param == "metadata.a.0.k"
    with pytest.raises(InvalidRequest) as err:
        load_json(b'{"metadata": {"env": 1, "env": 1}}')  # even with equal values
    assert err.value.param == "metadata.env"
    # Equal keys in different objects are not repeats.
    assert load_json(b'{"a": {"k": 1}, "b": {"k": 2}, "k": 3}') == {
        "a": {"k": 1},
        "b": {"k": 2},
        "k": 3,
    }


# -- Prefer ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "wait"),
    [
        ("wait=abc", None),
        ("wait=-1", None),
        ("wait=1.5", None),
        ("wait=", None),
        ("wait", None),
        ('wait="7"', 7.0),
        ("wait=7; foo=bar", 7.0),
        ("WAIT=7", 7.0),
        ("wait=5, wait=9", 5.0),  # the first occurrence counts (RFC 7240 §2)
        ("wait=abc, wait=9", None),
        ("wait=" + "9" * 5000, 60.0),  # beyond int()'s digit limit: past the cap, not a 500
        ("handling=lenient, foo, =, ;", None),
    ],
)
def test_unparsable_preferences_are_ignored(value, wait):
    from werkzeug.datastructures import Headers

    prefs = parse_prefer(Headers({"Prefer": value}), max_wait_s=60.0)
    assert prefs.wait_s == wait and prefs.respond_async is False


# -- ledger cursors ----------------------------------------------------------------------------


def test_a_ledger_cursor_must_be_one_of_your_entries(client, make_account):
    mine, other = make_account("1.00"), make_account("2.00")
    theirs = client.get("/v1/wallet/ledger", headers=other.headers).get_json()["data"][0]["id"]
    for cursor in ("99999999", theirs):
        resp = client.get(f"/v1/wallet/ledger?starting_after={cursor}", headers=mine.headers)
        assert resp.status_code == 404, (cursor, resp.text)
        error = resp.get_json()["error"]
        assert error["code"] == "not_found" and error["param"] == "starting_after"
        # The same answer for another account's entry as for none: nothing is revealed.
        assert error["message"] == f"No ledger entry {cursor}."
    for malformed in ("abc", "0", "007", "1.0", str(2**63)):
        resp = client.get(f"/v1/wallet/ledger?starting_after={malformed}", headers=mine.headers)
        assert resp.status_code == 400, malformed
        assert resp.get_json()["error"]["param"] == "starting_after"
    own = client.get("/v1/wallet/ledger", headers=mine.headers).get_json()["data"][0]["id"]
    page = client.get(f"/v1/wallet/ledger?starting_after={own}", headers=mine.headers)
    assert page.status_code == 200 and page.get_json()["data"] == []


# -- messages ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sent", "shown"),
    [("1E-400", "$0.000000"), ("0.0000099999", "$0.000009"), (0.0000099999, "$0.000009")],
)
def test_max_price_exceeded_shows_the_binding_limit(client, account, sent, shown):
    # Every worst case is a few hundred micro-USD: above each limit, rejected at the front.
    resp = post(client, account, {**VALID, "max_output_tokens": 2048, "max_price_usd": sent})
    assert resp.status_code == 422, resp.text
    error = resp.get_json()["error"]
    assert error["code"] == "max_price_exceeded"
    assert f"exceeds max_price_usd ({shown})" in error["message"], error["message"]
    assert str(sent) not in error["message"]


# -- the OpenAPI document ----------------------------------------------------------------------


def test_the_spec_declares_what_is_sent(client, database):
    spec = client.get("/openapi.json").get_json()
    paths = spec["paths"]
    ledger = {p["name"]: p for p in paths["/v1/wallet/ledger"]["get"]["parameters"]}
    # Entry ids and next_cursor are strings; so is the cursor sent back.
    assert ledger["starting_after"]["schema"]["type"] == "string"
    assert "404" in paths["/v1/wallet/ledger"]["get"]["responses"]
    wait = {p["name"]: p for p in paths["/v1/inference/{job_id}"]["get"]["parameters"]}["wait"]
    assert "FLOPEX_MAX_WAIT_S" in wait["description"]
    request = paths["/v1/inference"]["post"]["requestBody"]["content"]["application/json"]
    name = request["schema"]["$ref"].rsplit("/", 1)[1]
    price = spec["components"]["schemas"][name]["properties"]["max_price_usd"]
    assert {b["type"] for b in price["anyOf"]} == {"number", "string"} and "type" not in price
    post_responses = paths["/v1/inference"]["post"]["responses"]
    assert {"Idempotent-Replayed", "Preference-Applied", "X-Request-ID"} <= set(
        post_responses["200"]["headers"]
    )
    assert {"Location", "Preference-Applied", "Idempotent-Replayed"} <= set(
        post_responses["202"]["headers"]
    )
    assert {"Location", "Retry-After"} <= set(post_responses["409"]["headers"])
    assert "Retry-After" in post_responses["429"]["headers"]
    assert "WWW-Authenticate" in post_responses["401"]["headers"]
    assert "415" in post_responses
    providers = spec["components"]["schemas"]["Provider"]["properties"]
    assert providers["checked_at"]["type"] == "string"
    job = spec["components"]["schemas"]["JobObject"]["properties"]
    assert "finished_at" in job and "ranked_first" in job["routing"]["description"]


def test_a_job_created_at_and_finished_at_parse_as_rfc3339(client, pipeline, account):
    body = post(client, account, VALID).get_json()
    for key in ("created_at", "finished_at"):
        assert (
            datetime.fromisoformat(body[key].replace("Z", "+00:00")).utcoffset().total_seconds()
            == 0
        )
