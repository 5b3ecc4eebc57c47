"""The OpenAI Chat Completions wire format on our jobs: a request's messages and parameters
checked and made into an InferenceRequest, and a job written as a ``chat.completion``.

What we accept, pass through or refuse is listed in docs/api.md ("Chat completions"); the
constants below are that table.
"""

from __future__ import annotations

import json
import re
from datetime import UTC
from typing import Any

from app.exceptions import InvalidRequest
from app.jobs.render import render_success
from app.jobs.submit import InferenceRequest, exchange_controls
from app.models import Job

ROLES = ("system", "developer", "user", "assistant", "tool")
# Sent to the provider exactly as received.
PASS_THROUGH = (
    "temperature",
    "top_p",
    "stop",
    "seed",
    "presence_penalty",
    "frequency_penalty",
    "logit_bias",
    "response_format",
    "tools",
    "tool_choice",
    "parallel_tool_calls",
)
# OpenAI parameters we cannot honour: accepted only with the value that asks for nothing.
REFUSED_UNLESS_DEFAULT: dict[str, tuple[Any, ...]] = {
    "logprobs": (None, False),
    "top_logprobs": (None,),
    "store": (None, False),
    "modalities": (None, ["text"]),
    "audio": (None,),
    "prediction": (None,),
    "functions": (None,),
    "function_call": (None,),
    "web_search_options": (None,),
    "reasoning_effort": (None,),
    "verbosity": (None,),
    "service_tier": (None, "auto", "default"),
    "prompt_cache_key": (None,),
    "safety_identifier": (None,),
}
_REFUSAL_HINTS = {
    "functions": "use tools",
    "function_call": "use tool_choice",
    "logprobs": "log probabilities are not returned",
    "top_logprobs": "log probabilities are not returned",
}
_MESSAGE_KEYS = {
    "system": {"role", "content", "name"},
    "developer": {"role", "content", "name"},
    "user": {"role", "content", "name"},
    "assistant": {"role", "content", "name", "tool_calls", "refusal"},
    "tool": {"role", "content", "tool_call_id"},
}
_TOOL_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
RESPONSE_FORMATS = ("text", "json_object", "json_schema")


def refused_parameter(body: dict[str, Any]) -> InvalidRequest | None:
    """The first OpenAI parameter of the body that we cannot honour, as its 400."""
    for name, allowed in REFUSED_UNLESS_DEFAULT.items():
        if name in body and body[name] not in allowed:
            hint = _REFUSAL_HINTS.get(name, "not supported by this exchange")
            return InvalidRequest(f"{name} is not supported ({hint}).", name)
    return None


def _text_problem(text: str) -> str | None:
    if "\x00" in text:
        return "must not contain NUL characters"
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return "must be valid Unicode text (no lone surrogates)"
    return None


def _content_text(content: Any, where: str, required: bool) -> str:
    """The text of a message's content (a string or an array of text parts); anything a text
    model cannot take (an image, audio, a file) is refused, naming the part."""
    if content is None:
        if required:
            raise InvalidRequest(f"{where} is required.", where)
        return ""
    if isinstance(content, str):
        problem = _text_problem(content)
        if problem:
            raise InvalidRequest(f"{where} {problem}.", where)
        return content
    if not isinstance(content, list) or not content:
        raise InvalidRequest(f"{where} must be a string or a non-empty array of text parts.", where)
    texts = []
    for j, part in enumerate(content):
        at = f"{where}[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind != "text":
            name = kind if isinstance(kind, str) else "this part"
            raise InvalidRequest(
                f"{at}: {name} content cannot be carried; the models served take text parts only.",
                at,
            )
        if set(part) - {"type", "text"} or not isinstance(part.get("text"), str):
            raise InvalidRequest(f'{at} must be {{"type": "text", "text": "..."}}.', at)
        problem = _text_problem(part["text"])
        if problem:
            raise InvalidRequest(f"{at}.text {problem}.", f"{at}.text")
        texts.append(part["text"])
    return "\n".join(texts)


def _check_tool_calls(calls: Any, where: str) -> None:
    if not isinstance(calls, list) or not calls:
        raise InvalidRequest(f"{where} must be a non-empty array.", where)
    for j, call in enumerate(calls):
        function = call.get("function") if isinstance(call, dict) else None
        if (
            not isinstance(call, dict)
            or call.get("type", "function") != "function"
            or not isinstance(call.get("id"), str)
            or not isinstance(function, dict)
            or not isinstance(function.get("name"), str)
            or not isinstance(function.get("arguments"), str)
        ):
            raise InvalidRequest(
                f'{where}[{j}] must be {{"id", "type": "function", "function": '
                '{"name", "arguments"}} with string values.',
                f"{where}[{j}]",
            )


