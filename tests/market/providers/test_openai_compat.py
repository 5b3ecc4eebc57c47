"""app/market/providers/openai_compat.py against a sandbox provider over loopback HTTP: usage parsing,
which failures are retried and which are not, and how each failure is classified."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from app.market.providers import openai_compat
from app.market.providers.openai_compat import (
    Completion,
    ProviderFailure,
    _parse,
    complete,
    ping,
    resolve_api_key,
)
from sandbox import SandboxConfig, SandboxProvider, count_tokens
from sandbox.server import VOCABULARY

MODEL = "unit/llama-3.1-8b"
API_KEY = "sk-unit-test-0123456789"
PROMPT = "Summarize inference routing in two sentences."


@pytest.fixture(scope="module")
def sandbox_server() -> Iterator[SandboxProvider]:
    provider = SandboxProvider(
        SandboxConfig(name="unit", models={MODEL: "unit"}, output_tokens=24)
    ).start()
    yield provider
    provider.stop()


@pytest.fixture
def sandbox(sandbox_server: SandboxProvider) -> Iterator[SandboxProvider]:
    sandbox_server.reset()
    sandbox_server.configure(latency_ms=0, output_tokens=24)
    yield sandbox_server
    sandbox_server.reset()


@pytest.fixture(scope="module")
def keyed_sandbox() -> Iterator[SandboxProvider]:
    provider = SandboxProvider(
        SandboxConfig(name="keyed", models={MODEL: "keyed"}, api_key=API_KEY)
    ).start()
    yield provider
    provider.stop()


@pytest.fixture
def closed_port_url() -> Iterator[str]:
    """A loopback port that refuses connections: bound (so nothing else can take it during the
    test) but never listening."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield f"http://127.0.0.1:{sock.getsockname()[1]}/v1"


def call(base_url: str, api_key: str | None = None, **overrides: Any) -> Completion:
    kwargs: dict[str, Any] = {
        "model": MODEL,
        "prompt": PROMPT,
        "max_tokens": 256,
        "connect_timeout_s": 1.0,
        "read_timeout_s": 2.0,
        "retries": 2,
    }
    kwargs.update(overrides)
    return complete(base_url, api_key, **kwargs)


# -- success --------------------------------------------------------------------------


def test_complete_returns_text_and_exact_usage(sandbox):
    result = call(sandbox.base_url)

    assert result.input_tokens == count_tokens(PROMPT) + 6 == 13
    words = result.text.split(" ")
    assert len(words) == 24 and set(words) <= set(VOCABULARY)
    assert result.output_tokens == count_tokens(result.text) == 24
    assert result.finish_reason == "stop"
    assert result.provider_response_id is not None
    assert result.provider_response_id.startswith("chatcmpl-")
    assert sandbox.chat_calls == 1
    sent = sandbox.requests_log()[0]
    assert sent == {
        "model": MODEL,
        "messages": [{"role": "user", "content": PROMPT}],
        "max_tokens": 256,
    }


def test_complete_is_deterministic_and_honours_max_tokens(sandbox):
    full = call(sandbox.base_url)
    short = call(sandbox.base_url, max_tokens=5)
    assert short.output_tokens == 5
    assert short.finish_reason == "length"
    assert full.text.startswith(short.text)
    assert call(sandbox.base_url).text == full.text


def test_ping_returns_the_measured_latency(sandbox):
    fast = ping(sandbox.base_url, None, 2.0)
    assert isinstance(fast, int) and 0 <= fast < 1000
    sandbox.configure(latency_ms=60)
    slow = ping(sandbox.base_url, None, 2.0)
    assert 60 <= slow < 2000
    assert sandbox.models_calls == 2
    assert sandbox.chat_calls == 0


# -- retried failures -------------------------------------------------------------------


def test_one_transient_failure_is_retried_then_succeeds(sandbox):
    sandbox.configure(fault="error", fault_count=1)
    failed: list[ProviderFailure] = []
    result = call(sandbox.base_url, retries=1, on_failed_try=failed.append)
    assert result.output_tokens == 24
    assert sandbox.chat_calls == 2
    # The failed try is reported, so the provider's success rate counts it.
    assert [(f.kind, f.status) for f in failed] == [("http", 500)]


def test_the_answer_times_its_own_try_not_the_failed_ones_before_it(sandbox):
    # Each try waits the sandbox's 200 ms first: the answering try took at least that, and the
    # whole call at least that much more (the failed try), which the answer must not include.
    sandbox.configure(latency_ms=200, fault="error", fault_count=1)
    started = time.perf_counter()
    result = call(sandbox.base_url, retries=1)
    total_ms = (time.perf_counter() - started) * 1000
    assert sandbox.chat_calls == 2
    assert result.answered_ms is not None and result.answered_ms >= 200
    assert total_ms - result.answered_ms >= 200


