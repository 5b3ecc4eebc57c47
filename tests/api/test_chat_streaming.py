"""`stream: true` on POST /v1/chat/completions through the official `openai` SDK, against the
real stack: gunicorn with the production configuration, the Celery worker, sandbox providers
streaming over HTTP, PostgreSQL and Redis."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import openai
import pytest
from sqlalchemy import select

from app.billing.money import micros_to_usd
from app.infra.db import session_scope
from app.models import Job, LedgerEntry
from tests.api.streaming_client import WebServer, open_stream, start_web

MODEL = "llama-3.1-8b"
HELLO = [{"role": "user", "content": "Say hello to the exchange."}]
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather for a city.",
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


@pytest.fixture(scope="module")
def web(
    worker: Any, catalog: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[WebServer]:
    server = start_web(
        tmp_path_factory.mktemp("web") / "gunicorn.log", {"FLOPEX_STREAM_KEEPALIVE_S": "1"}
    )
    yield server
    server.stop()


@pytest.fixture
def sdk(web: WebServer, providers: Any, make_account: Any) -> Any:
    def make(balance_usd: str = "10.00") -> tuple[openai.OpenAI, Any]:
        account = make_account(balance_usd)
        client = openai.OpenAI(
            base_url=f"{web.base_url}/v1", api_key=account.api_key, timeout=60, max_retries=0
        )
        return client, account

    return make


def captured(job_id: str) -> int:
    with session_scope() as session:
        return -sum(
            e.amount_micros
            for e in session.scalars(
                select(LedgerEntry).where(LedgerEntry.job_id == uuid.UUID(job_id))
            )
            if e.kind == "capture"
        )


def job_row(job_id: str) -> Job:
    with session_scope() as session:
        job = session.get(Job, uuid.UUID(job_id))
        assert job is not None
        session.expunge(job)
        return job


def test_text_streams_as_chunks_with_a_usage_chunk_and_exact_billing(sdk):
    api, _ = sdk("3.00")
    with api.chat.completions.with_streaming_response.create(
        model=MODEL,
        messages=HELLO,
        max_tokens=64,
        stream=True,
        stream_options={"include_usage": True},
    ) as raw:
        assert raw.headers["Content-Type"].startswith("text/event-stream")
        job_id = raw.headers["X-Flopex-Job-Id"]
        chunks = list(raw.parse())

    assert all(isinstance(c, openai.types.chat.ChatCompletionChunk) for c in chunks)
    assert {c.id for c in chunks} == {f"chatcmpl-{uuid.UUID(job_id).hex}"}
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    content_chunks = [c for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(content_chunks) == 24  # as the provider sent them: one per token
    finish = [
        c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason
    ]
    assert finish == ["stop"]
    usage_chunk = chunks[-1]
    assert usage_chunk.choices == [] and usage_chunk.usage is not None
    assert all(c.usage is None for c in chunks[:-1])

    job = job_row(job_id)
    assert job.output_text == text and job.status == "success"
    assert usage_chunk.usage.completion_tokens == job.output_tokens == 24
    assert usage_chunk.usage.prompt_tokens == job.input_tokens
    flopex = usage_chunk.model_extra["flopex"]
    assert flopex["job_id"] == job_id and flopex["provider"] == job.provider_name
    # The ledger equals the stream's billing to the micro-dollar.
    cost = Decimal(str(flopex["billing"]["cost_usd"]))
    assert micros_to_usd(captured(job_id)) == cost == micros_to_usd(job.charge_micros or 0)


def test_without_include_usage_there_is_no_usage_chunk(sdk):
    api, _ = sdk()
    chunks = list(
        api.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=8, stream=True)
    )
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    assert all(c.usage is None for c in chunks)
    assert "flopex" in chunks[-1].model_extra


def test_tool_calls_stream_as_deltas_the_sdk_assembles(sdk, providers):
    api, _ = sdk()
    stream = api.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Weather in Paris?"}],
        tools=[WEATHER],
        tool_choice="auto",
        max_tokens=64,
        stream=True,
        stream_options={"include_usage": True},
    )
    calls: dict[int, dict[str, Any]] = {}
    finish = None
    for chunk in stream:
        if not chunk.choices:
            continue
        for part in chunk.choices[0].delta.tool_calls or []:
            entry = calls.setdefault(part.index, {"id": None, "name": "", "arguments": ""})
            entry["id"] = part.id or entry["id"]
            if part.function is not None:
                entry["name"] += part.function.name or ""
                entry["arguments"] += part.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    assert finish == "tool_calls"
    (call,) = calls.values()
    assert call["id"] and call["name"] == "get_weather"
    assert set(json.loads(call["arguments"])) == {"city", "unit"}
    # The provider got the tools unchanged, and the stream request.
    sent = [r for p in providers.values() for r in p.requests_log()][-1]
    assert sent["tools"] == [WEATHER] and sent["stream"] is True


def test_the_sdk_accumulates_a_stream_into_the_completion(sdk):
    api, _ = sdk()
    with api.chat.completions.stream(model=MODEL, messages=HELLO, max_tokens=64) as stream:
        final = stream.get_final_completion()
    assert final.choices[0].message.content and final.choices[0].finish_reason == "stop"
    assert final.id.startswith("chatcmpl-")


def test_a_failure_after_the_first_token_is_an_error_in_the_stream(sdk, providers):
    api, _ = sdk()
    for provider in providers.values():
        provider.configure(stream_fault="disconnect", stream_fault_after_tokens=3)
    stream = api.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=64, stream=True)
    text = ""
    with pytest.raises(openai.APIError) as failed:
        for chunk in stream:
            if chunk.choices:
                text += chunk.choices[0].delta.content or ""
    assert len(text.split()) == 3
    assert "stream broke" in failed.value.message
    body: Any = failed.value.body
    job = job_row(body["job_id"] if "job_id" in body else body["error"]["job_id"])
    assert job.status == "failed" and job.output_text == text
    assert captured(str(job.id)) == job.charge_micros > 0


def test_a_failure_before_any_token_is_the_sdks_error_class(sdk, providers):
    api, _ = sdk()
    for provider in providers.values():
        provider.configure(fault="error")
    with pytest.raises(openai.APIStatusError) as failed:
        list(api.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=8, stream=True))
    assert failed.value.status_code == 502
    assert failed.value.body["code"] == "provider_error"  # type: ignore[index]


def test_stream_options_only_with_stream(sdk):
    api, _ = sdk()
    with pytest.raises(openai.BadRequestError) as refused:
        api.chat.completions.create(
            model=MODEL, messages=HELLO, stream_options={"include_usage": True}
        )
    assert refused.value.param == "stream_options"


def test_a_chat_stream_can_be_resumed_as_native_events(sdk, web):
    api, account = sdk()
    with api.chat.completions.with_streaming_response.create(
        model=MODEL, messages=HELLO, max_tokens=16, stream=True
    ) as raw:
        job_id = raw.headers["X-Flopex-Job-Id"]
        text = "".join(c.choices[0].delta.content or "" for c in raw.parse() if c.choices)
    native = open_stream(web, "GET", f"/v1/inference/{job_id}/events", account.headers)
    got = list(native.events())
    assert "".join(e.data["text"] for e in got if e.event == "delta") == text
    assert got[-1].event == "completed" and got[-1].data["output_text"] == text
