"""Adapter for any OpenAI-compatible chat-completions endpoint.

One pooled ``requests.Session`` per process keeps connections to providers warm; both calls are
sent straight on its urllib3 pool for the provider (the same warm connections and TLS settings)
without requests' per-call machinery (cookies, hooks, environment, redirects, response wrapping),
which cost ~0.3 ms of CPU per call. Redirects are not followed. Retries (tenacity,
jittered exponential backoff) cover only failures where the provider did not do the work: a
refused connection, 429 and 5xx answers. A read timeout is not retried, since the provider may
still be generating (and billing) that request; the caller falls back to the next quote instead.
"""

from __future__ import annotations

import email.utils
import functools
import json
import math
import os
import re
import threading
import time
from collections.abc import Callable
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


def _auth_headers(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def resolve_api_key(api_key_env: str | None) -> str | None:
    return os.environ.get(api_key_env) if api_key_env else None


@functools.lru_cache(maxsize=1024)
def _prepared(url: str) -> requests.PreparedRequest:
    return requests.Request("GET", url).prepare()  # a malformed URL raises here


def _send(
    method: str, url: str, headers: dict[str, str], timeout: urllib3.Timeout, body: bytes | None
) -> urllib3.BaseHTTPResponse:
    """One request on the shared session's urllib3 pool for ``url``: no retries, no redirects,
    the whole body read."""
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
        preload_content=True,
    )


def ping(base_url: str, api_key: str | None, timeout_s: float) -> int:
    """Measured round trip of ``GET /models`` in ms; raises ProviderFailure when not live.

    A quote is a ping, and a job pings every provider, so this is most of a quote task's own
    CPU (0.43-0.65 -> 0.27 ms per ping without requests' machinery, docs/performance.md). A
    ping that is redirected is not a live endpoint."""
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
    messages: list[dict[str, Any]] | None = None,
    params: dict[str, Any] | None = None,
    budget_s: float | None = None,
    on_failed_try: Callable[[ProviderFailure], None] | None = None,
) -> Completion:
    """One completion, with retries where the provider cannot have done the work (a refused
    or timed-out connection, a 5xx). A 429 is not retried: the provider asked us to wait
    (``retry_after_s`` on the failure), so the job falls through to its next provider at once.

    ``messages`` and ``params`` (sampling and tool parameters, sent unchanged): a chat
    completion's request; without them, ``prompt`` is the one user message.
    ``budget_s``: what is left of the job's deadline; no try outlasts it (each try's timeouts
    are cut to it, and no retry starts past it). ``on_failed_try``: called for each failed try
    that is retried, so a provider's success rate counts every failure, not only the last."""
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
        try:
            resp = _send("POST", f"{base_url}/chat/completions", headers, timeout, body)
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
        return _parse(answer)

    return call()
