"""app/api/sse.py: the two encodings of a job's events, as bytes on the wire."""

from __future__ import annotations

import json
from decimal import Decimal
from typing import Any

from app.api.sse import ChatFrames, native_frames
from app.jobs.events import Event

JOB = "0b7e3c1e-9a0e-4d4b-8a52-1f4a3c1c2d3e"
BILLING = {"cost_usd": Decimal("0.000041"), "balance_remaining_usd": Decimal("9.912004")}
COMPLETED = Event(
    "5-0",
    "completed",
    {
        "id": JOB,
        "provider": "alpha",
        "finish_reason": "tool_calls",
        "usage": {"input_tokens": 7, "output_tokens": 3, "total_tokens": 10},
        "billing": BILLING,
    },
)


def chunks(frames: list[bytes]) -> list[Any]:
    out: list[Any] = []
    for frame in frames:
        assert frame.startswith(b"data: ") and frame.endswith(b"\n\n")
        payload = frame[6:-2]
        out.append(payload.decode() if payload == b"[DONE]" else json.loads(payload))
    return out


def encode(frames: ChatFrames, events: list[Event]) -> list[Any]:
    return chunks([f for e in events for f in frames(e)])


def test_native_events_carry_their_id_name_and_exact_json():
    frame = b"".join(native_frames(COMPLETED))
    assert frame.startswith(b"id: 5-0\nevent: completed\ndata: {")
    assert frame.endswith(b"}\n\n") and frame.count(b"\n") == 4
    assert b'"cost_usd":0.000041' in frame  # digit for digit, never 4.1e-05
    assert not b"".join(native_frames(Event("", "completed", {}))).startswith(b"id:")


def test_chat_chunks_role_content_tool_calls_finish_usage_done():
    frames = ChatFrames(JOB, "llama-3.1-8b", 1700000000, include_usage=True)
    call = {"index": 0, "id": "call_1", "type": "function", "function": {"name": "f"}}
    got = encode(
        frames,
        [
            Event("1-0", "routing", {"provider": "alpha"}),
            Event("2-0", "delta", {"text": "Hel"}),
            Event("3-0", "delta", {"text": "lo"}),
            Event("4-0", "delta", {"text": "", "tool_calls": [call]}),
            COMPLETED,
        ],
    )
    assert all(c["id"] == f"chatcmpl-{JOB.replace('-', '')}" for c in got[:-1])
    assert all(c["object"] == "chat.completion.chunk" for c in got[:-1])
    assert got[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert [c["choices"][0]["delta"] for c in got[1:4]] == [
        {"content": "Hel"},
        {"content": "lo"},
        {"tool_calls": [call]},
    ]
    assert got[4]["choices"][0] == {
        "index": 0,
        "delta": {},
        "logprobs": None,
        "finish_reason": "tool_calls",
    }
    assert got[5]["choices"] == []
    assert got[5]["usage"] == {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}
    assert got[5]["flopex"]["job_id"] == JOB and got[5]["flopex"]["provider"] == "alpha"
    assert got[-1] == "[DONE]"


def test_chat_without_usage_ends_with_the_finish_chunk_and_the_role_comes_once():
    frames = ChatFrames(JOB, "m", 1, include_usage=False)
    got = encode(frames, [Event("1-0", "delta", {"text": "a"}), COMPLETED])
    assert got[0]["choices"][0]["delta"]["role"] == "assistant"
    assert got[1]["choices"][0]["delta"] == {"content": "a"}
    assert got[2]["choices"][0]["finish_reason"] == "tool_calls" and "usage" not in got[2]
    assert got[2]["flopex"]["billing"]["cost_usd"] == 0.000041
    assert got[3] == "[DONE]" and len(got) == 4


def test_a_chat_failure_is_an_error_object_then_the_end():
    frames = ChatFrames(JOB, "m", 1, include_usage=True)
    error = {"type": "api_error", "code": "provider_error", "message": "cut", "job_id": JOB}
    got = encode(frames, [Event("1-0", "failed", {"error": error, "status": "failed"})])
    assert got == [{"error": error}]


def test_the_openapi_document_describes_the_streams(client):
    spec = client.get("/openapi.json").get_json()
    paths = spec["paths"]
    submit = paths["/v1/inference"]["post"]["responses"]["200"]["content"]
    assert set(submit) == {"application/json", "text/event-stream"}
    assert submit["text/event-stream"]["schema"] == {"$ref": "#/components/schemas/StreamEvent"}
    events = paths["/v1/inference/{job_id}/events"]["get"]
    assert "text/event-stream" in events["responses"]["200"]["content"]
    assert [p["name"] for p in events["parameters"] if p["in"] == "header"] == ["Last-Event-ID"]
    event = spec["components"]["schemas"]["StreamEvent"]["properties"]
    assert event["event"]["enum"] == ["routing", "delta", "completed", "failed"]
    chat = paths["/v1/chat/completions"]["post"]["responses"]["200"]["content"]
    assert "text/event-stream" in chat