@pytest.mark.parametrize("retries", [0, 2])
def test_persistent_failure_gives_up_after_retries_plus_one_attempts(sandbox, retries):
    sandbox.configure(fault="error")
    with pytest.raises(ProviderFailure) as info:
        call(sandbox.base_url, retries=retries)
    assert info.value.kind == "http"
    assert info.value.status == 500
    assert sandbox.chat_calls == retries + 1


def test_a_429_is_not_retried_and_carries_its_retry_after(sandbox):
    """The provider asked us to wait (Retry-After: 1): retrying within the backoff's fraction of
    a second would ignore it, so the failure goes back to the job at once, which falls through
    to its next provider."""
    sandbox.configure(fault="rate_limit")
    with pytest.raises(ProviderFailure) as info:
        call(sandbox.base_url, retries=2)
    assert (info.value.kind, info.value.status, info.value.retry_after_s) == ("http", 429, 1.0)
    assert sandbox.chat_calls == 1


def test_retry_after_reads_seconds_and_http_dates():
    assert openai_compat.retry_after_seconds("3") == 3.0
    assert openai_compat.retry_after_seconds(None) is None
    assert openai_compat.retry_after_seconds("soon") is None
    assert openai_compat.retry_after_seconds("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0


def test_no_try_outlasts_the_jobs_budget(sandbox):
    """A hanging provider with a 2 s read timeout and 0.5 s of the job's deadline left: the
    try is cut at the deadline, and nothing is retried past it."""
    sandbox.configure(fault="hang")
    with pytest.raises(ProviderFailure) as info:
        call(sandbox.base_url, retries=2, budget_s=0.5)
    assert info.value.kind == "timeout" and sandbox.chat_calls == 1
    with pytest.raises(ProviderFailure) as info:
        call(sandbox.base_url, retries=2, budget_s=0)
    assert info.value.kind == "timeout" and sandbox.chat_calls == 1  # not even sent


def test_connection_refused_is_retried_then_kind_connect(closed_port_url, monkeypatch):
    sent = []  # requests that never reach a server: counted on the way out
    send = openai_compat._send

    def counting(method: str, *args: Any, **kwargs: Any) -> Any:
        sent.append(method)
        return send(method, *args, **kwargs)

    monkeypatch.setattr(openai_compat, "_send", counting)
    with pytest.raises(ProviderFailure) as info:
        call(closed_port_url, retries=2)
    assert info.value.kind == "connect"
    assert info.value.status is None
    assert sent == ["POST"] * 3


# -- failures that are not retried --------------------------------------------------------


def test_read_timeout_on_hang_is_kind_timeout_and_not_retried(sandbox):
    sandbox.configure(fault="hang")
    with pytest.raises(ProviderFailure) as info:
        call(sandbox.base_url, read_timeout_s=0.3, retries=2)
    assert info.value.kind == "timeout"
    assert sandbox.chat_calls == 1


def test_disconnect_is_kind_disconnect_and_not_retried(sandbox):
    sandbox.configure(fault="disconnect")
    with pytest.raises(ProviderFailure) as info:
        call(sandbox.base_url, retries=2)
    assert info.value.kind == "disconnect"
    assert sandbox.chat_calls == 1


@pytest.mark.parametrize("fault", ["malformed", "bad_usage", "missing_usage"])
def test_unusable_answers_are_kind_malformed_and_not_retried(sandbox, fault):
    sandbox.configure(fault=fault)
    with pytest.raises(ProviderFailure) as info:
        call(sandbox.base_url, retries=2)
    assert info.value.kind == "malformed"
    assert sandbox.chat_calls == 1


def test_a_redirect_is_not_followed(sandbox):
    """A completion is never re-sent to another address: a 3xx is an HTTP failure."""

    class Redirect(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers["Content-Length"]))
            self.send_response(307)
            self.send_header("Location", f"{sandbox.base_url}/chat/completions")
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *_: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Redirect)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with pytest.raises(ProviderFailure) as info:
            call(f"http://127.0.0.1:{server.server_port}/v1")
    finally:
        server.shutdown()
        server.server_close()
    assert (info.value.kind, info.value.status) == ("http", 307)
    assert sandbox.chat_calls == 0


def test_unknown_model_is_kind_http_404_and_not_retried(sandbox):
    with pytest.raises(ProviderFailure) as info:
        call(sandbox.base_url, model="no/such-model", retries=2)
    assert (info.value.kind, info.value.status) == ("http", 404)
    assert sandbox.chat_calls == 1


# -- authentication -------------------------------------------------------------------------


def test_api_key_is_sent_as_a_bearer_token(keyed_sandbox):
    keyed_sandbox.reset()
    result = call(keyed_sandbox.base_url, API_KEY)
    assert result.output_tokens > 0
    assert keyed_sandbox.chat_calls == 1
    assert ping(keyed_sandbox.base_url, API_KEY, 2.0) >= 0