def check_messages(messages: Any, max_chars: int) -> tuple[list[dict[str, Any]], str]:
    """The messages as the provider gets them, and their text (for the input estimate).
    ``developer`` (OpenAI's newer name for system instructions) is sent as ``system``: the
    open models' servers know only the older role."""
    if not isinstance(messages, list) or not messages:
        raise InvalidRequest("messages must be a non-empty array.", "messages")
    sent: list[dict[str, Any]] = []
    texts: list[str] = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        role = message.get("role") if isinstance(message, dict) else None
        if role not in ROLES:
            raise InvalidRequest(f"{where}.role must be one of {', '.join(ROLES)}.", where)
        assert isinstance(message, dict)
        # An optional field sent as null means its absence: an SDK's model_dump() of a reply
        # writes "refusal", "audio", "annotations"... as null. Providers get only what says
        # something.
        message = {k: v for k, v in message.items() if v is not None or k == "content"}
        unknown = sorted(set(message) - _MESSAGE_KEYS[role])
        if unknown:
            raise InvalidRequest(
                f"{where}.{unknown[0]} is not accepted in a {role} message.",
                f"{where}.{unknown[0]}",
            )
        has_calls = role == "assistant" and message.get("tool_calls") is not None
        if has_calls:
            _check_tool_calls(message["tool_calls"], f"{where}.tool_calls")
        texts.append(_content_text(message.get("content"), f"{where}.content", not has_calls))
        if role == "tool" and not isinstance(message.get("tool_call_id"), str):
            raise InvalidRequest(
                f"{where}.tool_call_id is required in a tool message.", f"{where}.tool_call_id"
            )
        for key in ("name", "refusal"):
            if key in message and not isinstance(message[key], str | None):
                raise InvalidRequest(f"{where}.{key} must be a string.", f"{where}.{key}")
        sent.append({**message, "role": "system"} if role == "developer" else message)
    text = "\n".join(texts)
    if len(text) > max_chars:
        raise InvalidRequest(f"The messages are longer than {max_chars} characters.", "messages")
    return sent, text


def check_tools(params: dict[str, Any]) -> str:
    """Tools, tool_choice and response_format in the shapes the providers expect; the text the
    tool definitions add to the prompt (for the input estimate)."""
    tools = params.get("tools")
    names: list[str] = []
    if tools is not None:
        if not isinstance(tools, list) or not tools:
            raise InvalidRequest("tools must be a non-empty array.", "tools")
        for i, tool in enumerate(tools):
            function = tool.get("function") if isinstance(tool, dict) else None
            name = function.get("name") if isinstance(function, dict) else None
            if (
                not isinstance(tool, dict)
                or tool.get("type") != "function"
                or not isinstance(name, str)
                or not _TOOL_NAME.fullmatch(name)
            ):
                raise InvalidRequest(
                    f'tools[{i}] must be {{"type": "function", "function": {{"name": ...}}}} '
                    "with a name of 1 to 64 letters, digits, _ or -.",
                    f"tools[{i}]",
                )
            assert isinstance(function, dict)
            if not isinstance(function.get("parameters", {}), dict):
                raise InvalidRequest(
                    f"tools[{i}].function.parameters must be a JSON Schema object.",
                    f"tools[{i}].function.parameters",
                )
            names.append(name)
    choice = params.get("tool_choice")
    if choice is not None:
        if tools is None:
            raise InvalidRequest("tool_choice needs tools.", "tool_choice")
        if isinstance(choice, dict):
            function = choice.get("function")
            chosen = function.get("name") if isinstance(function, dict) else None
            if choice.get("type") != "function" or chosen not in names:
                raise InvalidRequest(
                    'tool_choice must name one of the tools: {"type": "function", '
                    '"function": {"name": ...}}.',
                    "tool_choice",
                )
        elif choice not in ("none", "auto", "required"):
            raise InvalidRequest(
                "tool_choice must be none, auto, required or a function.", "tool_choice"
            )
    fmt = params.get("response_format")
    if fmt is not None:
        kind = fmt.get("type") if isinstance(fmt, dict) else None
        if kind not in RESPONSE_FORMATS:
            raise InvalidRequest(
                f"response_format.type must be one of {', '.join(RESPONSE_FORMATS)}.",
                "response_format",
            )
        assert isinstance(fmt, dict)
        schema = fmt.get("json_schema")
        if kind == "json_schema" and (
            not isinstance(schema, dict) or not isinstance(schema.get("name"), str)
        ):
            raise InvalidRequest(
                "response_format.json_schema must be an object with a name (and its schema).",
                "response_format.json_schema",
            )
    return json.dumps(tools, separators=(",", ":")) if tools is not None else ""


