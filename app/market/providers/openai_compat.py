"""Adapter for any OpenAI-compatible chat-completions endpoint.

One pooled ``requests.Session`` per process keeps connections to providers warm; both calls are
sent straight on its urllib3 pool for the provider (the same warm connections and TLS settings)
without requests' per-call machinery (cookies, hooks, environment, redirects, response wrapping),
whose CPU cost per call is measured in docs/performance.md. Redirects are not followed. Retries
(tenacity, jittered exponential backoff) cover only failures where the provider did not do the
work: a refused connection and 5xx answers. A 429 is not retried (the provider asked us to wait:
the job falls through to its next provider). A read timeout is not retried, since the provider
may still be generating (and billing) that request; the caller falls back to the next quote
instead.
"""

from __future__ import annotations

import contextlib
import dataclasses
import email.utils
import functools
import json
import math
import os
import re
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, cast

import requests
import urllib3
from requests.adapters import HTTPAdapter
from tenacity import (
    RetryCallState,
    retry,
    retry_if_exception,
    stop_after_attempt,
    stop_before_delay,
    wait_random_exponential,
)

_session: requests.Session | None = None
_session_pid: int | None = None
_lock = threading.Lock()


def http_session() -> requests.Session:
    global _session, _session_pid
    if _session is None or _session_pid != os.getpid():
        with _lock:
            if _session is None or _session_pid != os.getpid():
                session = requests.Session()
                # No proxy/netrc lookups from the environment on every call.
                session.trust_env = False
                adapter = HTTPAdapter(pool_connections=64, pool_maxsize=128, max_retries=0)
                session.mount("http://", adapter)
                session.mount("https://", adapter)
                _session, _session_pid = session, os.getpid()
    return _session


class ProviderFailure(Exception):
    """An execution that produced no billable result. ``kind`` is one of: connect (never
    reached the provider), disconnect (lost before an answer), timeout, http, malformed."""

    def __init__(
        self,
        kind: str,
        message: str,
        status: int | None = None,
        retry_after_s: float | None = None,
    ) -> None:
        super().__init__(message)
        self.kind = kind
        self.status = status
        # A 429's Retry-After: the provider asks not to be sent anything before then.
        self.retry_after_s = retry_after_s

    @property
    def provider_at_fault(self) -> bool:
        """False for an answer about the request itself (400, 413, 422: a prompt the provider
        will not take): such failures must not count against the provider's breaker, or one
        customer's odd requests could cut a provider off for everyone."""
        return not (self.kind == "http" and self.status in (400, 413, 422))


class _Retryable(ProviderFailure):
    pass


@dataclass(frozen=True)
class Completion:
    text: str
    input_tokens: int
    output_tokens: int
    finish_reason: str | None
    provider_response_id: str | None
    # The assistant's tool calls, as the provider wrote them (a chat completion with tools).
    tool_calls: list[dict[str, Any]] | None = None
    # The answering try's own time in ms (not the failed tries and back-off before it): what the
    # learned speed is fitted on, so a retried failure does not read as a slow provider.
    answered_ms: float | None = None


