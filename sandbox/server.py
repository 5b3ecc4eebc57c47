"""A stdlib-only fake LLM provider speaking the OpenAI-compatible HTTP API.

The exchange needs something that behaves like a real GPU provider on the wire
(keep-alive, status codes, headers, honest token usage) but whose latency,
price and failure modes are under the caller's control. Everything here is
deterministic so tests can assert exact outputs and usage numbers.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import hmac
import json
import math
import re
import selectors
import socket
import sys
import threading
import time
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from socketserver import TCPServer
from types import TracebackType
from typing import Any
from urllib.parse import urlsplit

__all__ = [
    "DRIFT_FIELDS",
    "FAULTS",
    "FAULT_SCOPES",
    "STREAM_FAULTS",
    "VOCABULARY",
    "SandboxConfig",
    "SandboxProvider",
    "count_tokens",
    "effective_config",
    "generation_ms",
]

FAULTS: frozenset[str] = frozenset(
    {"error", "rate_limit", "hang", "malformed", "bad_usage", "missing_usage", "disconnect"}
)
FAULT_SCOPES: frozenset[str] = frozenset({"chat", "models", "all"})
# These faults corrupt a successful completion, so they only make sense on chat
# requests that would otherwise have succeeded.
_USAGE_FAULTS: frozenset[str] = frozenset({"bad_usage", "missing_usage"})
# Faults that strike a stream after some tokens went out (docs in SandboxConfig).
STREAM_FAULTS: frozenset[str] = frozenset({"error", "disconnect", "stall"})
# The parameters drift can move: a schedule sets them, the random walk scales them.
DRIFT_FIELDS: tuple[str, ...] = (
    "latency_ms",
    "ttft_ms",
    "tokens_per_s",
    "failure_rate",
    "price_input_per_million_usd",
    "price_output_per_million_usd",
)
# Walk keys: one factor per field, "price" scaling both prices together.
_WALK_KEYS: frozenset[str] = frozenset(
    {"latency_ms", "ttft_ms", "tokens_per_s", "failure_rate", "price"}
)
_WALK_OPTIONS: frozenset[str] = frozenset({"step_s", "seed", "max_factor"})
_WALK_STEP_S = 1.0
_WALK_MAX_FACTOR = 4.0

HANG_SECONDS = 30.0
# A fixed timestamp keeps /v1/models byte-for-byte stable across runs.
MODELS_CREATED = 1_700_000_000
# Per message and per conversation overhead, mimicking chat-template tokens.
MESSAGE_OVERHEAD_TOKENS = 4
CONVERSATION_OVERHEAD_TOKENS = 2
_MAX_BODY_BYTES = 8 * 1024 * 1024

_TOKEN_RE = re.compile(r"\w+|[^\w\s]")

# Exactly 64 words so a hash byte maps uniformly onto the vocabulary. Every
# word is a single \w+ token, which is what keeps completion_tokens == n exact.
VOCABULARY: tuple[str, ...] = (
    "alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel",
    "india", "juliet", "kilo", "lima", "mike", "november", "oscar", "papa",
    "quebec", "romeo", "sierra", "tango", "uniform", "victor", "whiskey", "xray",
    "yankee", "zulu", "amber", "basil", "cedar", "dune", "ember", "fjord",
    "garnet", "harbor", "iris", "jasper", "kernel", "lumen", "meadow", "nectar",
    "onyx", "prism", "quartz", "raven", "saffron", "tundra", "umber", "velvet",
    "willow", "zephyr", "atlas", "beacon", "comet", "drift", "ether", "flint",
    "glacier", "horizon", "island", "jungle", "kestrel", "lagoon", "mosaic", "nimbus",
)  # fmt: skip


def count_tokens(text: str) -> int:
    """Count tokens the way the sandbox bills them: words and single punctuation marks."""
    return len(_TOKEN_RE.findall(text))


@dataclass
class SandboxConfig:
    name: str
    models: dict[str, str]
    latency_ms: int = 0
    output_tokens: int = 24
    api_key: str | None = None
    price_input_per_million_usd: str = "0.10"
    price_output_per_million_usd: str = "0.20"
    fault: str | None = None
    fault_scope: str = "chat"
    fault_count: int | None = None
    # Generation: a completion takes latency_ms + ttft_ms + completion_tokens / tokens_per_s
    # (0 tokens/s: instant); a stream sends its first token at latency_ms + ttft_ms.
    ttft_ms: int = 0
    tokens_per_s: float = 0.0
    # Each chat request fails with `failure_fault` with this probability, drawn from a hash of
    # (seed, name, request index) so a run is reproducible request for request.
    failure_rate: float = 0.0
    failure_fault: str = "error"
    seed: int = 0
    # A streamed completion hits `stream_fault` once `stream_fault_after_tokens` content
    # tokens are out; `stream_fault_count` streams (None: every stream).
    stream_fault: str | None = None
    stream_fault_after_tokens: int = 0
    stream_fault_count: int | None = None
    # Drift (see effective_config): a schedule of absolute settings and a seeded random walk,
    # both in time since drift_epoch (unix seconds; set when drift is configured without one).
    drift_schedule: list[dict[str, Any]] | None = None
    drift_walk: dict[str, Any] | None = None
    drift_epoch: float | None = None


_CONFIG_FIELDS: frozenset[str] = frozenset(f.name for f in dataclasses.fields(SandboxConfig))


def _non_negative_int(field: str, value: Any) -> int:
    # bool is an int subclass; True as a latency is almost certainly a bug.
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{field} must be a non-negative integer, got {value!r}")
    return value


def _price(field: str, value: Any) -> str:
    # Prices stay strings end to end so no float rounding leaks into billing
    # code that compares them, but numbers from JSON are accepted for convenience.
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise ValueError(f"{field} must be a decimal string, got {value!r}")
    text = value.strip() if isinstance(value, str) else str(value)
    try:
        parsed = Decimal(text)
    except InvalidOperation:
        raise ValueError(f"{field} must be a decimal string, got {value!r}") from None
    if not parsed.is_finite() or parsed < 0:
        raise ValueError(f"{field} must be a finite, non-negative decimal, got {value!r}")
    return text


def _coerce_field(field: str, value: Any) -> Any:
    if field == "name":
        if not isinstance(value, str) or not value:
            raise ValueError(f"name must be a non-empty string, got {value!r}")
        return value
    if field == "models":
        if not isinstance(value, dict) or not all(
            isinstance(k, str) and k and isinstance(v, str) for k, v in value.items()
        ):
            raise ValueError("models must be a mapping of model id -> owned_by string")
        return dict(value)
    if field in ("latency_ms", "output_tokens"):
        return _non_negative_int(field, value)
    if field == "api_key":
        if value is not None and (not isinstance(value, str) or not value):
            raise ValueError("api_key must be a non-empty string or null")
        return value
    if field in ("price_input_per_million_usd", "price_output_per_million_usd"):
        return _price(field, value)
    if field == "fault":
        if value is not None and value not in FAULTS:
            raise ValueError(f"fault must be null or one of {sorted(FAULTS)}, got {value!r}")
        return value
    if field == "fault_scope":
        if value not in FAULT_SCOPES:
            raise ValueError(f"fault_scope must be one of {sorted(FAULT_SCOPES)}, got {value!r}")
        return value
    if field == "fault_count":
        return None if value is None else _non_negative_int(field, value)
    return _coerce_market_field(field, value)


def _normalise_fault(config: SandboxConfig) -> None:
    # A spent countdown means "no fault"; collapsing it here means the rest of
    # the code never has to treat fault_count == 0 as a special case.
    if config.fault_count == 0 or config.fault is None:
        config.fault = None
        config.fault_count = None
    _normalise_market(config)


def _validated_copy(config: SandboxConfig) -> SandboxConfig:
    values = {f: _coerce_field(f, getattr(config, f)) for f in _CONFIG_FIELDS}
    result = SandboxConfig(**values)
    _normalise_fault(result)
    return result


def _snapshot(config: SandboxConfig) -> SandboxConfig:
    # Handlers work from a private copy so a concurrent configure() cannot
    # change the model table halfway through building a response.
    return dataclasses.replace(config, models=dict(config.models))


# -- generation speed, failure rate, drift ----------------------------------------------------


def _non_negative_number(field: str, value: Any) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or value < 0
    ):
        raise ValueError(f"{field} must be a finite, non-negative number, got {value!r}")
    return float(value)


def _one_of(field: str, value: Any, allowed: frozenset[str]) -> str:
    if value not in allowed:
        raise ValueError(f"{field} must be one of {sorted(allowed)}, got {value!r}")
    return str(value)


def _coerce_market_field(field: str, value: Any) -> Any:
    if field == "ttft_ms" or field == "stream_fault_after_tokens":
        return _non_negative_int(field, value)
    if field == "tokens_per_s":
        return _non_negative_number(field, value)
    if field == "failure_rate":
        rate = _non_negative_number(field, value)
        if rate > 1:
            raise ValueError(f"failure_rate must be between 0 and 1, got {value!r}")
        return rate
    if field == "failure_fault":
        return _one_of(field, value, FAULTS)
    if field == "seed":
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"seed must be an integer, got {value!r}")
        return value
    if field == "stream_fault":
        return None if value is None else _one_of(field, value, STREAM_FAULTS)
    if field == "stream_fault_count":
        return None if value is None else _non_negative_int(field, value)
    if field == "drift_schedule":
        return None if value is None else _drift_schedule(value)
    if field == "drift_walk":
        return None if value is None else _drift_walk(value)
    if field == "drift_epoch":
        return None if value is None else _non_negative_number(field, value)
    raise TypeError(f"unknown SandboxConfig field {field!r}")


def _drift_schedule(value: Any) -> list[dict[str, Any]]:
    if not isinstance(value, list):
        raise ValueError("drift_schedule must be a list of {'at_s': seconds, field: value}")
    steps: list[dict[str, Any]] = []
    for entry in value:
        if not isinstance(entry, dict) or "at_s" not in entry:
            raise ValueError("every drift_schedule entry must be an object with 'at_s'")
        unknown = set(entry) - {"at_s", *DRIFT_FIELDS}
        if unknown or len(entry) < 2:
            raise ValueError(
                f"a drift_schedule entry sets one or more of {list(DRIFT_FIELDS)}; "
                f"unknown: {sorted(unknown)}"
            )
        step = {k: _coerce_field(k, v) for k, v in entry.items() if k != "at_s"}
        steps.append({"at_s": _non_negative_number("at_s", entry["at_s"]), **step})
    # Stable: two entries at the same time apply in the order given.
    return sorted(steps, key=lambda step: step["at_s"])


def _drift_walk(value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ValueError("drift_walk must be an object")
    unknown = set(value) - _WALK_KEYS - _WALK_OPTIONS
    if unknown:
        raise ValueError(
            f"drift_walk takes {sorted(_WALK_OPTIONS)} and step sizes for "
            f"{sorted(_WALK_KEYS)}; unknown: {sorted(unknown)}"
        )
    step_s = _non_negative_number("drift_walk.step_s", value.get("step_s", _WALK_STEP_S))
    if step_s < 0.01:
        raise ValueError("drift_walk.step_s must be at least 0.01")
    max_factor = _non_negative_number(
        "drift_walk.max_factor", value.get("max_factor", _WALK_MAX_FACTOR)
    )
    if max_factor < 1:
        raise ValueError("drift_walk.max_factor must be at least 1")
    seed = _coerce_market_field("seed", value.get("seed", 0))
    sigmas = {k: _non_negative_number(f"drift_walk.{k}", v) for k, v in value.items()}
    walk: dict[str, Any] = {k: sigmas[k] for k in sorted(_WALK_KEYS) if k in sigmas}
    walk.update(step_s=step_s, seed=seed, max_factor=max_factor)
    return walk


def _normalise_market(config: SandboxConfig) -> None:
    if config.stream_fault_count == 0 or config.stream_fault is None:
        config.stream_fault = None
        config.stream_fault_count = None
    # Drift is a function of time since its epoch; pinning the epoch when drift is configured
    # lets another process (the routing benchmark) compute the same parameters at any time.
    if (config.drift_schedule or config.drift_walk) and config.drift_epoch is None:
        config.drift_epoch = time.time()


_UNIT_SCALE = 2.0**64
# Steps beyond this are not computed: the walk holds still (a week at 1 s per step).
_WALK_MAX_STEPS = 604_800
_walk_paths: dict[tuple[str, int, str, float, float], list[float]] = {}
_walk_lock = threading.Lock()


def _unit(*parts: object) -> float:
    """A deterministic draw in [0, 1) from the parts (same inputs, same draw, any process)."""
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "big") / _UNIT_SCALE


def _walk_log_factor(
    name: str, seed: int, key: str, sigma: float, max_factor: float, step: int
) -> float:
    """log of the walk's factor after `step` steps: each step adds sigma x U(-1, 1), reflected
    at +/- log(max_factor) so the value wanders but stays within [base / max, base x max]."""
    bound = math.log(max_factor)
    step = min(step, _WALK_MAX_STEPS)
    with _walk_lock:
        path = _walk_paths.setdefault((name, seed, key, sigma, max_factor), [0.0])
        while len(path) <= step:
            x = path[-1] + sigma * (2 * _unit(seed, name, key, len(path)) - 1)
            while bound and abs(x) > bound:
                x = (2 * bound - x) if x > 0 else (-2 * bound - x)
            path.append(x if bound else 0.0)
        return path[step]


def _scaled_price(price: str, factor: float) -> str:
    scaled = (Decimal(price) * Decimal(factor)).quantize(Decimal("0.000001"))
    return format(scaled.normalize(), "f")


def effective_config(config: SandboxConfig, at: float) -> SandboxConfig:
    """The configuration in force at unix time `at`: the base values, overridden by every
    drift_schedule entry whose at_s has passed, then scaled by the random walk's factors for the
    step that `at` falls in. A pure function of the config and the time."""
    if not config.drift_schedule and not config.drift_walk:
        return config
    elapsed = max(0.0, at - (at if config.drift_epoch is None else config.drift_epoch))
    values: dict[str, Any] = {f: getattr(config, f) for f in DRIFT_FIELDS}
    # Sorted again (stable) so that an unvalidated config, the bench's own, works the same.
    for entry in sorted(config.drift_schedule or (), key=lambda step: step["at_s"]):
        if entry["at_s"] > elapsed:
            break
        values.update((k, v) for k, v in entry.items() if k != "at_s")
    walk = config.drift_walk
    if walk:
        step = int(elapsed // walk.get("step_s", _WALK_STEP_S))
        for key in sorted(_WALK_KEYS):
            sigma = walk.get(key, 0.0)
            if not sigma or not step:
                continue
            factor = math.exp(
                _walk_log_factor(
                    config.name,
                    walk.get("seed", 0),
                    key,
                    sigma,
                    walk.get("max_factor", _WALK_MAX_FACTOR),
                    step,
                )
            )
            if key == "price":
                for field in ("price_input_per_million_usd", "price_output_per_million_usd"):
                    values[field] = _scaled_price(values[field], factor)
            elif key in ("latency_ms", "ttft_ms"):
                values[key] = round(values[key] * factor)
            elif key == "failure_rate":
                values[key] = min(1.0, values[key] * factor)
            else:
                values[key] = values[key] * factor
    return dataclasses.replace(config, **values)


def generation_ms(config: SandboxConfig, completion_tokens: int) -> float:
    """Time from the end of the latency wait to the last token: ttft + tokens / speed."""
    speed = config.tokens_per_s
    return config.ttft_ms + (completion_tokens * 1000 / speed if speed > 0 else 0.0)


def _admission_config(config: SandboxConfig) -> SandboxConfig:
    return effective_config(_snapshot(config), time.time())


def _stream_error(payload: dict[str, Any]) -> _ApiError | None:
    stream = payload.get("stream")
    if stream is not None and not isinstance(stream, bool):
        return _bad_request("'stream' must be a boolean.", "invalid_stream")
    options = payload.get("stream_options")
    if options is None:
        return None
    if not stream:
        return _bad_request(
            "'stream_options' is only allowed when 'stream' is true.", "invalid_stream_options"
        )
    if not isinstance(options, dict) or not isinstance(options.get("include_usage", False), bool):
        return _bad_request(
            "'stream_options' must be an object with a boolean 'include_usage'.",
            "invalid_stream_options",
        )
    return None


def _wants_stream(chat: _ChatRequest) -> bool:
    return chat.raw.get("stream") is True


def _include_usage(chat: _ChatRequest) -> bool:
    options = chat.raw.get("stream_options") or {}
    return options.get("include_usage") is True


_DELTA_RE = re.compile(r"\s*(?:\w+|[^\w\s])|\s+$")


def _content_deltas(text: str) -> list[str]:
    """One delta per billed token (leading whitespace attached), joining back to the text."""
    return _DELTA_RE.findall(text)


def _tool_call_deltas(calls: Any) -> list[dict[str, Any]]:
    """A message's tool calls as stream deltas: per call, its id, type and name with empty
    arguments, then the arguments in three fragments."""
    parts: list[dict[str, Any]] = []
    for index, call in enumerate(calls or []):
        function = call["function"]
        head = {"name": function["name"], "arguments": ""}
        parts.append({"index": index, "id": call["id"], "type": "function", "function": head})
        arguments = function["arguments"]
        step = max(1, -(-len(arguments) // 3))
        for start in range(0, len(arguments), step):
            fragment = arguments[start : start + step]
            parts.append({"index": index, "function": {"arguments": fragment}})
    return parts


def _completion_tokens(completion: dict[str, Any]) -> int:
    content = completion["choices"][0]["message"].get("content")
    return count_tokens(content) if isinstance(content, str) else 0


def _chunk(
    completion: dict[str, Any],
    delta: dict[str, Any],
    finish_reason: str | None,
    include_usage: bool,
) -> dict[str, Any]:
    chunk = {
        "id": completion["id"],
        "object": "chat.completion.chunk",
        "created": completion["created"],
        "model": completion["model"],
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}],
    }
    if include_usage:
        # As OpenAI does: null on every chunk, the totals on a last chunk without choices.
        chunk["usage"] = None
    return chunk


def _sse(payload: Any) -> bytes:
    return b"data: " + json.dumps(payload).encode() + b"\n\n"


@dataclass(frozen=True)
class _ApiError:
    status: int
    message: str
    type: str
    code: str | None

    def body(self) -> dict[str, Any]:
        return {
            "error": {"message": self.message, "type": self.type, "param": None, "code": self.code}
        }


@dataclass(frozen=True)
class _ChatRequest:
    model: str
    messages: list[dict[str, Any]]
    texts: list[str]
    max_tokens: int | None
    raw: dict[str, Any]


@dataclass(frozen=True)
class _Admission:
    """Everything decided atomically when a request arrives.

    Deciding the fault and capturing the release event at arrival (under the
    provider lock) means reset()/stop() always observe a consistent picture:
    a request counted as received is guaranteed to see the release signal.
    """

    config: SandboxConfig
    release: threading.Event
    error: _ApiError | None = None
    fault: str | None = None
    chat: _ChatRequest | None = None
    stream_fault: str | None = None


def _bad_request(message: str, code: str) -> _ApiError:
    return _ApiError(400, message, "invalid_request_error", code)


def _message_text(content: Any) -> str | None:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        # Multimodal-style content parts: only text parts carry tokens here.
        parts: list[str] = []
        for part in content:
            if isinstance(part, str):
                parts.append(part)
            elif isinstance(part, dict) and isinstance(part.get("text"), str):
                parts.append(part["text"])
            elif not isinstance(part, dict):
                return None
        return "\n".join(parts)
    return None


def _parse_chat(body: bytes) -> _ChatRequest | _ApiError:
    try:
        payload = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return _bad_request("Request body is not valid JSON.", "invalid_json")
    if not isinstance(payload, dict):
        return _bad_request("Request body must be a JSON object.", "invalid_json")
    model = payload.get("model")
    if not isinstance(model, str) or not model:
        return _bad_request("'model' is required and must be a string.", "missing_model")
    messages = payload.get("messages")
    if not isinstance(messages, list) or not messages:
        return _bad_request("'messages' must be a non-empty list.", "invalid_messages")
    texts: list[str] = []
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            return _bad_request(
                f"messages[{index}] must be an object with a string 'role'.", "invalid_messages"
            )
        if message["role"] == "tool" and not isinstance(message.get("tool_call_id"), str):
            return _bad_request(
                f"messages[{index}] is a tool message without a tool_call_id.", "invalid_messages"
            )
        text = _message_text(message.get("content"))
        if text is None:
            return _bad_request(
                f"messages[{index}].content must be a string or a list of parts.",
                "invalid_messages",
            )
        texts.append(text)
    # max_completion_tokens is the newer OpenAI name and wins when both are sent.
    limit = payload.get("max_completion_tokens")
    if limit is None:
        limit = payload.get("max_tokens")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        return _bad_request("max_tokens must be a positive integer.", "invalid_max_tokens")
    stream_error = _stream_error(payload)
    if stream_error is not None:
        return stream_error
    return _ChatRequest(model, messages, texts, limit, payload)


def _canonical(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, ensure_ascii=False, separators=(",", ":")).encode()


def _generate_text(seed: bytes, n: int) -> str:
    words: list[str] = []
    block = 0
    while len(words) < n:
        digest = hashlib.sha256(seed + block.to_bytes(8, "big")).digest()
        words.extend(VOCABULARY[byte % len(VOCABULARY)] for byte in digest)
        block += 1
    return " ".join(words[:n])


def _example_value(schema: Any, seed: bytes, depth: int = 0) -> Any:
    """A deterministic value valid for a (simple) JSON Schema: enough for tool arguments and
    json_schema answers to parse and match the declared types."""
    if not isinstance(schema, dict) or depth > 8:
        return _generate_text(seed, 1)
    if "enum" in schema and isinstance(schema["enum"], list) and schema["enum"]:
        return schema["enum"][seed[0] % len(schema["enum"])]
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "null")
    if kind == "object" or (kind is None and "properties" in schema):
        properties = schema.get("properties")
        if not isinstance(properties, dict):
            return {}
        return {
            name: _example_value(sub, hashlib.sha256(seed + name.encode()).digest(), depth + 1)
            for name, sub in properties.items()
        }
    if kind == "array":
        return [_example_value(schema.get("items"), seed, depth + 1)]
    if kind == "integer":
        return seed[0] % 100
    if kind == "number":
        return (seed[0] % 100) / 4
    if kind == "boolean":
        return seed[0] % 2 == 0
    if kind == "null":
        return None
    return _generate_text(seed, 2)


def _tool_call_message(raw: dict[str, Any], seed: bytes) -> tuple[dict[str, Any], str] | None:
    """With tools (and tool_choice not "none"), the answer is one call of the chosen tool (or
    the first), its arguments valid for the tool's parameters; after a tool result (the last
    message has the tool role), a text answer, so a round trip ends."""
    tools = raw.get("tools")
    choice = raw.get("tool_choice", "auto")
    messages = raw.get("messages") or [{}]
    if not isinstance(tools, list) or not tools or choice == "none":
        return None
    if messages[-1].get("role") == "tool" and choice != "required":
        return None
    functions = [t.get("function") for t in tools if isinstance(t, dict)]
    functions = [f for f in functions if isinstance(f, dict) and isinstance(f.get("name"), str)]
    if not functions:
        return None
    chosen = functions[0]
    if isinstance(choice, dict):
        wanted = (choice.get("function") or {}).get("name")
        chosen = next((f for f in functions if f["name"] == wanted), chosen)
    arguments = _example_value(chosen.get("parameters") or {"type": "object"}, seed)
    call = {
        "id": f"call_{seed.hex()[:24]}",
        "type": "function",
        "function": {"name": chosen["name"], "arguments": json.dumps(arguments)},
    }
    return {"role": "assistant", "content": None, "tool_calls": [call]}, "tool_calls"


def _formatted_message(raw: dict[str, Any], seed: bytes) -> tuple[dict[str, Any], str] | None:
    """response_format json_object: a JSON object; json_schema: a value valid for the
    schema (simple schemas: types, properties, items, enum)."""
    fmt = raw.get("response_format")
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind == "json_object":
        value: Any = {"answer": _generate_text(seed, 3)}
    elif kind == "json_schema":
        spec = fmt.get("json_schema") if isinstance(fmt, dict) else None
        value = _example_value((spec or {}).get("schema") or {"type": "object"}, seed)
    else:
        return None
    return {"role": "assistant", "content": json.dumps(value)}, "stop"


def _build_completion(config: SandboxConfig, chat: _ChatRequest) -> dict[str, Any]:
    limit = config.output_tokens if chat.max_tokens is None else chat.max_tokens
    n = min(limit, config.output_tokens)
    # Seeding on prompt + provider name (not max_tokens) makes a truncated
    # answer a prefix of the full one, like a real model stopped early.
    seed = hashlib.sha256(_canonical({"provider": config.name, "messages": chat.messages})).digest()
    text = _generate_text(seed, n)
    prompt_tokens = (
        sum(count_tokens(t) + MESSAGE_OVERHEAD_TOKENS for t in chat.texts)
        + CONVERSATION_OVERHEAD_TOKENS
    )
    completion_tokens = count_tokens(text)
    finish_reason = "length" if n == limit and limit < config.output_tokens else "stop"
    request_hash = hashlib.sha256(config.name.encode() + b"\0" + _canonical(chat.raw)).hexdigest()
    message: dict[str, Any] = {"role": "assistant", "content": text}
    shaped = _tool_call_message(chat.raw, seed) or _formatted_message(chat.raw, seed)
    if shaped is not None:
        message, finish_reason = shaped
        completion_tokens = count_tokens(_canonical(message).decode())
    return {
        "id": f"chatcmpl-{request_hash[:24]}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": chat.model,
        "choices": [
            {
                "index": 0,
                "message": message,
                "finish_reason": finish_reason,
            }
        ],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
    }


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    # ThreadingMixIn.server_close() would otherwise join every handler thread,
    # including ones parked on idle keep-alive connections or in a "hang".
    block_on_close = False

    def __init__(self, address: tuple[str, int], provider: SandboxProvider) -> None:
        self.provider = provider
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        self._stop_requested = False
        self._wake_reader, self._wake_writer = socket.socketpair()
        try:
            super().__init__(address, _Handler)
        except BaseException:
            self._wake_reader.close()
            self._wake_writer.close()
            raise

    def serve(self) -> None:
        """Accept loop that stop_serving() can wake instantly.

        serve_forever() only notices shutdown() on its next poll tick, which
        made every stop() cost tens of milliseconds; a wake-up socket avoids
        both that delay and idle polling.
        """
        with selectors.DefaultSelector() as selector:
            selector.register(self, selectors.EVENT_READ)
            selector.register(self._wake_reader, selectors.EVENT_READ)
            while not self._stop_requested:
                for key, _ in selector.select():
                    if key.fileobj is self and not self._stop_requested:
                        self._handle_request_noblock()

    def stop_serving(self) -> None:
        self._stop_requested = True
        with contextlib.suppress(OSError):
            self._wake_writer.send(b"\0")

    def server_close(self) -> None:
        super().server_close()
        self._wake_reader.close()
        self._wake_writer.close()

    def server_bind(self) -> None:
        # HTTPServer.server_bind calls socket.getfqdn(), a reverse DNS lookup
        # that can stall for seconds in sandboxed CI; the name is never used.
        TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name = str(host)
        self.server_port = int(port)

    def process_request(self, request: Any, client_address: Any) -> None:
        self.provider._track_connection(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        self.provider._untrack_connection(request)
        super().shutdown_request(request)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # Clients going away mid-response (timeouts, stop()) are routine here.
        if isinstance(sys.exc_info()[1], OSError):
            return
        super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "FlopexSandbox/1.0"
    # Headers and body go out in separate writes; with Nagle on, the body waits
    # for the client's delayed ACK (~40 ms), which would swamp latency benchmarks.
    disable_nagle_algorithm = True
    server: _Server

    def version_string(self) -> str:
        # The default appends the Python version, which is irrelevant to clients.
        return self.server_version

    def log_message(self, format: str, *args: Any) -> None:
        # Tests and the dev launcher run many requests; access logs are noise.
        return

    # -- dispatch ---------------------------------------------------------

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def _dispatch(self, method: str) -> None:
        self._started = time.perf_counter()
        body = self._read_body()
        if body is None:
            return
        path = urlsplit(self.path).path.rstrip("/") or "/"
        routes = {
            "/v1/models": ("GET", self._models),
            "/v1/chat/completions": ("POST", self._chat),
            "/_sandbox/state": ("GET", self._state),
            "/_sandbox/config": ("POST", self._configure),
            "/_sandbox/reset": ("POST", self._reset),
        }
        route = routes.get(path)
        if route is None:
            self._send_error(
                _ApiError(404, f"Unknown path {path!r}.", "invalid_request_error", "unknown_url")
            )
        elif route[0] != method:
            self._send_error(
                _ApiError(
                    405,
                    f"{method} is not allowed on {path}.",
                    "invalid_request_error",
                    "method_not_allowed",
                ),
                {"Allow": route[0]},
            )
        else:
            route[1](body)

    # -- OpenAI endpoints -------------------------------------------------

    def _models(self, body: bytes) -> None:
        admission = self.server.provider._admit_models(self.headers.get("Authorization"))
        if not self._wait_latency(admission):
            return
        if admission.error is not None:
            self._send_error(admission.error)
        elif admission.fault is not None:
            self._perform_fault(admission.fault, admission)
        else:
            config = admission.config
            pricing = {
                "input_per_million_usd": config.price_input_per_million_usd,
                "output_per_million_usd": config.price_output_per_million_usd,
            }
            data = [
                {
                    "id": model_id,
                    "object": "model",
                    "created": MODELS_CREATED,
                    "owned_by": owner or config.name,
                    "pricing": dict(pricing),
                }
                for model_id, owner in config.models.items()
            ]
            self._send_json(200, {"object": "list", "data": data})

    def _chat(self, body: bytes) -> None:
        parsed = _parse_chat(body)
        admission = self.server.provider._admit_chat(self.headers.get("Authorization"), parsed)
        if not self._wait_latency(admission):
            return
        if admission.error is not None:
            self._send_error(admission.error)
            return
        if admission.fault is not None and admission.fault not in _USAGE_FAULTS:
            self._perform_fault(admission.fault, admission)
            return
        assert admission.chat is not None
        completion = _build_completion(admission.config, admission.chat)
        if admission.fault == "bad_usage":
            usage = completion["usage"]
            usage["completion_tokens"] = -5
            usage["total_tokens"] = usage["prompt_tokens"] - 5
        elif admission.fault == "missing_usage":
            del completion["usage"]
        if _wants_stream(admission.chat):
            self._stream(admission, completion)
        elif self._wait_generation(admission, _completion_tokens(completion)):
            self._send_json(200, completion)

    # -- control API ------------------------------------------------------

    def _state(self, body: bytes) -> None:
        self._send_json(200, self.server.provider.state(), sandbox_headers=False)

    def _configure(self, body: bytes) -> None:
        try:
            changes = json.loads(body)
        except (ValueError, UnicodeDecodeError):
            changes = None
        if not isinstance(changes, dict):
            self._send_error(_bad_request("Body must be a JSON object.", "invalid_json"))
            return
        try:
            self.server.provider.configure(**changes)
        except (TypeError, ValueError) as exc:
            self._send_error(_bad_request(str(exc), "invalid_config"))
            return
        self._send_json(200, self.server.provider.state(), sandbox_headers=False)

    def _reset(self, body: bytes) -> None:
        self.server.provider.reset()
        self._send_json(200, self.server.provider.state(), sandbox_headers=False)

    def _send_sandbox_headers(self) -> None:
        self.send_header("X-Sandbox-Provider", self.server.provider.name)
        # Measured just before the headers go out so benchmarks can subtract
        # everything the provider itself spent, injected latency included.
        service_ms = (time.perf_counter() - self._started) * 1000
        self.send_header("X-Sandbox-Service-Ms", f"{service_ms:.3f}")

    # -- generation pacing and streaming ------------------------------------

    def _wait_until(self, admission: _Admission, deadline: float) -> bool:
        """Wait for a perf_counter deadline; False means the server is stopping."""
        remaining = deadline - time.perf_counter()
        if remaining > 0:
            admission.release.wait(remaining)
        if self.server.provider._stopping:
            self.close_connection = True
            return False
        return True

    def _wait_generation(self, admission: _Admission, completion_tokens: int) -> bool:
        wait_ms = generation_ms(admission.config, completion_tokens)
        return self._wait_until(admission, time.perf_counter() + wait_ms / 1000)

    def _write_chunk(self, data: bytes) -> bool:
        """One HTTP/1.1 chunk; False when the client has gone away."""
        try:
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        except OSError:
            self.close_connection = True
            return False
        return True

    def _stream(self, admission: _Admission, completion: dict[str, Any]) -> None:
        """Server-sent chat.completion.chunk events paced by ttft and tokens/s: a role chunk and
        the first token at ttft, token i at ttft + i / tokens_per_s, the finish chunk at
        ttft + n / tokens_per_s (so a stream lasts as long as the same completion unstreamed)."""
        assert admission.chat is not None
        config = admission.config
        usage_wanted = _include_usage(admission.chat)
        choice = completion["choices"][0]
        deltas = _content_deltas(choice["message"].get("content") or "")
        per_token = 1 / config.tokens_per_s if config.tokens_per_s > 0 else 0.0
        fault, fault_at = admission.stream_fault, config.stream_fault_after_tokens
        record: dict[str, Any] = {"id": completion["id"], "tokens_sent": 0, "outcome": "completed"}
        try:
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream; charset=utf-8")
            self.send_header("Cache-Control", "no-cache")
            self.send_header("Transfer-Encoding", "chunked")
            self._send_sandbox_headers()
            self.end_headers()
            started = time.perf_counter() + config.ttft_ms / 1000
            role = {"role": "assistant", "content": ""}
            if not self._wait_until(admission, started):
                record["outcome"] = "stopped"
                return
            if not self._write_chunk(_sse(_chunk(completion, role, None, usage_wanted))):
                record["outcome"] = "client_disconnected"
                return
            for index, text in enumerate(deltas):
                if fault is not None and index == fault_at:
                    break
                if not self._wait_until(admission, started + index * per_token):
                    record["outcome"] = "stopped"
                    return
                event = _sse(_chunk(completion, {"content": text}, None, usage_wanted))
                if not self._write_chunk(event):
                    record["outcome"] = "client_disconnected"
                    return
                record["tokens_sent"] = index + 1
            if fault is not None:
                record["outcome"] = f"fault:{fault}"
                self._stream_fault(fault, admission)
                return
            if not self._wait_until(admission, started + len(deltas) * per_token):
                record["outcome"] = "stopped"
                return
            # Tool calls go out as OpenAI streams them: the id, type and name first, then the
            # arguments in fragments (they were generated at once, so they are not paced).
            events = [
                _sse(_chunk(completion, {"tool_calls": [part]}, None, usage_wanted))
                for part in _tool_call_deltas(choice["message"].get("tool_calls"))
            ]
            events.append(_sse(_chunk(completion, {}, choice["finish_reason"], usage_wanted)))
            if usage_wanted and "usage" in completion:
                usage_chunk = _chunk(completion, {}, None, False)
                usage_chunk["choices"] = []
                usage_chunk["usage"] = completion["usage"]
                events.append(_sse(usage_chunk))
            events.append(b"data: [DONE]\n\n")
            if not (self._write_chunk(b"".join(events)) and self._write_chunk(b"")):
                record["outcome"] = "client_disconnected"
        finally:
            self.server.provider._record_stream(record)

    def _stream_fault(self, fault: str, admission: _Admission) -> None:
        if fault == "error":
            error = _ApiError(
                500,
                "The sandbox provider hit an injected error mid-stream.",
                "server_error",
                "internal_error",
            )
            # An error object in the stream, then a clean end of the body (no [DONE]).
            if self._write_chunk(_sse(error.body())):
                self._write_chunk(b"")
        elif fault == "stall":
            admission.release.wait(HANG_SECONDS)
            self.close_connection = True
        else:  # disconnect: the body ends without its last chunk
            self.close_connection = True

    # -- helpers ----------------------------------------------------------

    def _wait_latency(self, admission: _Admission) -> bool:
        """Apply configured latency; False means the server is stopping, so drop the request."""
        if admission.config.latency_ms:
            # Waiting on the release event (not time.sleep) lets stop() cut it short.
            admission.release.wait(admission.config.latency_ms / 1000)
        if self.server.provider._stopping:
            self.close_connection = True
            return False
        return True

    def _perform_fault(self, fault: str, admission: _Admission) -> None:
        if fault == "error":
            self._send_error(
                _ApiError(
                    500,
                    "The sandbox provider hit an injected internal error.",
                    "server_error",
                    "internal_error",
                )
            )
        elif fault == "rate_limit":
            self._send_error(
                _ApiError(
                    429,
                    "Rate limit reached for sandbox provider; retry after 1s.",
                    "rate_limit_error",
                    "rate_limit_exceeded",
                ),
                {"Retry-After": "1"},
            )
        elif fault == "malformed":
            # Truncated JSON with a JSON content type: the nastiest realistic case.
            self._send_bytes(200, b'{"id": "chatcmpl-broken", "choices": [{"index": 0, "mess')
        elif fault == "hang":
            admission.release.wait(HANG_SECONDS)
            self.close_connection = True
        elif fault == "disconnect":
            self.close_connection = True
        else:  # pragma: no cover - FAULTS and this dispatch are kept in sync by tests
            raise AssertionError(f"unhandled fault {fault!r}")

    def _read_body(self) -> bytes | None:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            return self._read_chunked()
        raw_length = self.headers.get("Content-Length")
        if raw_length is None:
            return b""
        try:
            length = int(raw_length)
        except ValueError:
            length = -1
        if length < 0 or length > _MAX_BODY_BYTES:
            # The stream position is unknown now, so the connection cannot be reused.
            self.close_connection = True
            self._send_error(_bad_request("Invalid Content-Length.", "invalid_content_length"))
            return None
        return self.rfile.read(length)

    def _read_chunked(self) -> bytes | None:
        chunks: list[bytes] = []
        total = 0
        while True:
            line = self.rfile.readline(1024)
            try:
                size = int(line.split(b";", 1)[0].strip(), 16)
            except ValueError:
                size = -1
            total += max(size, 0)
            if size < 0 or total > _MAX_BODY_BYTES:
                self.close_connection = True
                self._send_error(_bad_request("Invalid chunked body.", "invalid_body"))
                return None
            if size == 0:
                # Drain optional trailers up to the terminating blank line.
                while self.rfile.readline(1024) not in (b"\r\n", b"\n", b""):
                    pass
                return b"".join(chunks)
            chunks.append(self.rfile.read(size))
            self.rfile.readline(1024)

    def _send_error(self, error: _ApiError, headers: dict[str, str] | None = None) -> None:
        self._send_json(error.status, error.body(), headers)

    def _send_json(
        self,
        status: int,
        payload: Any,
        headers: dict[str, str] | None = None,
        *,
        sandbox_headers: bool = True,
    ) -> None:
        self._send_bytes(status, json.dumps(payload).encode(), headers, sandbox_headers)

    def _send_bytes(
        self,
        status: int,
        body: bytes,
        headers: dict[str, str] | None = None,
        sandbox_headers: bool = True,
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        if sandbox_headers:
            self._send_sandbox_headers()
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)


class SandboxProvider:
    """A controllable OpenAI-compatible provider served from a background thread."""

    def __init__(self, config: SandboxConfig, host: str = "127.0.0.1", port: int = 0) -> None:
        self._lock = threading.Lock()
        self._config = _validated_copy(config)
        self._host = host
        self._requested_port = port
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._release = threading.Event()
        self._stopping = False
        self._chat_calls = 0
        self._models_calls = 0
        self._connections = 0
        self._requests: list[dict[str, Any]] = []
        self._streams: list[dict[str, Any]] = []
        self._failure_draws = 0
        self._sockets: set[socket.socket] = set()

    # -- lifecycle --------------------------------------------------------

    def start(self) -> SandboxProvider:
        if self._server is not None:
            raise RuntimeError("sandbox provider already started")
        with self._lock:
            self._stopping = False
            self._release = threading.Event()
        server = _Server((self._host, self._requested_port), self)
        thread = threading.Thread(
            target=server.serve,
            name=f"sandbox-{self._config.name}",
            daemon=True,
        )
        self._server, self._thread = server, thread
        thread.start()
        return self

    def stop(self) -> None:
        server, thread = self._server, self._thread
        if server is None:
            return
        with self._lock:
            self._stopping = True
            self._release.set()
        server.stop_serving()
        if thread is not None:
            thread.join(timeout=5)
        with self._lock:
            sockets = list(self._sockets)
        # Handler threads parked on idle keep-alive connections would otherwise
        # keep serving pooled clients after stop(); shutting the sockets down
        # wakes them. Closing is left to the owning thread to avoid fd reuse races.
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        server.server_close()
        self._server = None
        self._thread = None

    def __enter__(self) -> SandboxProvider:
        return self.start() if self._server is None else self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        where = self.base_url if self._server is not None else "stopped"
        return f"<SandboxProvider {self.name!r} {where}>"

    # -- addressing -------------------------------------------------------

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("sandbox provider is not running")
        return int(self._server.server_address[1])

    @property
    def base_url(self) -> str:
        host = self._host
        # A wildcard bind is not a connectable address; advertise loopback instead.
        if host in ("", "0.0.0.0"):
            host = "127.0.0.1"
        elif host == "::":
            host = "::1"
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.port}/v1"

    @property
    def name(self) -> str:
        with self._lock:
            return self._config.name

    # -- control ----------------------------------------------------------

    def configure(self, **changes: Any) -> None:
        """Atomically update SandboxConfig fields; all changes are validated first."""
        coerced = {field: _coerce_field(field, value) for field, value in changes.items()}
        with self._lock:
            for field, value in coerced.items():
                setattr(self._config, field, value)
            _normalise_fault(self._config)

    def reset(self) -> None:
        """Clear faults, counters and the request log; release anything hanging."""
        with self._lock:
            self._config.fault = None
            self._config.fault_count = None
            self._config.fault_scope = "chat"
            self._reset_market()
            self._chat_calls = 0
            self._models_calls = 0
            self._connections = 0
            self._requests.clear()
            self._release.set()
            # Fresh event for future requests; in-flight ones captured the old one.
            if not self._stopping:
                self._release = threading.Event()

    @property
    def config(self) -> SandboxConfig:
        with self._lock:
            return _snapshot(self._config)

    @property
    def chat_calls(self) -> int:
        with self._lock:
            return self._chat_calls

    @property
    def models_calls(self) -> int:
        with self._lock:
            return self._models_calls

    @property
    def connections(self) -> int:
        """TCP connections accepted since start/reset (lets tests observe keep-alive)."""
        with self._lock:
            return self._connections

    def requests_log(self) -> list[dict[str, Any]]:
        with self._lock:
            return copy.deepcopy(self._requests)

    def state(self) -> dict[str, Any]:
        with self._lock:
            config = dataclasses.asdict(self._config)
            counters = {
                "chat_calls": self._chat_calls,
                "models_calls": self._models_calls,
                "connections": self._connections,
                "requests_logged": len(self._requests),
                "streams": len(self._streams),
            }
            effective = effective_config(_snapshot(self._config), time.time())
        # The control API is unauthenticated, so never echo the key itself.
        config["api_key_set"] = config.pop("api_key") is not None
        base_url = self.base_url if self._server is not None else None
        now = {field: getattr(effective, field) for field in DRIFT_FIELDS}
        return {"base_url": base_url, "config": config, "counters": counters, "effective": now}

    # -- internals used by the handler -----------------------------------

    def _track_connection(self, sock: socket.socket) -> None:
        with self._lock:
            self._sockets.add(sock)
            self._connections += 1

    def _untrack_connection(self, sock: socket.socket) -> None:
        with self._lock:
            self._sockets.discard(sock)

    def _authorized(self, header: str | None) -> bool:
        key = self._config.api_key
        if key is None:
            return True
        expected = f"Bearer {key}".encode()
        return hmac.compare_digest((header or "").strip().encode(), expected)

    def _take_fault(self, endpoint: str, completion_ok: bool) -> str | None:
        config = self._config
        fault = config.fault
        if fault is None or config.fault_scope not in (endpoint, "all"):
            return None
        if fault in _USAGE_FAULTS and (endpoint != "chat" or not completion_ok):
            return None
        if config.fault_count is not None:
            config.fault_count -= 1
            _normalise_fault(config)
        return fault

    def _admit_models(self, authorization: str | None) -> _Admission:
        with self._lock:
            self._models_calls += 1
            config, release = _admission_config(self._config), self._release
            if not self._authorized(authorization):
                return _Admission(config, release, error=_unauthorized())
            return _Admission(config, release, fault=self._take_fault("models", False))

    def _admit_chat(
        self, authorization: str | None, parsed: _ChatRequest | _ApiError
    ) -> _Admission:
        with self._lock:
            self._chat_calls += 1
            if isinstance(parsed, _ChatRequest):
                self._requests.append(copy.deepcopy(parsed.raw))
            config, release = _admission_config(self._config), self._release
            if not self._authorized(authorization):
                return _Admission(config, release, error=_unauthorized())
            chat: _ChatRequest | None = None
            error: _ApiError | None = None
            if isinstance(parsed, _ApiError):
                error = parsed
            elif parsed.model not in config.models:
                error = _ApiError(
                    404,
                    f"The model {parsed.model!r} does not exist on provider {config.name!r}.",
                    "invalid_request_error",
                    "model_not_found",
                )
            else:
                chat = parsed
            drawn = self._draw_failure(config, chat is not None)
            fault = self._take_fault("chat", chat is not None) or drawn
            if fault is not None and fault not in _USAGE_FAULTS:
                # Transport-level faults pre-empt validation, like an outage would.
                return _Admission(config, release, fault=fault)
            if error is not None:
                return _Admission(config, release, error=error)
            stream_fault = self._take_stream_fault(chat)
            return _Admission(config, release, fault=fault, chat=chat, stream_fault=stream_fault)

    # -- failure rate and streams (called with the lock held, except _record_stream) ------

    def _reset_market(self) -> None:
        self._config.stream_fault = None
        self._config.stream_fault_count = None
        self._failure_draws = 0
        self._streams.clear()

    def _draw_failure(self, config: SandboxConfig, completion_ok: bool) -> str | None:
        # Every chat request takes a draw, failing or not, so request i always gets draw i.
        index = self._failure_draws
        self._failure_draws += 1
        if _unit(config.seed, config.name, "failure", index) >= config.failure_rate:
            return None
        if config.failure_fault in _USAGE_FAULTS and not completion_ok:
            return None
        return config.failure_fault

    def _take_stream_fault(self, chat: _ChatRequest | None) -> str | None:
        config = self._config
        if chat is None or not _wants_stream(chat) or config.stream_fault is None:
            return None
        fault = config.stream_fault
        if config.stream_fault_count is not None:
            config.stream_fault_count -= 1
            _normalise_market(config)
        return fault

    def _record_stream(self, record: dict[str, Any]) -> None:
        with self._lock:
            self._streams.append(record)

    def streams_log(self) -> list[dict[str, Any]]:
        """One entry per streamed completion: id, tokens_sent, outcome (completed,
        client_disconnected, stopped, fault:<kind>)."""
        with self._lock:
            return copy.deepcopy(self._streams)

    def effective(self, at: float | None = None) -> SandboxConfig:
        """The configuration in force at unix time `at` (now by default), drift applied."""
        return effective_config(self.config, time.time() if at is None else at)


def _unauthorized() -> _ApiError:
    return _ApiError(401, "Incorrect API key provided.", "invalid_request_error", "invalid_api_key")
