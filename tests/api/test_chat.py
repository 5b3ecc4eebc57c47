"""POST /v1/chat/completions and GET /v1/models through the official `openai` SDK, over real
HTTP to the app (a threaded WSGI server on loopback), with the real worker, Redis, PostgreSQL
and sandbox providers behind it."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import openai
import pytest
from sqlalchemy import select, update
from werkzeug.serving import make_server

from app.db import session_scope
from app.models import Account, Job, LedgerEntry
from app.money import micros_to_usd
from tests.conftest import chat_calls, decimal_json

MODEL = "llama-3.1-8b"
HELLO = [{"role": "user", "content": "Say hello to the exchange."}]


@pytest.fixture(scope="module")
def base_url(flask_app: Any) -> Iterator[str]:
    server = make_server("127.0.0.1", 0, flask_app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}/v1"
    finally:
        server.shutdown()
        thread.join()


@pytest.fixture
def sdk(base_url: str, pipeline: Any, make_account: Any) -> Any:
    """An SDK client of a new funded account; no automatic retries, so each call is one
    request and an error surfaces as its exception."""

    def make(balance_usd: str = "10.00", **kwargs: Any) -> tuple[openai.OpenAI, Any]:
        account = make_account(balance_usd)
        kwargs.setdefault("max_retries", 0)
        client = openai.OpenAI(base_url=base_url, api_key=account.api_key, timeout=60, **kwargs)
        return client, account

    return make


def _job(job_id: str) -> Job:
    with session_scope() as session:
        job = session.get(Job, job_id)
        assert job is not None
        session.expunge(job)
        return job


def _ledger(account: Any) -> list[LedgerEntry]:
    with session_scope() as session:
        rows = list(
            session.scalars(
                select(LedgerEntry)
                .where(LedgerEntry.wallet_id == account.wallet_id)
                .order_by(LedgerEntry.id)
            )
        )
        session.expunge_all()
        return rows


def _last_request(pipeline: Any, provider: str) -> dict[str, Any]:
    log = pipeline[provider].requests_log()
    assert log, f"{provider} received nothing"
    return dict(log[-1])


def test_plain_chat_is_a_job_of_the_exchange(sdk, pipeline, client):
    api, account = sdk()
    raw = api.chat.completions.with_raw_response.create(model=MODEL, messages=HELLO, max_tokens=16)
    completion = raw.parse()
    assert isinstance(completion, openai.types.chat.ChatCompletion)
    assert completion.object == "chat.completion" and completion.model == MODEL
    choice = completion.choices[0]
    assert choice.message.role == "assistant" and choice.finish_reason in ("stop", "length")
    assert choice.message.content and choice.message.tool_calls is None
    usage = completion.usage
    assert usage is not None and usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    flopex = completion.model_extra["flopex"]
    job_id = flopex["job_id"]
    assert raw.headers["X-Flopex-Job-Id"] == job_id
    # The same job as a native request's: visible, in the list, charged once.
    native = client.get(f"/v1/inference/{job_id}", headers=account.headers).get_json()
    assert native["status"] == "success" and native["output_text"] == choice.message.content
    assert native["provider"] == flopex["provider"]
    assert native["usage"]["output_tokens"] == usage.completion_tokens
    listed = client.get("/v1/inference", headers=account.headers).get_json()["data"]
    assert [j["id"] for j in listed] == [job_id]
    kinds = [e.kind for e in _ledger(account)]
    assert kinds.count("capture") == 1 and kinds.count("hold") == 1
    # The provider got the messages and the limit, nothing more.
    sent = _last_request(pipeline, flopex["provider"])
    assert sent["messages"] == HELLO and sent["max_tokens"] == 16
    assert set(sent) == {"model", "messages", "max_tokens"}


def test_ledger_equals_flopex_billing_to_the_micro_dollar(sdk, base_url):
    api, account = sdk("3.00")
    raw = api.chat.completions.with_raw_response.create(model=MODEL, messages=HELLO, max_tokens=32)
    # Parsed with exact decimals, as the amounts are written.
    billing = decimal_json(raw.text)["flopex"]["billing"]
    capture = next(e for e in _ledger(account) if e.kind == "capture")
    assert micros_to_usd(-capture.amount_micros) == billing["cost_usd"]
    assert micros_to_usd(capture.balance_after_micros) == billing["balance_remaining_usd"]
    assert Decimal("3.00") - billing["cost_usd"] == billing["balance_remaining_usd"]
    job = _job(raw.headers["X-Flopex-Job-Id"])
    assert micros_to_usd(job.charge_micros or 0) == billing["cost_usd"]


def test_system_developer_and_multi_turn_messages_reach_the_provider(sdk, pipeline):
    api, _ = sdk()
    messages: list[dict[str, Any]] = [
        {"role": "system", "content": "You are terse."},
        {"role": "developer", "content": [{"type": "text", "text": "Answer in words."}]},
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "Paris."},
        {"role": "user", "content": [{"type": "text", "text": "And of Italy?"}]},
    ]
    completion = api.chat.completions.create(
        model=MODEL, messages=messages, max_completion_tokens=8
    )
    sent = _last_request(pipeline, completion.model_extra["flopex"]["provider"])
    # developer is sent as system (the open models' servers know only that role)
    assert sent["messages"] == [messages[0], {**messages[1], "role": "system"}, *messages[2:]]
    assert sent["max_tokens"] == 8
    # The prompt the provider counted is every message, not only the last.
    assert completion.usage is not None and completion.usage.prompt_tokens > 20


WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string"},
                "unit": {"type": "string", "enum": ["c", "f"]},
            },
            "required": ["city", "unit"],
        },
    },
}


def test_tools_round_trip(sdk, pipeline, client):
    api, account = sdk()
    messages: list[Any] = [{"role": "user", "content": "Weather in Paris?"}]
    first = api.chat.completions.create(
        model=MODEL, messages=messages, tools=[WEATHER], tool_choice="auto", max_tokens=64
    )
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    (call,) = choice.message.tool_calls or []
    assert call.type == "function" and call.function.name == "get_weather"
    arguments = json.loads(call.function.arguments)
    assert set(arguments) == {"city", "unit"} and arguments["unit"] in ("c", "f")
    provider = first.model_extra["flopex"]["provider"]
    polled = client.get(
        f"/v1/inference/{first.model_extra['flopex']['job_id']}", headers=account.headers
    )
    assert polled.get_json()["tool_calls"] == [call.model_dump()]
    sent = _last_request(pipeline, provider)
    assert sent["tools"] == [WEATHER] and sent["tool_choice"] == "auto"

    messages += [
        choice.message.model_dump(),  # "refusal": null and all: not sent on
        {"role": "tool", "tool_call_id": call.id, "content": '{"temp": 21}'},
    ]
    second = api.chat.completions.create(
        model=MODEL, messages=messages, tools=[WEATHER], max_tokens=16
    )
    assert second.choices[0].finish_reason in ("stop", "length")
    assert second.choices[0].message.content and not second.choices[0].message.tool_calls
    sent = _last_request(pipeline, second.model_extra["flopex"]["provider"])
    assert sent["messages"][-1] == messages[-1]
    assert sent["messages"][1] == choice.message.model_dump(exclude_none=True) | {"content": None}
    assert sent["messages"][1]["tool_calls"][0]["id"] == call.id
    # tool_choice "none": no call, whatever the tools.
    none = api.chat.completions.create(
        model=MODEL, messages=messages[:1], tools=[WEATHER], tool_choice="none", max_tokens=8
    )
    assert none.choices[0].message.tool_calls is None


def test_sampling_and_format_parameters_go_to_the_provider_unchanged(sdk, pipeline):
    api, _ = sdk()
    schema = {
        "type": "object",
        "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
        "required": ["name", "age"],
    }
    params: dict[str, Any] = {
        "temperature": 0.25,
        "top_p": 0.9,
        "stop": ["\n\n", "END"],
        "seed": 7,
        "presence_penalty": 0.5,
        "frequency_penalty": -0.5,
        "logit_bias": {"50256": -100},
        "parallel_tool_calls": False,
        "response_format": {
            "type": "json_schema",
            "json_schema": {"name": "person", "schema": schema, "strict": True},
        },
    }
    completion = api.chat.completions.create(
        model=MODEL, messages=HELLO, max_tokens=32, user="end-user-1", **params
    )
    content = json.loads(completion.choices[0].message.content or "")
    assert isinstance(content["name"], str) and isinstance(content["age"], int)
    job_id = completion.model_extra["flopex"]["job_id"]
    sent = _last_request(pipeline, completion.model_extra["flopex"]["provider"])
    assert {k: sent[k] for k in params} == params
    assert "user" not in sent  # kept with the job, not sent on (docs/api.md)
    # Stored with the job, so a resumed or retried execution sends the same request.
    job = _job(job_id)
    assert job.provider_params == params and job.messages == HELLO
    assert job.request["user"] == "end-user-1"

    plain = api.chat.completions.create(
        model=MODEL, messages=HELLO, max_tokens=32, response_format={"type": "json_object"}
    )
    assert isinstance(json.loads(plain.choices[0].message.content or ""), dict)


def test_extra_body_carries_the_exchange_controls(sdk, client):
    api, account = sdk()
    completion = api.chat.completions.create(
        model=MODEL,
        messages=HELLO,
        max_tokens=8,
        extra_body={
            "performance_profile": "fast",
            "customer_ref": "order-42",
            "metadata": {"team": "search"},
            "max_price_usd": "0.01",
        },
    )
    flopex = completion.model_extra["flopex"]
    assert flopex["provider"] == "bravo"  # the fastest (tests/conftest.py)
    assert flopex["routing"]["performance_profile"] == "fast"
    assert flopex["customer_ref"] == "order-42" and flopex["metadata"] == {"team": "search"}
    listed = client.get("/v1/inference?customer_ref=order-42", headers=account.headers)
    assert [j["id"] for j in listed.get_json()["data"]] == [flopex["job_id"]]
    # The same validation and errors as /v1/inference.
    with pytest.raises(openai.UnprocessableEntityError) as refused:
        api.chat.completions.create(
            model=MODEL,
            messages=HELLO,
            max_tokens=8,
            extra_body={"max_price_usd": "0.0000001"},
        )
    assert refused.value.code == "max_price_exceeded" and refused.value.param == "max_price_usd"
    with pytest.raises(openai.BadRequestError) as bad:
        api.chat.completions.create(
            model=MODEL, messages=HELLO, extra_body={"performance_profile": "turbo"}
        )
    assert bad.value.code == "invalid_request" and bad.value.param == "performance_profile"


def test_idempotent_retry_through_extra_headers(sdk, pipeline):
    api, account = sdk()
    headers = {"Idempotency-Key": "chat-retry-1"}
    first = api.chat.completions.with_raw_response.create(
        model=MODEL, messages=HELLO, max_tokens=8, extra_headers=headers
    )
    calls = sum(chat_calls(pipeline).values())
    again = api.chat.completions.with_raw_response.create(
        model=MODEL, messages=HELLO, max_tokens=8, extra_headers=headers
    )
    assert again.headers["Idempotent-Replayed"] == "true"
    assert again.text == first.text  # the first answer, byte for byte
    assert again.headers["X-Flopex-Job-Id"] == first.headers["X-Flopex-Job-Id"]
    assert sum(chat_calls(pipeline).values()) == calls  # not executed again
    assert [e.kind for e in _ledger(account)].count("capture") == 1
    with pytest.raises(openai.UnprocessableEntityError) as reused:
        api.chat.completions.create(
            model=MODEL, messages=HELLO, max_tokens=9, extra_headers=headers
        )
    assert reused.value.code == "idempotency_key_reused_with_different_request"


def test_respond_async_answers_the_job_to_poll(sdk, client):
    api, account = sdk()
    raw = api.chat.completions.with_raw_response.create(
        model=MODEL,
        messages=HELLO,
        max_tokens=8,
        extra_headers={"Prefer": "respond-async"},
    )
    assert raw.status_code == 202
    job = json.loads(raw.text)
    assert job["object"] == "inference" and job["status"] == "queued"
    assert raw.headers["Location"] == f"/v1/inference/{job['id']}"
    assert raw.headers["X-Flopex-Job-Id"] == job["id"]
    assert raw.headers["Preference-Applied"] == "respond-async"
    done = client.get(f"/v1/inference/{job['id']}?wait=30", headers=account.headers)
    assert done.get_json()["status"] == "success"


def test_absent_max_tokens_is_the_models_documented_default_and_is_held(sdk, pipeline):
    api, account = sdk()
    model = api.models.retrieve(MODEL)
    default = model.model_extra["default_max_tokens"]
    assert default == min(4096, model.model_extra["max_output_tokens"])
    completion = api.chat.completions.create(model=MODEL, messages=HELLO)
    job = _job(completion.model_extra["flopex"]["job_id"])
    assert job.max_output_tokens == default
    assert _last_request(pipeline, job.provider_name or "")["max_tokens"] == default
    hold = next(e for e in _ledger(account) if e.kind == "hold")
    assert hold.held_delta_micros == job.hold_micros >= (job.charge_micros or 0)
    # The hold covers the default: the worst case among the quotes at that many tokens.
    assert job.hold_micros == max(q["estimated_charge_micros"] for q in job.quotes or [])


def test_models_list_and_retrieve_parse_with_our_fields(sdk):
    api, _ = sdk()
    models = {m.id: m for m in api.models.list()}
    assert {"llama-3.1-8b", "qwen-7b"} <= set(models)
    llama = models["llama-3.1-8b"]
    assert isinstance(llama, openai.types.Model)
    assert llama.object == "model" and llama.owned_by == "flopex"
    assert llama.model_extra["context_length"] == 16384
    assert llama.model_extra["providers"] == 3
    assert llama.model_extra["pricing"]["input_usd_per_million"]["min"] == 0.05
    retrieved = api.models.retrieve("qwen-7b")
    assert retrieved.id == "qwen-7b" and retrieved.model_extra["max_output_tokens"] == 2048
    assert retrieved.model_dump() == models["qwen-7b"].model_dump()
    with pytest.raises(openai.NotFoundError) as missing:
        api.models.retrieve("gpt-7")
    assert missing.value.code == "model_not_found"


@pytest.mark.parametrize(
    ("kwargs", "param", "says"),
    [
        (
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {"type": "text", "text": "What is this?"},
                            {"type": "image_url", "image_url": {"url": "https://x/y.png"}},
                        ],
                    }
                ]
            },
            "messages[0].content[1]",
            "image_url",
        ),
        ({"n": 2}, "n", "n must be 1"),
        (
            {"stream_options": {"include_usage": True}},
            "stream_options",
            "only allowed when stream is true",
        ),
        ({"logprobs": True}, "logprobs", "not supported"),
        ({"extra_body": {"temperature_x": 1}}, "temperature_x", "Unrecognized"),
        ({"temperature": 3}, "temperature", "between"),
        ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages[0]", "role"),
        ({"messages": [{"role": "tool", "content": "42"}]}, "messages[0].tool_call_id", ""),
        ({"tool_choice": "auto"}, "tool_choice", "needs tools"),
        ({"max_tokens": 5000}, "max_tokens", "allows at most"),
    ],
)
def test_requests_we_cannot_carry_are_a_clear_400(sdk, pipeline, kwargs, param, says):
    api, account = sdk()
    body: dict[str, Any] = {"model": MODEL, "messages": HELLO, **kwargs}
    with pytest.raises(openai.BadRequestError) as refused:
        api.chat.completions.create(**body)
    assert refused.value.status_code == 400 and refused.value.param == param
    assert says in refused.value.message
    assert sum(chat_calls(pipeline).values()) == 0
    assert _ledger(account)[-1].kind == "topup"  # nothing held, nothing charged


def test_every_error_class_of_the_sdk(sdk, base_url, pipeline):
    api, _ = sdk("0.00")
    bad_key = openai.OpenAI(base_url=base_url, api_key="fx_live_nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as unauthenticated:
        bad_key.chat.completions.create(model=MODEL, messages=HELLO)
    assert unauthenticated.value.code == "invalid_api_key"
    with pytest.raises(openai.NotFoundError) as unknown:
        api.chat.completions.create(model="gpt-7", messages=HELLO)
    assert unknown.value.code == "model_not_found" and unknown.value.param == "model"
    # 402 has no class of its own in the SDK: APIStatusError with our code.
    with pytest.raises(openai.APIStatusError) as broke:
        api.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=8)
    assert broke.value.status_code == 402 and broke.value.code == "insufficient_balance"
    # 503 with Retry-After: a model nobody serves.
    with pytest.raises(openai.InternalServerError) as unserved:
        api.chat.completions.create(model="orphan-1b", messages=HELLO, max_tokens=8)
    assert unserved.value.status_code == 503 and unserved.value.code == "no_provider_available"
    assert int(unserved.value.response.headers["Retry-After"]) >= 1
    # 429 with Retry-After (a new account: a key's limits are cached with it).
    limited, other = sdk()
    with session_scope() as session:
        session.execute(
            update(Account)
            .where(Account.id == other.account_id)
            .values(rate_limit_per_min=1, rate_limit_burst=1)
        )
    limited.models.list()  # the one request the limit allows
    with pytest.raises(openai.RateLimitError) as throttled:
        limited.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=8)
    assert throttled.value.code == "rate_limited"
    assert int(throttled.value.response.headers["Retry-After"]) >= 1


def test_a_failed_job_answers_the_one_error_shape_with_its_job(sdk, pipeline):
    api, account = sdk()
    for provider in pipeline.values():
        provider.configure(fault="error")
    with pytest.raises(openai.APIStatusError) as failed:
        api.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=8)
    assert failed.value.status_code == 502 and failed.value.code == "provider_error"
    job_id = failed.value.body["job_id"]  # type: ignore[index]
    assert failed.value.response.headers["X-Flopex-Job-Id"] == job_id
    assert _job(job_id).status == "failed"
    assert [e.kind for e in _ledger(account)].count("capture") == 0


def test_the_native_api_sends_providers_the_same_request_as_before(client, pipeline, make_account):
    """/v1/inference is unchanged by the chat door: one user message and the limit, and its
    answer keeps the inference shape."""
    account = make_account()
    body = {"model": MODEL, "input": "native", "max_output_tokens": 8}
    resp = client.post("/v1/inference", json=body, headers=account.headers)
    assert resp.status_code == 200
    answer = resp.get_json()
    assert answer["object"] == "inference" and "flopex" not in answer
    assert "X-Flopex-Job-Id" not in resp.headers
    sent = _last_request(pipeline, answer["provider"])
    assert sent == {
        "model": sent["model"],
        "messages": [{"role": "user", "content": "native"}],
        "max_tokens": 8,
    }
    job = _job(answer["id"])
    assert job.messages is None and job.provider_params is None and job.tool_calls is None


def test_a_fault_of_ours_is_a_503_naming_the_job(sdk, client, monkeypatch):
    """Redis failing while the answer is awaited: the SDK sees a retryable 503 with the job's
    id (body and header); the job still completes, charged once."""
    import redis

    from app.jobs import command

    def redis_down(*_args: Any, **_kwargs: Any) -> Any:
        raise redis.ConnectionError("Connection refused.")

    # The SDK's own retries on: it is told not to resubmit a job that may be charged.
    api, account = sdk(max_retries=2)
    monkeypatch.setattr(command, "wait_done", redis_down)
    with pytest.raises(openai.InternalServerError) as unavailable:
        api.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=8)
    monkeypatch.undo()
    assert unavailable.value.response.headers["X-Should-Retry"] == "false"
    assert len(_ledger(account)) == 2  # topup and one hold: one job, not three
    error = unavailable.value
    assert error.status_code == 503 and error.code == "service_unavailable"
    job_id = error.body["job_id"]  # type: ignore[index]
    assert error.response.headers["X-Flopex-Job-Id"] == job_id
    assert int(error.response.headers["Retry-After"]) >= 1
    done = client.get(f"/v1/inference/{job_id}?wait=30", headers=account.headers).get_json()
    assert done["status"] == "success"
    assert [e.kind for e in _ledger(account)].count("capture") == 1


def test_a_keyed_request_is_retried_by_the_sdk_through_a_fault_and_charged_once(sdk, monkeypatch):
    """With an Idempotency-Key the 503 leaves retrying to the SDK (Retry-After: 1): its retry
    finds the first job and answers its outcome."""
    import redis

    from app.jobs import command

    real_wait = command.wait_done
    failures = []

    def redis_down_once(*args: Any, **kwargs: Any) -> Any:
        if not failures:
            failures.append(1)
            raise redis.ConnectionError("Connection refused.")
        return real_wait(*args, **kwargs)

    api, account = sdk(max_retries=2)
    monkeypatch.setattr(command, "wait_done", redis_down_once)
    raw = api.chat.completions.with_raw_response.create(
        model=MODEL, messages=HELLO, max_tokens=8, extra_headers={"Idempotency-Key": "k-503"}
    )
    # At least the one retry (more if the shared database hiccups meanwhile: also a 503).
    assert failures == [1] and raw.retries_taken >= 1
    assert raw.headers["Idempotent-Replayed"] == "true"
    assert raw.parse().choices[0].message.content
    assert [e.kind for e in _ledger(account)].count("capture") == 1
    assert [e.kind for e in _ledger(account)].count("hold") == 1


def test_a_key_whose_first_request_still_runs_is_a_conflict_naming_its_job(sdk, pipeline):
    api, _ = sdk()
    for provider in pipeline.values():
        provider.configure(latency_ms=1500)  # the first request is still running
    headers = {"Idempotency-Key": "k-running", "Prefer": "wait=0"}
    first = api.chat.completions.with_raw_response.create(
        model=MODEL, messages=HELLO, max_tokens=8, extra_headers=headers
    )
    assert first.status_code == 202
    job_id = first.headers["X-Flopex-Job-Id"]
    with pytest.raises(openai.ConflictError) as running:
        api.chat.completions.create(
            model=MODEL, messages=HELLO, max_tokens=8, extra_headers=headers
        )
    assert running.value.code == "idempotency_key_in_use"
    assert running.value.body["job_id"] == job_id  # type: ignore[index]
    assert running.value.response.headers["Location"] == f"/v1/inference/{job_id}"
    assert running.value.response.headers["Retry-After"] == "1"
    # Left to the SDK's retries, the same key waits for and answers the first job's outcome.
    patient = api.with_options(max_retries=5)
    answer = patient.chat.completions.create(
        model=MODEL, messages=HELLO, max_tokens=8, extra_headers={"Idempotency-Key": "k-running"}
    )
    assert answer.model_extra["flopex"]["job_id"] == job_id


def test_a_wait_that_runs_out_is_a_504_naming_the_running_job(sdk, pipeline, client, monkeypatch):
    """An OpenAI client cannot read the exchange's 202: without a Prefer header, a wait that
    runs out is an error naming the job, which carries on and is charged once."""
    import dataclasses

    from app.api import inference
    from config.settings import get_settings

    short = dataclasses.replace(get_settings(), sync_timeout_s=0)
    monkeypatch.setattr(inference, "get_settings", lambda: short)
    for provider in pipeline.values():
        provider.configure(latency_ms=1000)
    api, account = sdk(max_retries=2)
    with pytest.raises(openai.InternalServerError) as running:
        api.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=8)
    error = running.value
    assert error.status_code == 504 and error.code == "job_still_running"
    job_id = error.body["job_id"]  # type: ignore[index]
    assert error.response.headers["X-Flopex-Job-Id"] == job_id
    assert error.response.headers["X-Should-Retry"] == "false"  # so the SDK did not resubmit
    done = client.get(f"/v1/inference/{job_id}?wait=30", headers=account.headers).get_json()
    assert done["status"] == "success"
    assert [e.kind for e in _ledger(account)].count("hold") == 1
    # Asked for (Prefer: wait=0), the exchange's 202 with the job.
    raw = api.chat.completions.with_raw_response.create(
        model=MODEL, messages=HELLO, max_tokens=8, extra_headers={"Prefer": "wait=0"}
    )
    assert raw.status_code == 202 and json.loads(raw.text)["object"] == "inference"
    client.get(f"/v1/inference/{raw.headers['X-Flopex-Job-Id']}?wait=30", headers=account.headers)


def test_a_job_that_found_no_provider_is_a_503_with_retry_after(sdk, flask_app):
    from app.models import Provider

    api, account = sdk()
    models = flask_app.extensions["flopex_models"]  # a catalog change is seen after its TTL
    models.clear()
    with session_scope() as session:
        saved = {p.name: p.base_url for p in session.scalars(select(Provider))}
        for p in session.scalars(select(Provider)):
            p.base_url = "http://127.0.0.1:9/v1"  # nothing listens on the discard port
    try:
        with pytest.raises(openai.InternalServerError) as unserved:
            api.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=8)
    finally:
        with session_scope() as session:
            for p in session.scalars(select(Provider)):
                p.base_url = saved[p.name]
        models.clear()
    error = unserved.value
    assert error.status_code == 503 and error.code == "no_provider_available"
    assert int(error.response.headers["Retry-After"]) >= 1
    assert error.response.headers["X-Flopex-Job-Id"] == error.body["job_id"]  # type: ignore[index]
    assert [e.kind for e in _ledger(account)] == ["topup", "hold", "release"]
