"""Black-box tests for the sandbox provider over real loopback HTTP."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from sandbox import SandboxConfig, SandboxProvider, count_tokens
from sandbox.server import FAULTS, VOCABULARY
from tests.sandbox.support import wait_until as _wait_until

LLAMA = "meta-llama/Llama-3.1-8B-Instruct"
QWEN = "Qwen/Qwen2-7B-Instruct"
TIMEOUT = 5.0
REPO_ROOT = Path(__file__).resolve().parents[2]


def _config(**overrides: Any) -> SandboxConfig:
    values: dict[str, Any] = {"name": "alpha", "models": {LLAMA: "alpha", QWEN: "alpha"}}
    values.update(overrides)
    return SandboxConfig(**values)


def _chat_body(content: str = "Hello, world!", **extra: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": LLAMA,
        "messages": [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": content},
        ],
    }
    body.update(extra)
    return body


@pytest.fixture
def provider() -> Iterator[SandboxProvider]:
    with SandboxProvider(_config()) as running:
        yield running


def _chat(
    session: requests.Session, provider: SandboxProvider, body: Any = None, **kwargs: Any
) -> requests.Response:
    kwargs.setdefault("timeout", TIMEOUT)
    return session.post(
        f"{provider.base_url}/chat/completions",
        json=_chat_body() if body is None else body,
        **kwargs,
    )


def _models(session: requests.Session, provider: SandboxProvider, **kwargs: Any) -> Any:
    kwargs.setdefault("timeout", TIMEOUT)
    return session.get(f"{provider.base_url}/models", **kwargs)


def _assert_openai_error(response: requests.Response, status: int, code: str | None) -> None:
    assert response.status_code == status
    error = response.json()["error"]
    assert isinstance(error["message"], str) and error["message"]
    assert isinstance(error["type"], str) and error["type"]
    if code is not None:
        assert error["code"] == code


# -- basics -----------------------------------------------------------------


def test_count_tokens_splits_words_and_punctuation() -> None:
    assert count_tokens("") == 0
    assert count_tokens("Hello, world!") == 4
    assert count_tokens("  don't   stop  ") == 4


def test_vocabulary_words_are_single_tokens() -> None:
    assert len(VOCABULARY) == 64
    assert len(set(VOCABULARY)) == 64
    assert all(count_tokens(word) == 1 for word in VOCABULARY)


def test_base_url_and_port(provider: SandboxProvider) -> None:
    assert provider.port > 0
    assert provider.base_url == f"http://127.0.0.1:{provider.port}/v1"


def test_models_listing(provider: SandboxProvider, session: requests.Session) -> None:
    provider.configure(price_input_per_million_usd="0.05", price_output_per_million_usd="0.08")
    response = _models(session, provider)
    assert response.status_code == 200
    assert response.headers["X-Sandbox-Provider"] == "alpha"
    payload = response.json()
    assert payload["object"] == "list"
    assert [m["id"] for m in payload["data"]] == [LLAMA, QWEN]
    for entry in payload["data"]:
        assert entry["object"] == "model"
        assert isinstance(entry["created"], int)
        assert entry["owned_by"] == "alpha"
        assert entry["pricing"] == {
            "input_per_million_usd": "0.05",
            "output_per_million_usd": "0.08",
        }
    assert provider.models_calls == 1


def test_completion_shape_and_honest_usage(
    provider: SandboxProvider, session: requests.Session
) -> None:
    response = _chat(session, provider)
    assert response.status_code == 200
    assert response.headers["X-Sandbox-Provider"] == "alpha"
    assert float(response.headers["X-Sandbox-Service-Ms"]) >= 0
    payload = response.json()
    assert payload["id"].startswith("chatcmpl-")
    assert payload["object"] == "chat.completion"
    assert isinstance(payload["created"], int)
    assert payload["model"] == LLAMA
    [choice] = payload["choices"]
    assert choice["index"] == 0
    assert choice["message"]["role"] == "assistant"
    assert choice["finish_reason"] == "stop"
    text = choice["message"]["content"]
    # 24 default output tokens; prompt: ("You are terse." = 4 + 4) + ("Hello, world!" = 4 + 4) + 2.
    assert count_tokens(text) == 24
    assert payload["usage"] == {
        "prompt_tokens": 18,
        "completion_tokens": 24,
        "total_tokens": 42,
    }


def test_text_is_deterministic_per_prompt_and_provider(session: requests.Session) -> None:
    with (
        SandboxProvider(_config()) as first,
        SandboxProvider(_config()) as twin,
        SandboxProvider(_config(name="beta")) as other,
    ):
        a = _chat(session, first).json()
        b = _chat(session, twin).json()
        c = _chat(session, other).json()
        d = _chat(session, first, _chat_body("A different prompt")).json()
    text = a["choices"][0]["message"]["content"]
    assert b["choices"][0]["message"]["content"] == text
    assert b["id"] == a["id"]
    assert c["choices"][0]["message"]["content"] != text
    assert d["choices"][0]["message"]["content"] != text


@pytest.mark.parametrize("field", ["max_tokens", "max_completion_tokens"])
def test_max_tokens_truncates_with_length_finish(
    provider: SandboxProvider, session: requests.Session, field: str
) -> None:
    full = _chat(session, provider).json()["choices"][0]["message"]["content"]
    payload = _chat(session, provider, _chat_body(**{field: 5})).json()
    [choice] = payload["choices"]
    assert choice["finish_reason"] == "length"
    assert payload["usage"]["completion_tokens"] == 5
    assert count_tokens(choice["message"]["content"]) == 5
    # Same seed, so the truncated answer is a prefix of the untruncated one.
    assert full.startswith(choice["message"]["content"])


def test_max_tokens_at_or_above_output_tokens_is_stop(
    provider: SandboxProvider, session: requests.Session
) -> None:
    provider.configure(output_tokens=7)
    for limit in (7, 100):
        payload = _chat(session, provider, _chat_body(max_tokens=limit)).json()
        assert payload["choices"][0]["finish_reason"] == "stop"
        assert payload["usage"]["completion_tokens"] == 7


def test_multimodal_content_parts_count_text_only(
    provider: SandboxProvider, session: requests.Session
) -> None:
    body = {
        "model": QWEN,
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "two words"},
                    {"type": "image_url", "image_url": {"url": "data:,"}},
                ],
            }
        ],
    }
    payload = _chat(session, provider, body).json()
    assert payload["usage"]["prompt_tokens"] == 2 + 4 + 2


# -- request errors -----------------------------------------------------------


def test_unknown_model_is_404(provider: SandboxProvider, session: requests.Session) -> None:
    response = _chat(session, provider, _chat_body(model="nope/unknown"))
    _assert_openai_error(response, 404, "model_not_found")
    assert response.json()["error"]["type"] == "invalid_request_error"


def test_bad_json_is_400(provider: SandboxProvider, session: requests.Session) -> None:
    response = session.post(
        f"{provider.base_url}/chat/completions",
        data=b"{not json",
        headers={"Content-Type": "application/json"},
        timeout=TIMEOUT,
    )
    _assert_openai_error(response, 400, None)
    assert response.json()["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize(
    "body",
    [
        {"model": LLAMA},
        {"model": LLAMA, "messages": []},
        {"model": LLAMA, "messages": [{"content": "no role"}]},
        {"model": LLAMA, "messages": [{"role": "user", "content": 3}]},
        {"messages": [{"role": "user", "content": "hi"}]},
        _chat_body(max_tokens=0),
        _chat_body(max_tokens="5"),
        ["not", "an", "object"],
    ],
)
def test_invalid_bodies_are_400(
    provider: SandboxProvider, session: requests.Session, body: Any
) -> None:
    _assert_openai_error(_chat(session, provider, body), 400, None)


def test_unknown_path_and_wrong_method(
    provider: SandboxProvider, session: requests.Session
) -> None:
    _assert_openai_error(
        session.get(f"{provider.base_url}/embeddings", timeout=TIMEOUT), 404, "unknown_url"
    )
    response = session.get(f"{provider.base_url}/chat/completions", timeout=TIMEOUT)
    _assert_openai_error(response, 405, "method_not_allowed")
    assert response.headers["Allow"] == "POST"


def test_api_key_required_when_configured(session: requests.Session) -> None:
    with SandboxProvider(_config(api_key="sk-sandbox")) as provider:
        _assert_openai_error(_chat(session, provider), 401, "invalid_api_key")
        wrong = {"Authorization": "Bearer sk-wrong"}
        _assert_openai_error(_chat(session, provider, headers=wrong), 401, "invalid_api_key")
        _assert_openai_error(_models(session, provider), 401, "invalid_api_key")
        good = {"Authorization": "Bearer sk-sandbox"}
        assert _chat(session, provider, headers=good).status_code == 200
        assert _models(session, provider, headers=good).status_code == 200
        # Rejected requests still count as received.
        assert provider.chat_calls == 3
        assert provider.models_calls == 2


# -- faults -------------------------------------------------------------------


def test_fault_error(provider: SandboxProvider, session: requests.Session) -> None:
    provider.configure(fault="error")
    response = _chat(session, provider)
    _assert_openai_error(response, 500, None)
    assert response.headers["X-Sandbox-Provider"] == "alpha"


def test_fault_rate_limit(provider: SandboxProvider, session: requests.Session) -> None:
    provider.configure(fault="rate_limit")
    response = _chat(session, provider)
    _assert_openai_error(response, 429, "rate_limit_exceeded")
    assert response.headers["Retry-After"] == "1"


def test_fault_malformed(provider: SandboxProvider, session: requests.Session) -> None:
    provider.configure(fault="malformed")
    response = _chat(session, provider)
    assert response.status_code == 200
    with pytest.raises(requests.JSONDecodeError):
        response.json()
    # The framing stayed correct, so the same connection keeps working.
    provider.configure(fault=None)
    assert _chat(session, provider).status_code == 200
    assert provider.connections == 1


def test_fault_bad_usage(provider: SandboxProvider, session: requests.Session) -> None:
    provider.configure(fault="bad_usage")
    payload = _chat(session, provider).json()
    assert payload["usage"]["completion_tokens"] == -5
    assert payload["choices"][0]["message"]["content"]


def test_fault_missing_usage(provider: SandboxProvider, session: requests.Session) -> None:
    provider.configure(fault="missing_usage")
    payload = _chat(session, provider).json()
    assert "usage" not in payload
    assert payload["object"] == "chat.completion"


def test_usage_faults_skip_failed_requests_and_models(
    provider: SandboxProvider, session: requests.Session
) -> None:
    provider.configure(fault="bad_usage", fault_scope="all", fault_count=1)
    assert _models(session, provider).status_code == 200
    _assert_openai_error(_chat(session, provider, _chat_body(model="x")), 404, None)
    # The single countdown was not consumed by requests it could not corrupt.
    assert provider.config.fault == "bad_usage"
    assert _chat(session, provider).json()["usage"]["completion_tokens"] == -5
    assert provider.config.fault is None


def test_fault_disconnect(provider: SandboxProvider, session: requests.Session) -> None:
    provider.configure(fault="disconnect")
    with pytest.raises(requests.ConnectionError):
        _chat(session, provider)
    provider.configure(fault=None)
    # The pool must transparently replace the dropped connection.
    assert _chat(session, provider).status_code == 200


def test_fault_hang_times_out_and_stop_is_prompt(session: requests.Session) -> None:
    provider = SandboxProvider(_config(fault="hang")).start()
    try:
        with pytest.raises(requests.exceptions.ReadTimeout):
            _chat(session, provider, timeout=(TIMEOUT, 0.5))
        assert provider.chat_calls == 1
    finally:
        started = time.monotonic()
        provider.stop()
        assert time.monotonic() - started < 2.0


def _background_chat(
    session: requests.Session, provider: SandboxProvider, outcome: dict[str, Any]
) -> threading.Thread:
    def run() -> None:
        try:
            outcome["response"] = _chat(session, provider, timeout=(TIMEOUT, 10.0))
        except requests.RequestException as exc:
            outcome["error"] = exc
        outcome["finished"] = time.monotonic()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_stop_releases_hung_request(session: requests.Session) -> None:
    provider = SandboxProvider(_config(fault="hang")).start()
    outcome: dict[str, Any] = {}
    thread = _background_chat(session, provider, outcome)
    _wait_until(lambda: provider.chat_calls == 1)
    started = time.monotonic()
    provider.stop()
    thread.join(timeout=5)
    assert not thread.is_alive()
    assert isinstance(outcome.get("error"), requests.ConnectionError)
    assert outcome["finished"] - started < 2.0


def test_reset_releases_hung_request(provider: SandboxProvider) -> None:
    provider.configure(fault="hang")
    outcome: dict[str, Any] = {}
    with requests.Session() as hanging_session:
        hanging_session.trust_env = False
        thread = _background_chat(hanging_session, provider, outcome)
        _wait_until(lambda: provider.chat_calls == 1)
        started = time.monotonic()
        provider.reset()
        thread.join(timeout=5)
    assert not thread.is_alive()
    assert isinstance(outcome.get("error"), requests.ConnectionError)
    assert outcome["finished"] - started < 2.0
    with requests.Session() as fresh:
        fresh.trust_env = False
        assert _chat(fresh, provider).status_code == 200


def test_fault_count_clears_after_n(provider: SandboxProvider, session: requests.Session) -> None:
    provider.configure(fault="error", fault_count=2)
    assert [_chat(session, provider).status_code for _ in range(3)] == [500, 500, 200]
    config = provider.config
    assert config.fault is None
    assert config.fault_count is None
    assert provider.chat_calls == 3


def test_fault_count_is_thread_safe(provider: SandboxProvider) -> None:
    provider.configure(fault="rate_limit", fault_count=10)
    statuses: list[int] = []
    lock = threading.Lock()

    def worker() -> None:
        with requests.Session() as s:
            s.trust_env = False
            for _ in range(5):
                code = _chat(s, provider).status_code
                with lock:
                    statuses.append(code)

    threads = [threading.Thread(target=worker) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=TIMEOUT)
    assert sorted(statuses) == [200] * 20 + [429] * 10


def test_fault_scope(provider: SandboxProvider, session: requests.Session) -> None:
    provider.configure(fault="error", fault_scope="models")
    assert _models(session, provider).status_code == 500
    assert _chat(session, provider).status_code == 200
    provider.configure(fault_scope="all")
    assert _models(session, provider).status_code == 500
    assert _chat(session, provider).status_code == 500
    provider.configure(fault_scope="chat")
    assert _models(session, provider).status_code == 200
    assert _chat(session, provider).status_code == 500


@pytest.mark.parametrize("fault", sorted(FAULTS - {"hang"}))
def test_every_fault_is_consumed_and_counted(
    provider: SandboxProvider, session: requests.Session, fault: str
) -> None:
    # "hang" is exercised by the dedicated hang tests above.
    provider.configure(fault=fault, fault_count=1)
    try:
        _chat(session, provider)
    except requests.ConnectionError:
        assert fault == "disconnect"
    assert provider.config.fault is None
    assert provider.chat_calls == 1


def test_invalid_configuration_is_rejected(provider: SandboxProvider) -> None:
    with pytest.raises(ValueError):
        provider.configure(fault="explode")
    with pytest.raises(ValueError):
        provider.configure(latency_ms=-1)
    with pytest.raises(ValueError):
        provider.configure(fault_scope="everything")
    with pytest.raises(TypeError):
        provider.configure(colour="red")
    with pytest.raises(ValueError):
        SandboxProvider(_config(price_input_per_million_usd="cheap"))


# -- latency ------------------------------------------------------------------


def test_latency_is_reported_in_service_ms(session: requests.Session) -> None:
    with SandboxProvider(_config(latency_ms=80)) as provider:
        chat = _chat(session, provider)
        models = _models(session, provider)
        provider.configure(fault="error")
        faulted = _chat(session, provider)
    for response in (chat, models, faulted):
        assert float(response.headers["X-Sandbox-Service-Ms"]) >= 80.0
    assert faulted.status_code == 500


# -- control API and counters -------------------------------------------------


def test_control_endpoints(provider: SandboxProvider, session: requests.Session) -> None:
    root = provider.base_url.removesuffix("/v1")
    _chat(session, provider)
    state = session.get(f"{root}/_sandbox/state", timeout=TIMEOUT).json()
    assert state["base_url"] == provider.base_url
    assert state["config"]["name"] == "alpha"
    assert state["config"]["models"] == {LLAMA: "alpha", QWEN: "alpha"}
    assert state["config"]["api_key_set"] is False
    assert "api_key" not in state["config"]
    assert state["counters"]["chat_calls"] == 1

    response = session.post(
        f"{root}/_sandbox/config",
        json={"fault": "rate_limit", "fault_count": 1, "latency_ms": 5},
        timeout=TIMEOUT,
    )
    assert response.status_code == 200
    assert response.json()["config"]["fault"] == "rate_limit"
    assert provider.config.latency_ms == 5
    assert _chat(session, provider).status_code == 429
    assert _chat(session, provider).status_code == 200

    bad = session.post(f"{root}/_sandbox/config", json={"fault": "explode"}, timeout=TIMEOUT)
    _assert_openai_error(bad, 400, "invalid_config")
    unknown = session.post(f"{root}/_sandbox/config", json={"colour": 1}, timeout=TIMEOUT)
    _assert_openai_error(unknown, 400, "invalid_config")

    provider.configure(fault="error")
    reset = session.post(f"{root}/_sandbox/reset", timeout=TIMEOUT).json()
    assert reset["config"]["fault"] is None
    assert reset["config"]["latency_ms"] == 5
    assert reset["counters"]["chat_calls"] == 0
    assert provider.chat_calls == 0
    assert provider.requests_log() == []
    assert _chat(session, provider).status_code == 200


def test_counters_and_request_log(provider: SandboxProvider, session: requests.Session) -> None:
    provider.configure(fault="error", fault_count=1)
    _chat(session, provider, _chat_body("first"))
    _chat(session, provider, _chat_body("second", max_tokens=3, temperature=0.2))
    _models(session, provider)
    assert provider.chat_calls == 2
    assert provider.models_calls == 1
    log = provider.requests_log()
    assert [entry["messages"][-1]["content"] for entry in log] == ["first", "second"]
    assert log[1]["temperature"] == 0.2
    # The log is a copy; callers cannot corrupt the provider's record.
    log[0]["model"] = "tampered"
    assert provider.requests_log()[0]["model"] == LLAMA
    provider.reset()
    assert (provider.chat_calls, provider.models_calls, provider.requests_log()) == (0, 0, [])


# -- connection handling ------------------------------------------------------


def test_keep_alive_reuses_one_connection(
    provider: SandboxProvider, session: requests.Session
) -> None:
    for _ in range(3):
        assert _chat(session, provider).status_code == 200
    assert _models(session, provider).status_code == 200
    _assert_openai_error(_chat(session, provider, _chat_body(model="x")), 404, None)
    assert _chat(session, provider).status_code == 200
    assert provider.connections == 1


def test_stop_closes_idle_keep_alive_connections(session: requests.Session) -> None:
    provider = SandboxProvider(_config()).start()
    url = f"{provider.base_url}/chat/completions"
    assert session.post(url, json=_chat_body(), timeout=TIMEOUT).status_code == 200
    provider.stop()
    # A pooled connection must not keep reaching a stopped provider.
    with pytest.raises(requests.ConnectionError):
        session.post(url, json=_chat_body(), timeout=1.0)
    assert provider.chat_calls == 1


def test_context_manager_and_restart() -> None:
    provider = SandboxProvider(_config())
    with provider as running:
        assert running is provider
        assert provider.port > 0
    with pytest.raises(RuntimeError):
        _ = provider.port
    provider.stop()  # idempotent


# -- CLI ------------------------------------------------------------------------


def test_cli_serves_until_sigterm(session: requests.Session) -> None:
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), PYTHONUNBUFFERED="1")
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "sandbox",
            "--name",
            "gamma",
            "--port",
            "0",
            "--latency-ms",
            "1",
            "--model",
            LLAMA,
            "--model",
            QWEN,
            "--price-input",
            "0.05",
            "--price-output",
            "0.08",
            "--api-key",
            "k",
        ],
        cwd=REPO_ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline().strip()
        prefix = "sandbox gamma listening on "
        assert line.startswith(prefix), line
        base_url = line.removeprefix(prefix)
        response = session.get(
            f"{base_url}/models", headers={"Authorization": "Bearer k"}, timeout=TIMEOUT
        )
        assert response.status_code == 200
        data = response.json()["data"]
        assert [m["id"] for m in data] == [LLAMA, QWEN]
        assert data[0]["pricing"] == {
            "input_per_million_usd": "0.05",
            "output_per_million_usd": "0.08",
        }
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=TIMEOUT) == 0
    finally:
        if process.poll() is None:
            process.kill()
        process.communicate(timeout=TIMEOUT)
