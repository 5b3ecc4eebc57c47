"""Streamed completions from the sandbox: OpenAI-compatible SSE, paced, with mid-stream faults."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import requests

from sandbox import SandboxProvider, count_tokens
from tests.sandbox.support import LLAMA, TIMEOUT, sandbox_config, wait_until


def _body(**extra: Any) -> dict[str, Any]:
    return {"model": LLAMA, "messages": [{"role": "user", "content": "Stream, please."}], **extra}


@dataclass
class Stream:
    status: int
    headers: dict[str, str]
    # Each data payload (parsed JSON, or the literal "[DONE]") with its arrival time.
    events: list[Any] = field(default_factory=list)
    arrivals: list[float] = field(default_factory=list)
    started: float = 0.0
    error: Exception | None = None

    @property
    def content_chunks(self) -> list[dict[str, Any]]:
        return [
            e
            for e in self.events
            if isinstance(e, dict) and e.get("choices") and "content" in e["choices"][0]["delta"]
        ]

    @property
    def text(self) -> str:
        return "".join(c["choices"][0]["delta"]["content"] for c in self.content_chunks)


def _read_stream(
    session: requests.Session,
    provider: SandboxProvider,
    body: dict[str, Any],
    timeout: float = TIMEOUT,
    stop_after: int | None = None,
) -> Stream:
    """A minimal SSE client: splits on blank lines and parses each ``data:`` payload."""
    started = time.perf_counter()
    response = session.post(
        f"{provider.base_url}/chat/completions", json=body, stream=True, timeout=timeout
    )
    result = Stream(response.status_code, dict(response.headers), started=started)
    if not response.headers.get("Content-Type", "").startswith("text/event-stream"):
        result.events.append(response.json())
        return result
    buffer = b""
    try:
        for piece in response.iter_content(chunk_size=None):
            buffer += piece
            while b"\n\n" in buffer:
                raw, buffer = buffer.split(b"\n\n", 1)
                assert raw.startswith(b"data: "), raw
                data = raw.removeprefix(b"data: ")
                result.events.append("[DONE]" if data == b"[DONE]" else json.loads(data))
                result.arrivals.append(time.perf_counter())
                if stop_after is not None and len(result.events) >= stop_after:
                    response.close()
                    return result
    except (requests.ConnectionError, requests.exceptions.ChunkedEncodingError) as exc:
        result.error = exc
    finally:
        response.close()
    return result


@pytest.fixture
def provider() -> Iterator[SandboxProvider]:
    with SandboxProvider(sandbox_config()) as running:
        yield running


def test_stream_is_openai_compatible_and_matches_the_completion(
    provider: SandboxProvider, session: requests.Session
) -> None:
    plain = session.post(f"{provider.base_url}/chat/completions", json=_body(), timeout=TIMEOUT)
    stream = _read_stream(session, provider, _body(stream=True))
    assert stream.status == 200
    assert stream.headers["Content-Type"].startswith("text/event-stream")
    assert stream.headers["X-Sandbox-Provider"] == "alpha"
    assert stream.error is None
    first = stream.events[0]
    assert first["object"] == "chat.completion.chunk"
    assert first["choices"] == [
        {"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
    ]
    assert stream.events[-1] == "[DONE]"
    finish = stream.events[-2]
    assert finish["choices"] == [{"index": 0, "delta": {}, "finish_reason": "stop"}]
    completion = plain.json()
    [stream_id] = {e["id"] for e in stream.events[:-1]}
    assert stream_id.startswith("chatcmpl-")
    assert {e["model"] for e in stream.events[:-1]} == {LLAMA}
    # One delta per billed token, the same text as unstreamed, and no usage unless asked for.
    assert stream.text == completion["choices"][0]["message"]["content"]
    content = stream.content_chunks[1:]
    assert len(content) == completion["usage"]["completion_tokens"] == 24
    assert all(count_tokens(c["choices"][0]["delta"]["content"]) == 1 for c in content)
    assert all("usage" not in e for e in stream.events[:-1])
    # The sandbox records a stream once its last write is done, a moment after the client read it.
    wait_until(lambda: len(provider.streams_log()) == 1)
    assert provider.streams_log() == [{"id": stream_id, "tokens_sent": 24, "outcome": "completed"}]
    # The connection is reusable after a stream (chunked framing ended cleanly).
    again = session.post(f"{provider.base_url}/chat/completions", json=_body(), timeout=TIMEOUT)
    assert again.status_code == 200
    assert provider.connections == 1


def test_usage_chunk_when_include_usage(
    provider: SandboxProvider, session: requests.Session
) -> None:
    body = _body(stream=True, stream_options={"include_usage": True}, max_tokens=7)
    stream = _read_stream(session, provider, body)
    usage_chunk = stream.events[-2]
    assert usage_chunk["choices"] == []
    assert usage_chunk["usage"] == {
        "prompt_tokens": 4 + 4 + 2,
        "completion_tokens": 7,
        "total_tokens": 17,
    }
    assert stream.events[-3]["choices"][0]["finish_reason"] == "length"
    assert all(e["usage"] is None for e in stream.events[:-2])
    assert count_tokens(stream.text) == 7


def test_stream_is_paced_by_ttft_and_tokens_per_s(session: requests.Session) -> None:
    config = sandbox_config(latency_ms=10, ttft_ms=80, tokens_per_s=200.0, output_tokens=20)
    with SandboxProvider(config) as provider:
        stream = _read_stream(session, provider, _body(stream=True))
    assert stream.error is None
    # Lower bounds only (a busy machine can only make it later): the first token comes after
    # latency + ttft, the last one 19 token intervals (5 ms each) after that.
    content_times = [(t - stream.started) * 1000 for t in stream.arrivals[1:21]]
    assert content_times[0] >= 10 + 80
    assert content_times[-1] >= 10 + 80 + 19 * 5


@pytest.mark.parametrize("after", [0, 3, 24, 100])
def test_mid_stream_error_event(session: requests.Session, after: int) -> None:
    config = sandbox_config(stream_fault="error", stream_fault_after_tokens=after)
    with SandboxProvider(config) as provider:
        stream = _read_stream(session, provider, _body(stream=True))
        wait_until(lambda: len(provider.streams_log()) == 1)
        log = provider.streams_log()
    sent = min(after, 24)
    assert len(stream.content_chunks) == 1 + sent  # the role chunk, then the tokens
    assert stream.events[-1]["error"]["code"] == "internal_error"
    assert "[DONE]" not in stream.events
    assert stream.error is None  # the body ended cleanly
    assert [(e["tokens_sent"], e["outcome"]) for e in log] == [(sent, "fault:error")]


def test_mid_stream_disconnect(session: requests.Session) -> None:
    config = sandbox_config(
        stream_fault="disconnect", stream_fault_after_tokens=2, stream_fault_count=1
    )
    with SandboxProvider(config) as provider:
        cut = _read_stream(session, provider, _body(stream=True))
        assert isinstance(cut.error, requests.exceptions.ChunkedEncodingError)
        assert len(cut.content_chunks) == 3
        assert "[DONE]" not in cut.events
        # The count is spent: the next stream completes.
        assert _read_stream(session, provider, _body(stream=True)).events[-1] == "[DONE]"
        wait_until(lambda: len(provider.streams_log()) == 2)
        outcomes = [(e["tokens_sent"], e["outcome"]) for e in provider.streams_log()]
    assert outcomes == [(2, "fault:disconnect"), (24, "completed")]


def test_mid_stream_stall_until_reset(session: requests.Session) -> None:
    config = sandbox_config(stream_fault="stall", stream_fault_after_tokens=1)
    with SandboxProvider(config) as provider:
        stalled = _read_stream(session, provider, _body(stream=True), timeout=0.3)
        assert isinstance(stalled.error, requests.ConnectionError)  # the read timed out
        assert len(stalled.content_chunks) == 2
        assert provider.streams_log() == []  # still stalled
        provider.reset()
        wait_until(lambda: len(provider.streams_log()) == 1)
        assert provider.streams_log()[0]["outcome"] == "fault:stall"
        # reset cleared the stream fault.
        assert provider.config.stream_fault is None


def test_client_going_away_stops_the_generation(session: requests.Session) -> None:
    config = sandbox_config(tokens_per_s=100.0, output_tokens=200)
    with SandboxProvider(config) as provider:
        stream = _read_stream(session, provider, _body(stream=True), stop_after=4)
        assert len(stream.content_chunks) == 4
        wait_until(lambda: len(provider.streams_log()) == 1)
        [record] = provider.streams_log()
    assert record["outcome"] == "client_disconnected"
    assert record["tokens_sent"] < 200


def test_faults_before_the_stream_answer_as_json(session: requests.Session) -> None:
    with SandboxProvider(sandbox_config(fault="rate_limit", fault_count=1)) as provider:
        limited = _read_stream(session, provider, _body(stream=True))
        assert limited.status == 429
        assert limited.events[0]["error"]["code"] == "rate_limit_exceeded"
        provider.configure(failure_rate=1.0, failure_fault="error")
        failed = _read_stream(session, provider, _body(stream=True))
        assert failed.status == 500
        assert provider.streams_log() == []


@pytest.mark.parametrize("fault", ["bad_usage", "missing_usage"])
def test_usage_faults_apply_to_the_usage_chunk(session: requests.Session, fault: str) -> None:
    with SandboxProvider(sandbox_config(fault=fault)) as provider:
        body = _body(stream=True, stream_options={"include_usage": True})
        stream = _read_stream(session, provider, body)
    usage = [e["usage"] for e in stream.events[:-1] if e.get("usage")]
    if fault == "missing_usage":
        assert usage == []
    else:
        assert usage[0]["completion_tokens"] == -5
    assert stream.events[-1] == "[DONE]"


@pytest.mark.parametrize(
    "extra",
    [
        {"stream": "yes"},
        {"stream_options": {"include_usage": True}},
        {"stream": True, "stream_options": {"include_usage": "yes"}},
        {"stream": True, "stream_options": [1]},
    ],
)
def test_invalid_stream_parameters_are_400(
    provider: SandboxProvider, session: requests.Session, extra: dict[str, Any]
) -> None:
    response = session.post(
        f"{provider.base_url}/chat/completions", json=_body(**extra), timeout=TIMEOUT
    )
    assert response.status_code == 400
    assert response.json()["error"]["code"] in ("invalid_stream", "invalid_stream_options")


def test_stop_ends_a_slow_stream_promptly() -> None:
    provider = SandboxProvider(sandbox_config(ttft_ms=20_000)).start()
    with socket.create_connection(("127.0.0.1", provider.port), timeout=TIMEOUT) as sock:
        payload = json.dumps(_body(stream=True)).encode()
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(payload)}\r\n\r\n".encode()
            + payload
        )
        assert sock.recv(4096).startswith(b"HTTP/1.1 200")
        provider.stop()
    wait_until(lambda: len(provider.streams_log()) == 1)
    assert provider.streams_log()[0]["outcome"] == "stopped"


def test_response_format_streams_its_json(
    provider: SandboxProvider, session: requests.Session
) -> None:
    body = _body(response_format={"type": "json_object"})
    plain = session.post(f"{provider.base_url}/chat/completions", json=body, timeout=TIMEOUT)
    stream = _read_stream(session, provider, {**body, "stream": True})
    assert stream.text == plain.json()["choices"][0]["message"]["content"]
    assert json.loads(stream.text).keys() == {"answer"}


def test_tool_calls_stream_as_openai_does(
    provider: SandboxProvider, session: requests.Session
) -> None:
    """The call's id, type and name first (empty arguments), then the arguments in fragments,
    then finish_reason tool_calls; joined they are the unstreamed answer's call."""
    tool = {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
            },
        },
    }
    body = _body(tools=[tool], tool_choice="required")
    plain = session.post(f"{provider.base_url}/chat/completions", json=body, timeout=TIMEOUT)
    [expected] = plain.json()["choices"][0]["message"]["tool_calls"]
    stream = _read_stream(session, provider, {**body, "stream": True})
    parts = [
        part
        for e in stream.events
        if isinstance(e, dict) and e.get("choices")
        for part in e["choices"][0]["delta"].get("tool_calls", [])
    ]
    assert parts[0] == {
        "index": 0,
        "id": expected["id"],
        "type": "function",
        "function": {"name": "get_weather", "arguments": ""},
    }
    assert len(parts) > 2 and all(set(p) == {"index", "function"} for p in parts[1:])
    assert "".join(p["function"]["arguments"] for p in parts) == expected["function"]["arguments"]
    assert stream.events[-2]["choices"][0]["finish_reason"] == "tool_calls"
    assert stream.events[-1] == "[DONE]"