@pytest.mark.parametrize("api_key", [None, "sk-wrong-key-0000000000"])
def test_missing_or_wrong_api_key_is_kind_http_401_and_not_retried(keyed_sandbox, api_key):
    keyed_sandbox.reset()
    with pytest.raises(ProviderFailure) as info:
        call(keyed_sandbox.base_url, api_key, retries=2)
    assert (info.value.kind, info.value.status) == ("http", 401)
    assert keyed_sandbox.chat_calls == 1
    with pytest.raises(ProviderFailure) as info:
        ping(keyed_sandbox.base_url, api_key, 2.0)
    assert (info.value.kind, info.value.status) == ("http", 401)


def test_resolve_api_key_reads_the_named_environment_variable(monkeypatch):
    monkeypatch.setenv("UNIT_PROVIDER_KEY", API_KEY)
    monkeypatch.delenv("UNIT_PROVIDER_KEY_UNSET", raising=False)
    assert resolve_api_key("UNIT_PROVIDER_KEY") == API_KEY
    assert resolve_api_key("UNIT_PROVIDER_KEY_UNSET") is None
    assert resolve_api_key(None) is None


# -- ping failures ------------------------------------------------------------------------


def test_ping_failures_are_classified(sandbox, closed_port_url):
    sandbox.configure(fault="error", fault_scope="models")
    with pytest.raises(ProviderFailure) as info:
        ping(sandbox.base_url, None, 2.0)
    assert (info.value.kind, info.value.status) == ("http", 500)

    sandbox.configure(fault="hang", fault_scope="models")
    with pytest.raises(ProviderFailure) as info:
        ping(sandbox.base_url, None, 0.3)
    assert info.value.kind == "timeout"

    with pytest.raises(ProviderFailure) as info:
        ping(closed_port_url, None, 1.0)
    assert info.value.kind == "connect"

    # A malformed endpoint in the catalog fails its quote; it must not crash the quote task.
    for bad in ("not-a-url", "http://", "http://exa mple.com"):
        with pytest.raises(ProviderFailure) as info:
            ping(bad, None, 1.0)
        assert info.value.kind == "connect", bad


# -- response validation --------------------------------------------------------------------


def _body(**changes: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "id": "chatcmpl-x",
        "choices": [{"message": {"content": "hi"}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 3, "completion_tokens": 1},
    }
    body.update(changes)
    return body


def test_parse_accepts_a_minimal_valid_body():
    assert _parse(_body()) == Completion("hi", 3, 1, "stop", "chatcmpl-x")
    # Non-string ids and finish reasons are dropped rather than trusted.
    body = _body(id=7)
    body["choices"][0]["finish_reason"] = 1
    assert _parse(body) == Completion("hi", 3, 1, None, None)


def test_only_provider_side_failures_count_against_the_provider():
    assert not ProviderFailure("http", "bad request", 400).provider_at_fault
    assert not ProviderFailure("http", "too large", 413).provider_at_fault
    for failure in (
        ProviderFailure("http", "server", 500),
        ProviderFailure("http", "our key", 401),
        ProviderFailure("http", "model id", 404),
        ProviderFailure("http", "busy", 429),
        ProviderFailure("timeout", "slow"),
        ProviderFailure("malformed", "nonsense"),
    ):
        assert failure.provider_at_fault, failure


def test_parse_makes_what_postgresql_cannot_store_storable():
    """A NUL or a lone surrogate in the text, a long finish reason: the provider answered and is
    paid, so its result must be writable (it once left the job executing until the sweeper)."""
    body = _body()
    body["choices"][0]["message"]["content"] = "a\x00b\ud800c"
    body["choices"][0]["finish_reason"] = "\ud800" + "x" * 50
    parsed = _parse(body)
    assert parsed.text == "a\ufffdb\ufffdc" and parsed.finish_reason == "\ufffd" + "x" * 31
    parsed.finish_reason.encode("utf-8")
    parsed.text.encode("utf-8")


@pytest.mark.parametrize(
    "body",
    [
        [],
        "text",
        _body(choices=[]),
        _body(choices={"message": {"content": "hi"}}),
        _body(choices=["hi"]),
        _body(choices=[{"message": {"content": None}}]),
        _body(choices=[{"text": "hi"}]),
        _body(usage=None),
        _body(usage={"prompt_tokens": 3}),
        _body(usage={"prompt_tokens": -1, "completion_tokens": 1}),
        _body(usage={"prompt_tokens": 3, "completion_tokens": True}),
        _body(usage={"prompt_tokens": 3.0, "completion_tokens": 1}),
        _body(usage={"prompt_tokens": "3", "completion_tokens": 1}),
        _body(usage={"prompt_tokens": 3, "completion_tokens": 10**12}),
    ],
)
def test_parse_rejects_anything_we_cannot_bill_on(body):
    with pytest.raises(ProviderFailure) as info:
        _parse(body)
    assert info.value.kind == "malformed"