def _auth_headers(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def resolve_api_key(api_key_env: str | None) -> str | None:
    return os.environ.get(api_key_env) if api_key_env else None


@functools.lru_cache(maxsize=1024)
def _prepared(url: str) -> requests.PreparedRequest:
    return requests.Request("GET", url).prepare()  # a malformed URL raises here


def _send(
    method: str,
    url: str,
    headers: dict[str, str],
    timeout: urllib3.Timeout,
    body: bytes | None,
    stream: bool = False,
) -> urllib3.BaseHTTPResponse:
    """One request on the shared session's urllib3 pool for ``url``: no retries, no redirects,
    the whole body read (``stream``: left unread, the connection held until it is released)."""
    prepared = _prepared(url)
    session = http_session()
    # http_session() mounts an HTTPAdapter for every scheme it serves.
    adapter = cast(HTTPAdapter, session.get_adapter(prepared.url or ""))
    # An HTTP(S) connection pool (types-requests says only ConnectionPool).
    pool = cast(
        urllib3.HTTPConnectionPool,
        adapter.get_connection_with_tls_context(prepared, verify=session.verify),
    )
    return pool.urlopen(
        method,
        prepared.path_url,
        body=body,
        headers=headers,
        timeout=timeout,
        retries=False,
        redirect=False,
        preload_content=not stream,
    )


def _post_chat(
    base_url: str,
    headers: dict[str, str],
    timeout: urllib3.Timeout,
    body: bytes,
    stream: bool = False,
) -> urllib3.BaseHTTPResponse:
    """POST /chat/completions, its transport failures classified: _Retryable only where the
    provider cannot have received the request."""
    try:
        return _send("POST", f"{base_url}/chat/completions", headers, timeout, body, stream)
    # Never connected, so the provider cannot have run it: safe to send again. (A refused
    # connection is a NewConnectionError, itself a kind of connect timeout.)
    except urllib3.exceptions.NewConnectionError as exc:
        raise _Retryable("connect", "connection refused") from exc
    except urllib3.exceptions.ConnectTimeoutError as exc:
        raise _Retryable("connect", "connect timed out") from exc
    except urllib3.exceptions.TimeoutError as exc:
        raise ProviderFailure("timeout", "provider did not answer in time") from exc
    except (urllib3.exceptions.ProtocolError, urllib3.exceptions.SSLError, OSError) as exc:
        # The request may have reached the provider: do not send it again.
        raise ProviderFailure("disconnect", "connection lost before an answer") from exc
    except (urllib3.exceptions.HTTPError, requests.RequestException, ValueError) as exc:
        raise ProviderFailure("connect", f"request failed: {type(exc).__name__}") from exc


def ping(base_url: str, api_key: str | None, timeout_s: float) -> int:
    """Measured round trip of ``GET /models`` in ms; raises ProviderFailure when not live.

    The quote board's check (app/market/providers/board.py). A ping that is redirected is not a live
    endpoint."""
    headers = {"Accept": "application/json", **_auth_headers(api_key)}
    start = time.perf_counter()
    try:
        resp = _send(
            "GET",
            f"{base_url}/models",
            headers,
            urllib3.Timeout(connect=timeout_s, read=timeout_s),
            None,
        )
    except urllib3.exceptions.NewConnectionError as exc:  # a subclass of the timeout below
        raise ProviderFailure("connect", f"ping failed: {type(exc).__name__}") from exc
    except urllib3.exceptions.TimeoutError as exc:
        raise ProviderFailure("timeout", "ping timed out") from exc
    except (urllib3.exceptions.HTTPError, requests.RequestException, OSError) as exc:
        raise ProviderFailure("connect", f"ping failed: {type(exc).__name__}") from exc
    elapsed = int((time.perf_counter() - start) * 1000)
    if resp.status != 200:
        raise ProviderFailure("http", f"ping answered {resp.status}", resp.status)
    return elapsed


_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")
# Far above any context window; below what the jobs table's integer columns hold.
_MAX_TOKENS = 100_000_000


def _parse(body: Any) -> Completion:
    """Validates the parts we bill on: a provider that reports nonsense usage is a failed
    provider, never a free or negative charge."""
    if not isinstance(body, dict):
        raise ProviderFailure("malformed", "response is not a JSON object")
    choices = body.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        raise ProviderFailure("malformed", "response has no choices")
    message = choices[0].get("message")
    text = message.get("content") if isinstance(message, dict) else None
    tool_calls = _tool_calls(message)
    if text is None and tool_calls:
        text = ""  # an answer made of tool calls only
    if not isinstance(text, str):
        raise ProviderFailure("malformed", "response has no message content")
    # What PostgreSQL text cannot hold would fail the result's write after the provider was
    # paid: a NUL, or a lone surrogate (no UTF-8 form), each becomes U+FFFD.
    text = _UNSTORABLE.sub("\ufffd", text)
    usage = body.get("usage")
    if not isinstance(usage, dict):
        raise ProviderFailure("malformed", "response has no usage")
    counts = []
    for field in ("prompt_tokens", "completion_tokens"):
        value = usage.get(field)
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= _MAX_TOKENS:
            raise ProviderFailure("malformed", f"usage.{field} is not a plausible token count")
        counts.append(value)
    finish = choices[0].get("finish_reason")
    response_id = body.get("id")
    return Completion(
        text=text,
        input_tokens=counts[0],
        output_tokens=counts[1],
        # Informational, and stored in 32 characters: anything longer is cut, never an error.
        finish_reason=_UNSTORABLE.sub("\ufffd", finish)[:32] if isinstance(finish, str) else None,
        provider_response_id=response_id if isinstance(response_id, str) else None,
        tool_calls=tool_calls,
    )


def retry_after_seconds(value: str | None) -> float | None:
    """A Retry-After header's delay in seconds (RFC 9110: a number of seconds or an HTTP
    date); None when absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        return None
    return max(0.0, when.timestamp() - time.time())


def _tool_calls(message: Any) -> list[dict[str, Any]] | None:
    """The message's tool calls when they have the shape a client can act on (an id, and a
    function's name with its arguments as a string); a malformed one fails the provider."""
    calls = message.get("tool_calls") if isinstance(message, dict) else None
    if calls is None or calls == []:
        return None
    if not isinstance(calls, list):
        raise ProviderFailure("malformed", "tool_calls is not a list")
    kept = []
    for call in calls:
        function = call.get("function") if isinstance(call, dict) else None
        if (
            not isinstance(function, dict)
            or not isinstance(call.get("id"), str)
            or not isinstance(function.get("name"), str)
            or not isinstance(function.get("arguments"), str)
            or _UNSTORABLE.search(function["arguments"] + function["name"] + call["id"])
        ):
            raise ProviderFailure("malformed", "a tool call has no id, name or arguments")
        kept.append(
            {
                "id": call["id"],
                "type": "function",
                "function": {"name": function["name"], "arguments": function["arguments"]},
            }
        )
    return kept


def complete(
    base_url: str,
    api_key: str | None,
    model: str,
    prompt: str,
    max_tokens: int,
    *,
    connect_timeout_s: float,
    read_timeout_s: float,
    retries: int,
    budget_s: float | None = None,
    on_failed_try: Callable[[ProviderFailure], None] | None = None,
    messages: list[dict[str, Any]] | None = None,
    params: dict[str, Any] | None = None,
) -> Completion:
    """One completion, with retries where the provider cannot have done the work (a refused
    or timed-out connection, a 5xx). A 429 is not retried: the provider asked us to wait
    (``retry_after_s`` on the failure), so the job falls through to its next provider at once.

    ``budget_s``: what is left of the job's deadline; no try outlasts it (each try's timeouts
    are cut to it, and no retry starts past it). ``on_failed_try``: called for each failed try
    that is retried, so a provider's success rate counts every failure, not only the last.
    ``messages`` and ``params`` (sampling and tool parameters, sent unchanged): a chat
    completion's request; without them, ``prompt`` is the one user message."""
    deadline = time.monotonic() + (budget_s if budget_s is not None else math.inf)
    body = json.dumps(
        {
            "model": model,
            "messages": messages or [{"role": "user", "content": prompt}],
            **(params or {}),
            "max_tokens": max_tokens,
        }
    ).encode()
    headers = {
        "Content-Type": "application/json",
        "Accept": "application/json",
        "Accept-Encoding": "gzip, deflate",
        **_auth_headers(api_key),
    }

    def report(state: RetryCallState) -> None:
        # Called before the sleep that precedes a retry: the failed try is over.
        if on_failed_try is not None and state.outcome is not None:
            failure = state.outcome.exception()
            if isinstance(failure, ProviderFailure):
                on_failed_try(failure)

    @retry(
        retry=retry_if_exception(lambda e: isinstance(e, _Retryable)),
        stop=stop_after_attempt(retries + 1)
        | stop_before_delay(budget_s if budget_s is not None else math.inf),
        wait=wait_random_exponential(multiplier=0.05, max=1.0),
        before_sleep=report,
        reraise=True,
    )
    def call() -> Completion:
        remaining = deadline - time.monotonic()
        if remaining <= 0.001:
            raise ProviderFailure("timeout", "the job's deadline passed")
        timeout = urllib3.Timeout(
            connect=min(connect_timeout_s, remaining), read=min(read_timeout_s, remaining)
        )
        started = time.perf_counter()
        resp = _post_chat(base_url, headers, timeout, body)
        if resp.status == 429:
            raise ProviderFailure(
                "http",
                "provider answered 429",
                429,
                retry_after_s=retry_after_seconds(resp.headers.get("Retry-After")),
            )
        if resp.status >= 500:
            raise _Retryable("http", f"provider answered {resp.status}", resp.status)
        if resp.status != 200:
            raise ProviderFailure("http", f"provider answered {resp.status}", resp.status)
        try:
            answer = json.loads(resp.data)
        except ValueError as exc:  # not JSON, or not UTF-8
            raise ProviderFailure("malformed", "response is not JSON") from exc
        return dataclasses.replace(
            _parse(answer), answered_ms=(time.perf_counter() - started) * 1000
        )

    return call()


# -- streaming ---------------------------------------------------------------------------------
#
# The same endpoint with ``"stream": true``: Server-Sent Events whose ``data:`` lines are
# ``chat.completion.chunk`` objects, ended by ``data: [DONE]``. Usage comes in a last chunk when
# ``stream_options.include_usage`` is asked (OpenAI, vLLM, SGLang, TGI, llama.cpp, Ollama all
# honour it); a provider that ignores ``stream`` and answers one JSON body is read as a stream
# of one delta. Opening the stream retries exactly as ``complete`` does (nothing was generated
# yet); once it is open nothing is retried: a failure is the caller's to judge (before the first
# delta it may fall back, after it the stream is cut).

_READ_SIZE = 65536
# A provider's SSE line is one chunk of JSON; far above any real one, and bounded so a provider
# that never sends a newline cannot grow the worker's memory.
_MAX_LINE = 4 * 1024 * 1024


@dataclass(frozen=True)
class StreamDelta:
    """One chunk's new output: ``text`` (possibly empty) and ``tool_calls`` in the OpenAI delta
    form (``index``, and the ``id``, ``type``, ``function.name`` / ``function.arguments``
    fragments that this chunk carries)."""

    text: str
    tool_calls: tuple[dict[str, Any], ...] = ()


@dataclass(frozen=True)
class Usage:
    input_tokens: int
    output_tokens: int


def _usage(value: Any) -> Usage | None:
    if not isinstance(value, dict):
        return None
    counts = []
    for field in ("prompt_tokens", "completion_tokens"):
        count = value.get(field)
        if isinstance(count, bool) or not isinstance(count, int) or not 0 <= count <= _MAX_TOKENS:
            raise ProviderFailure("malformed", f"usage.{field} is not a plausible token count")
        counts.append(count)
    return Usage(counts[0], counts[1])


def _tool_call_delta(value: Any) -> dict[str, Any] | None:
    """The parts of a tool-call delta we pass on, each checked for its type: anything else a
    provider adds is dropped rather than relayed unchecked."""
    if not isinstance(value, dict):
        return None
    index = value.get("index", 0)
    if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < 128:
        return None
    out: dict[str, Any] = {"index": index}
    for key in ("id", "type"):
        if isinstance(value.get(key), str):
            out[key] = _UNSTORABLE.sub("\ufffd", value[key])
    function = value.get("function")
    if isinstance(function, dict):
        fn = {
            k: _UNSTORABLE.sub("\ufffd", function[k])
            for k in ("name", "arguments")
            if isinstance(function.get(k), str)
        }
        if fn:
            out["function"] = fn
    return out


class ProviderStream:
    """An open stream from a provider. Iterate it for ``StreamDelta``s (empty chunks are
    skipped); iteration raises ``ProviderFailure`` when the stream breaks (``disconnect``: the
    connection dropped or ended without ``[DONE]``; ``timeout``: no byte within the read
    timeout, a stall; ``http``: an error event in the stream; ``malformed``: a chunk that is not
    JSON or reports impossible usage). ``close()`` drops the connection at once, which is how a
    provider is told to stop generating. After iteration: ``usage`` (None when the provider did
    not report it), ``finish_reason``, ``response_id``, ``text`` and ``tool_calls`` (assembled)."""

    def __init__(self, response: urllib3.BaseHTTPResponse | None, whole: Completion | None = None):
        self._response = response
        self._whole = whole
        self.usage: Usage | None = None
        self.finish_reason: str | None = None
        self.response_id: str | None = None
        self.done = False
        self._text: list[str] = []
        self._tools: dict[int, dict[str, Any]] = {}

    @property
    def text(self) -> str:
        return "".join(self._text)

    @property
    def tool_calls(self) -> list[dict[str, Any]]:
        """The assembled calls, in index order, in the chat.completion message form."""
        return [self._tools[i] for i in sorted(self._tools)]

    def close(self) -> None:
        response, self._response = self._response, None
        if response is not None:
            # Not released to the pool: the connection is closed, so the provider sees the
            # client go and stops generating (a pooled connection would keep it running).
            with contextlib.suppress(Exception):
                response.shutdown()
            with contextlib.suppress(Exception):
                response.close()
            with contextlib.suppress(Exception):
                response.release_conn()  # the pool's slot back; it reconnects next time

    def __enter__(self) -> ProviderStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __iter__(self) -> Iterator[StreamDelta]:
        if self._whole is not None:
            yield from self._replay_whole(self._whole)
            return
        try:
            for data in self._events():
                if data == "[DONE]":
                    self.done = True
                    break
                delta = self._chunk(data)
                if delta is not None:
                    yield delta
            if not self.done and self.finish_reason is None:
                raise ProviderFailure("disconnect", "the stream ended before the provider finished")
        finally:
            if self.done and self._response is not None:
                # A clean end: the connection goes back to the pool, warm for the next call.
                response, self._response = self._response, None
                with contextlib.suppress(Exception):
                    response.drain_conn()
                    response.release_conn()
            else:
                self.close()

    def _replay_whole(self, whole: Completion) -> Iterator[StreamDelta]:
        self.usage = Usage(whole.input_tokens, whole.output_tokens)
        self.finish_reason = whole.finish_reason
        self.response_id = whole.provider_response_id
        self.done = True
        if whole.text:
            self._text.append(whole.text)
            yield StreamDelta(whole.text)

    def _events(self) -> Iterator[str]:
        """The ``data`` of each event, as the SSE grammar defines it: ``data:`` lines joined by
        newlines, dispatched on a blank line; comments and other fields are ignored (an
        ``event: error`` is recognised by its error object)."""
        response = self._response
        assert response is not None
        buffer = b""
        data: list[str] = []
        while True:
            try:
                block = response.read1(_READ_SIZE)
            except urllib3.exceptions.ReadTimeoutError as exc:
                raise ProviderFailure("timeout", "the provider stalled mid-stream") from exc
            except (urllib3.exceptions.HTTPError, OSError, ValueError) as exc:
                raise ProviderFailure("disconnect", "the connection dropped mid-stream") from exc
            if not block:
                if data:
                    yield "\n".join(data)
                return
            buffer += block
            while True:
                cut = buffer.find(b"\n")
                if cut < 0:
                    if len(buffer) > _MAX_LINE:
                        raise ProviderFailure("malformed", "a stream line is too long")
                    break
                raw, buffer = buffer[:cut], buffer[cut + 1 :]
                line = raw.rstrip(b"\r").decode("utf-8", "replace")
                if not line:
                    if data:
                        yield "\n".join(data)
                        data = []
                    continue
                if line.startswith(":"):
                    continue  # a comment: the provider's keep-alive
                field, _, value = line.partition(":")
                if field == "data":
                    data.append(value[1:] if value.startswith(" ") else value)

    def _chunk(self, data: str) -> StreamDelta | None:
        try:
            chunk = json.loads(data)
        except ValueError as exc:
            raise ProviderFailure("malformed", "a stream chunk is not JSON") from exc
        if not isinstance(chunk, dict):
            raise ProviderFailure("malformed", "a stream chunk is not a JSON object")
        error = chunk.get("error")
        if error is not None:
            status = error.get("code") if isinstance(error, dict) else None
            message = error.get("message") if isinstance(error, dict) else None
            raise ProviderFailure(
                "http",
                f"the provider sent an error mid-stream: {str(message)[:200]}",
                status if isinstance(status, int) and not isinstance(status, bool) else None,
            )
        if self.response_id is None and isinstance(chunk.get("id"), str):
            self.response_id = chunk["id"]
        usage = _usage(chunk.get("usage"))
        if usage is not None:
            self.usage = usage
        choices = chunk.get("choices")
        if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
            return None
        choice = choices[0]
        finish = choice.get("finish_reason")
        if isinstance(finish, str):
            self.finish_reason = _UNSTORABLE.sub("\ufffd", finish)[:32]
        delta = choice.get("delta")
        if not isinstance(delta, dict):
            return None
        content = delta.get("content")
        text = _UNSTORABLE.sub("\ufffd", content) if isinstance(content, str) else ""
        raw_calls = delta.get("tool_calls")
        parsed = (_tool_call_delta(c) for c in (raw_calls if isinstance(raw_calls, list) else ()))
        calls = tuple(c for c in parsed if c is not None)
        if not text and not calls:
            return None
        if text:
            self._text.append(text)
        for call in calls:
            self._assemble(call)
        return StreamDelta(text, calls)

    def _assemble(self, call: dict[str, Any]) -> None:
        entry = self._tools.setdefault(
            call["index"],
            {"id": None, "type": "function", "function": {"name": "", "arguments": ""}},
        )
        if "id" in call:
            entry["id"] = call["id"]
        if "type" in call:
            entry["type"] = call["type"]
        fn = call.get("function", {})
        entry["function"]["name"] += fn.get("name", "")
        entry["function"]["arguments"] += fn.get("arguments", "")


def open_stream(
    base_url: str,
    api_key: str | None,
    payload: dict[str, Any],
    *,
    connect_timeout_s: float,
    read_timeout_s: float,
    retries: int,
) -> ProviderStream:
    """POST ``payload`` (the chat-completions body: model, messages, max_tokens, sampling and
    tool parameters) with ``stream`` and ``stream_options.include_usage`` set, and return the
    open stream once the provider has answered 200. The read timeout applies to every read: a
    provider silent for that long mid-stream has stalled."""
    body = json.dumps(
        {**payload, "stream": True, "stream_options": {"include_usage": True}}
    ).encode()
    headers = {
        "Content-Type": "application/json",
        # No compression: a compressed stream is buffered by the compressor.
        "Accept": "text/event-stream",
        **_auth_headers(api_key),
    }
    timeout = urllib3.Timeout(connect=connect_timeout_s, read=read_timeout_s)

    @retry(
        retry=retry_if_exception(lambda e: isinstance(e, _Retryable)),
        stop=stop_after_attempt(retries + 1),
        wait=wait_random_exponential(multiplier=0.05, max=1.0),
        reraise=True,
    )
    def call() -> ProviderStream:
        resp = _post_chat(base_url, headers, timeout, body, stream=True)
        if resp.status != 200:
            with contextlib.suppress(Exception):
                resp.drain_conn()
                resp.release_conn()
            if resp.status == 429 or resp.status >= 500:
                raise _Retryable("http", f"provider answered {resp.status}", resp.status)
            raise ProviderFailure("http", f"provider answered {resp.status}", resp.status)
        kind = (resp.headers.get("Content-Type") or "").split(";")[0].strip().lower()
        if kind == "text/event-stream":
            return ProviderStream(resp)
        # A provider that ignored `stream` answered the whole completion at once.
        try:
            try:
                answer = json.loads(resp.read())
            except (urllib3.exceptions.HTTPError, OSError) as exc:
                raise ProviderFailure("disconnect", "connection lost during the answer") from exc
            except ValueError as exc:
                raise ProviderFailure("malformed", "response is not JSON") from exc
        finally:
            with contextlib.suppress(Exception):
                resp.release_conn()
        return ProviderStream(None, whole=_parse(answer))

    return call()
