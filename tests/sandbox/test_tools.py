"""The sandbox's tool calls and response_format, over real loopback HTTP: deterministic answers
valid for what was declared, enough to test a gateway's pass-through."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
import requests

from sandbox import SandboxConfig, SandboxProvider

MODEL = "meta-llama/Llama-3.1-8B-Instruct"
LOOKUP = {
    "type": "function",
    "function": {
        "name": "lookup",
        "parameters": {
            "type": "object",
            "properties": {
                "query": {"type": "string"},
                "limit": {"type": "integer"},
                "exact": {"type": "boolean"},
                "tags": {"type": "array", "items": {"type": "string"}},
                "mode": {"type": "string", "enum": ["fast", "slow"]},
            },
        },
    },
}
NOTE = {"type": "function", "function": {"name": "note"}}


@pytest.fixture(scope="module")
def chat() -> Iterator[Any]:
    with (
        SandboxProvider(SandboxConfig(name="alpha", models={MODEL: "alpha"})) as provider,
        requests.Session() as session,
    ):
        session.trust_env = False

        def post(**body: Any) -> requests.Response:
            body = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], **body}
            return session.post(f"{provider.base_url}/chat/completions", json=body, timeout=5)

        yield post


def test_tools_answer_a_call_valid_for_the_first_tools_parameters(chat):
    first = chat(tools=[LOOKUP, NOTE]).json()
    again = chat(tools=[LOOKUP, NOTE]).json()
    choice = first["choices"][0]
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] is None
    (call,) = choice["message"]["tool_calls"]
    assert call["type"] == "function" and call["function"]["name"] == "lookup"
    args = json.loads(call["function"]["arguments"])
    assert isinstance(args["query"], str) and isinstance(args["limit"], int)
    assert isinstance(args["exact"], bool) and isinstance(args["tags"], list)
    assert args["mode"] in ("fast", "slow")
    assert again["choices"] == first["choices"]  # deterministic
    assert first["usage"]["completion_tokens"] > 0


def test_tool_choice_names_the_tool_or_turns_calls_off(chat):
    named = chat(
        tools=[LOOKUP, NOTE], tool_choice={"type": "function", "function": {"name": "note"}}
    )
    assert named.json()["choices"][0]["message"]["tool_calls"][0]["function"]["name"] == "note"
    off = chat(tools=[LOOKUP], tool_choice="none").json()["choices"][0]
    assert off["finish_reason"] != "tool_calls" and isinstance(off["message"]["content"], str)


def test_a_tool_result_gets_a_text_answer_and_needs_its_call_id(chat):
    messages = [
        {"role": "user", "content": "Look it up"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "lookup", "arguments": "{}"},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "42"},
    ]
    answer = chat(messages=messages, tools=[LOOKUP]).json()["choices"][0]
    assert answer["finish_reason"] == "stop" and answer["message"]["content"]
    refused = chat(messages=[{"role": "tool", "content": "42"}])
    assert refused.status_code == 400


def test_response_format_answers_valid_json(chat):
    obj = chat(response_format={"type": "json_object"}).json()["choices"][0]["message"]
    assert isinstance(json.loads(obj["content"]), dict)
    schema = {
        "type": "object",
        "properties": {"city": {"type": "string"}, "temp": {"type": "number"}},
    }
    fmt = {"type": "json_schema", "json_schema": {"name": "weather", "schema": schema}}
    value = json.loads(chat(response_format=fmt).json()["choices"][0]["message"]["content"])
    assert isinstance(value["city"], str) and isinstance(value["temp"], int | float)
