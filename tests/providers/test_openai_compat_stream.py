"""The streaming call of app/providers/openai_compat.py against a scripted OpenAI-compatible
endpoint over loopback HTTP: what real providers send (chunk shapes, comments, CRLF, usage in a
last chunk, tool-call fragments, a JSON answer to a stream request) and how each mid-stream
fault is classified. The sandbox's own streaming is exercised end to end in tests/api."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from app.providers.openai_compat import ProviderFailure, ProviderStream, StreamDelta, open_stream


@dataclass
class Script:
    """What the endpoint answers: ``status`` and ``content_type``, then each part of
    ``parts`` written and flushed as its own HTTP chunk (a float is a pause in seconds);
    ``finish``: end the chunked body properly, or drop the connection."""

    parts: list[bytes | float] = field(default_factory=list)
    status: int = 200
    content_type: str = "text/event-stream"
    finish: bool = True
    requests: list[dict[str, Any]] = field(default_factory=list)
    write_failed: threading.Event = field(default_factory=threading.Event)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_POST(self) -> None:
        script: Script = self.server.script  # type: ignore[attr-defined]
        body = self.rfile.read(int(self.headers["Content-Length"]))
        script.requests.append(json.loads(body))
        self.send_response(script.status)
        self.send_header("Content-Type", script.content_type)
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        try:
            for part in script.parts:
                if isinstance(part, float):
                    time.sleep(part)  # the scripted provider's pacing
                    continue
                self.wfile.write(b"%x\r\n%s\r\n" % (len(part), part))
                self.wfile.flush()
            if script.finish:
                self.wfile.write(b"0\r\n\r\n")
                self.wfile.flush()
            else:
                self.close_connection = True
        except OSError:
            script.write_failed.set()
            self.close_connection = True


@pytest.fixture(scope="module")
def server() -> Iterator[ThreadingHTTPServer]:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def endpoint(server: ThreadingHTTPServer) -> Iterator[tuple[str, Script]]:
    script = Script()
    server.script = script  # type: ignore[attr-defined]
    yield f"http://127.0.0.1:{server.server_address[1]}/v1", script


def chunk(delta: dict[str, Any] | None = None, finish: str | None = None, **extra: Any) -> bytes:
    body: dict[str, Any] = {"id": "chatcmpl-1", "object": "chat.completion.chunk", **extra}
    if delta is not None or finish is not None:
        body["choices"] = [{"index": 0, "delta": delta or {}, "finish_reason": finish}]
    elif "choices" not in extra:
        body["choices"] = []
    return b"data: " + json.dumps(body).encode() + b"\n\n"


DONE = b"data: [DONE]\n\n"
USAGE = chunk(usage={"prompt_tokens": 11, "completion_tokens": 3, "total_tokens": 14})


def start(url: str, read_timeout_s: float = 2.0, retries: int = 0) -> ProviderStream:
    return open_stream(
        url,
        None,
        {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8},
        connect_timeout_s=1.0,
        read_timeout_s=read_timeout_s,
        retries=retries,
    )


def test_text_deltas_finish_reason_and_final_usage(endpoint):
    url, script = endpoint
    script.parts = [
        chunk({"role": "assistant", "content": ""}),
        chunk({"content": "Hello"}),
        b": keep-alive\n\n",
        chunk({"content": " wor"}) + chunk({"content": "ld"}),  # two events in one read
        chunk({}, finish="stop"),
        USAGE,
        DONE,
    ]
    stream = start(url)
    deltas = list(stream)
    assert [d.text for d in deltas] == ["Hello", " wor", "ld"]
    assert stream.text == "Hello world"
    assert stream.finish_reason == "stop"
    assert stream.usage is not None and (stream.usage.input_tokens, stream.usage.output_tokens) == (
        11,
        3,
    )
    assert stream.response_id == "chatcmpl-1"
    sent = script.requests[-1]
    assert sent["stream"] is True and sent["stream_options"] == {"include_usage": True}
    assert sent["model"] == "m" and sent["max_tokens"] == 8


def test_crlf_lines_multiline_data_and_events_split_across_reads(endpoint):
    url, script = endpoint
    whole = chunk({"content": "abc"}).replace(b"\n", b"\r\n")
    script.parts = [whole[:10], 0.01, whole[10:], b"event: message\r\n", DONE]
    stream = start(url)
    assert [d.text for d in stream] == ["abc"]
    assert stream.usage is None  # not reported: the caller bills what was delivered


def test_tool_call_fragments_are_passed_on_and_assembled(endpoint):
    url, script = endpoint
    call = {"index": 0, "id": "call_1", "type": "function", "function": {"name": "get_weather"}}
    script.parts = [
        chunk(
            {
                "role": "assistant",
                "tool_calls": [{**call, "function": {**call["function"], "arguments": ""}}],
            }
        ),
        chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"city":'}}]}),
        chunk({"tool_calls": [{"index": 0, "function": {"arguments": '"Paris"}'}, "junk": 1}]}),
        chunk({}, finish="tool_calls"),
        USAGE,
        DONE,
    ]
    stream = start(url)
    deltas = list(stream)
    assert deltas[1] == StreamDelta("", ({"index": 0, "function": {"arguments": '{"city":'}},))
    assert stream.tool_calls == [
        {
            "id": "call_1",
            "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'},
        }
    ]
    assert stream.finish_reason == "tool_calls"


def test_an_error_event_mid_stream_is_a_failure_after_the_deltas(endpoint):
    url, script = endpoint
    script.parts = [
        chunk({"content": "one"}),
        b"event: error\ndata: "
        + json.dumps({"error": {"message": "GPU fell over", "code": 500}}).encode()
        + b"\n\n",
    ]
    stream = start(url)
    got = []
    with pytest.raises(ProviderFailure) as failure:
        for delta in stream:
            got.append(delta.text)
    assert got == ["one"]
    assert failure.value.kind == "http" and failure.value.status == 500
    assert "GPU fell over" in str(failure.value)


def test_a_dropped_connection_is_kind_disconnect(endpoint):
    url, script = endpoint
    script.parts = [chunk({"content": "one"})]
    script.finish = False
    stream = start(url)
    got = []
    with pytest.raises(ProviderFailure) as failure:
        for delta in stream:
            got.append(delta.text)
    assert got == ["one"] and failure.value.kind == "disconnect"


def test_a_clean_end_without_done_or_finish_reason_is_a_cut(endpoint):
    url, script = endpoint
    script.parts = [chunk({"content": "one"})]
    with pytest.raises(ProviderFailure) as failure:
        list(start(url))
    assert failure.value.kind == "disconnect"


def test_a_stall_is_kind_timeout(endpoint):
    url, script = endpoint
    script.parts = [chunk({"content": "one"}), 1.0, chunk({"content": "late"}), DONE]
    stream = start(url, read_timeout_s=0.2)
    got = []
    with pytest.raises(ProviderFailure) as failure:
        for delta in stream:
            got.append(delta.text)
    assert got == ["one"] and failure.value.kind == "timeout"


def test_a_provider_that_ignores_stream_is_read_as_one_delta(endpoint):
    url, script = endpoint
    script.content_type = "application/json"
    script.parts = [
        json.dumps(
            {
                "id": "cmpl-9",
                "choices": [{"message": {"content": "all at once"}, "finish_reason": "length"}],
                "usage": {"prompt_tokens": 5, "completion_tokens": 3},
            }
        ).encode()
    ]
    stream = start(url)
    assert [d.text for d in stream] == ["all at once"]
    assert stream.usage is not None and stream.usage.output_tokens == 3
    assert stream.finish_reason == "length" and stream.response_id == "cmpl-9"


@pytest.mark.parametrize(("status", "kind"), [(400, "http"), (503, "http")])
def test_an_error_status_fails_the_open(endpoint, status, kind):
    url, script = endpoint
    script.status = status
    script.content_type = "application/json"
    script.parts = [b'{"error": {"message": "no"}}']
    with pytest.raises(ProviderFailure) as failure:
        start(url, retries=1)
    assert failure.value.kind == kind and failure.value.status == status
    # 5xx is retried (nothing was generated), 400 is not.
    assert len(script.requests) == (2 if status == 503 else 1)


@pytest.mark.parametrize(
    "bad",
    [
        b"data: {not json\n\n",
        b"data: [1, 2]\n\n",
        chunk(usage={"prompt_tokens": -1, "completion_tokens": 2}),
    ],
)
def test_unusable_chunks_are_kind_malformed(endpoint, bad):
    url, script = endpoint
    script.parts = [chunk({"content": "one"}), bad, DONE]
    with pytest.raises(ProviderFailure) as failure:
        list(start(url))
    assert failure.value.kind == "malformed"


def test_close_drops_the_connection_so_the_provider_stops(endpoint):
    url, script = endpoint
    script.parts = [chunk({"content": "one"})] + [0.02, chunk({"content": "more"})] * 200 + [DONE]
    stream = start(url)
    for delta in stream:
        assert delta.text == "one"
        break
    stream.close()
    # The provider's next writes fail: it sees its client gone.
    assert script.write_failed.wait(timeout=10)


def test_a_storable_copy_of_text_nul_and_lone_surrogates_replaced(endpoint):
    url, script = endpoint
    script.parts = [b'data: {"choices":[{"delta":{"content":"a\\u0000b\\ud800"}}]}\n\n', DONE]
    stream = start(url)
    assert [d.text for d in stream] == ["a\ufffdb\ufffd"]