def chat_request(args: dict[str, Any], max_input_chars: int) -> InferenceRequest:
    """A validated Chat Completions body (its fields' types already checked) as the request
    the exchange runs, or the 400 of the first thing it cannot carry."""
    stream = bool(args.get("stream"))
    include_usage(args)  # stream_options checked before anything is written
    if args.get("n") not in (None, 1):
        raise InvalidRequest("n must be 1: one choice per request.", "n")
    refused = refused_parameter(args)
    if refused is not None:
        raise refused
    limit, newer = args.get("max_tokens"), args.get("max_completion_tokens")
    if limit is not None and newer is not None and limit != newer:
        raise InvalidRequest(
            "Send max_tokens or max_completion_tokens, not both.", "max_completion_tokens"
        )
    messages, text = check_messages(args["messages"], max_input_chars)
    params = {k: args[k] for k in PASS_THROUGH if args.get(k) is not None}
    tools_text = check_tools(params)
    return InferenceRequest(
        model=args["model"],
        prompt=f"{text}\n{tools_text}" if tools_text else text,
        max_output_tokens=newer if newer is not None else limit,
        messages=messages,
        provider_params=params,
        user=args.get("user"),
        stream=stream,
        **exchange_controls(args),
    )


def include_usage(args: dict[str, Any]) -> bool:
    """``stream_options.include_usage`` of a valid body: whether the stream ends with a usage
    chunk. ``stream_options`` is only allowed with ``stream: true`` (as OpenAI answers)."""
    options = args.get("stream_options")
    if options is None:
        return False
    if not args.get("stream"):
        raise InvalidRequest(
            "stream_options is only allowed when stream is true.", "stream_options"
        )
    if (
        not isinstance(options, dict)
        or set(options) - {"include_usage"}
        or not isinstance(options.get("include_usage", False), bool)
    ):
        raise InvalidRequest(
            "stream_options must be an object with a boolean include_usage.", "stream_options"
        )
    return bool(options.get("include_usage", False))


def render_chat_completion(job: Job) -> dict[str, Any]:
    """A succeeded job as a ``chat.completion``; ``flopex`` carries what the native answer says
    (the job, its provider, billing and routing), with the same amounts to the digit."""
    native = render_success(job)
    message: dict[str, Any] = {
        "role": "assistant",
        # OpenAI's convention: null content beside tool calls and nothing else.
        "content": None if job.tool_calls and not job.output_text else job.output_text,
        "refusal": None,
    }
    if job.tool_calls:
        message["tool_calls"] = job.tool_calls
    usage = native["usage"]
    return {
        "id": f"chatcmpl-{job.id.hex}",
        "object": "chat.completion",
        # SQLite (the embedded default) hands back times without a zone; all are UTC.
        "created": int(job.created_at.replace(tzinfo=job.created_at.tzinfo or UTC).timestamp()),
        "model": job.model,
        "choices": [
            {
                "index": 0,
                "message": message,
                "finish_reason": _finish_reason(job),
                "logprobs": None,
            }
        ],
        "usage": {
            "prompt_tokens": usage["input_tokens"],
            "completion_tokens": usage["output_tokens"],
            "total_tokens": usage["total_tokens"],
        },
        "system_fingerprint": None,
        "flopex": {
            "job_id": native["id"],
            "status": native["status"],
            "provider": native["provider"],
            "performance": native["performance"],
            "billing": native["billing"],
            "routing": native["routing"],
            "customer_ref": native["customer_ref"],
            "metadata": native["metadata"],
        },
    }


def _finish_reason(job: Job) -> str:
    """OpenAI's names: stop, length, tool_calls, content_filter; a provider's own word (or none)
    is reported as stop."""
    reason = job.finish_reason
    if job.tool_calls and reason in (None, "stop", "tool_calls", "function_call"):
        return "tool_calls"
    if reason in ("stop", "length", "tool_calls", "content_filter"):
        return reason
    return "stop"
