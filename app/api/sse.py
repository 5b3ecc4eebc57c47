"""Server-Sent Events: a job's events (app/jobs/events.py) relayed to an HTTP client.

Two encodings of the same events: the native stream (named events ``routing``, ``delta``,
``completed``, ``failed``, each with the Redis Stream entry id as its SSE ``id`` so that
``Last-Event-ID`` resumes it) and the Chat Completions stream (``chat.completion.chunk`` data
lines as the OpenAI SDKs parse them, then ``data: [DONE]``). A comment line goes out every
``FLOPEX_STREAM_KEEPALIVE_S`` without an event, so proxies keep an idle connection open.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from flask import Response

from app.exceptions import status_for
from app.jobs import events, states
from app.jobs.events import COMPLETED, DELTA, FAILED, ROUTING, Event
from app.json import dumps_exact
from app.metrics import STREAMS_CLOSED, STREAMS_OPEN
from config.settings import get_settings

log = logging.getLogger(__name__)

KEEPALIVE = b": keep-alive\n\n"
_HEADERS = {
    "Cache-Control": "no-cache",
    # nginx and similar proxies must pass each event on as it comes, not buffer the response.
    "X-Accel-Buffering": "no",
}

Frames = Callable[[Event], Iterable[bytes]]


def native_frames(event: Event) -> Iterable[bytes]:
    head = f"id: {event.id}\n" if event.id else ""
    # The stored JSON as it is: one line (compact JSON has no newline), never parsed here.
    yield f"{head}event: {event.name}\ndata: {event.raw}\n\n".encode()


class ChatFrames:
    """One job's events as ``chat.completion.chunk``s: the role in the first chunk, content and
    tool-call deltas, a last chunk with ``finish_reason``, the usage chunk (empty ``choices``)
    when ``stream_options.include_usage`` asked for it, then ``[DONE]``. The chunk that closes
    the stream carries a ``flopex`` object (job id, provider, billing). A failure after the
    stream started is an error object in the stream, then the end (no ``[DONE]``)."""

    def __init__(self, job_id: uuid.UUID | str, model: str, created: int, include_usage: bool):
        job = uuid.UUID(str(job_id))
        # The id the non-streaming chat.completion of the job has (app/jobs/chat.py).
        self.id = f"chatcmpl-{job.hex}"
        self.job_id = str(job)
        self.model = model
        self.created = created
        self.include_usage = include_usage
        self._started = False

    def _chunk(self, choices: list[dict[str, Any]], **extra: Any) -> bytes:
        body = {
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "system_fingerprint": None,
            "choices": choices,
            **extra,
        }
        return b"data: " + dumps_exact(body).encode() + b"\n\n"

    def _delta(self, delta: dict[str, Any], finish_reason: str | None = None) -> bytes:
        return self._chunk(
            [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]
        )

    def _role(self) -> Iterator[bytes]:
        if not self._started:
            self._started = True
            yield self._delta({"role": "assistant", "content": ""})

    def __call__(self, event: Event) -> Iterable[bytes]:
        if event.name == ROUTING:
            yield from self._role()
        elif event.name == DELTA:
            yield from self._role()
            delta: dict[str, Any] = {}
            if event.data.get("text"):
                delta["content"] = event.data["text"]
            if event.data.get("tool_calls"):
                delta["tool_calls"] = event.data["tool_calls"]
            if delta:
                yield self._delta(delta)
        elif event.name == COMPLETED:
            yield from self._role()
            data = event.data
            flopex = {
                "job_id": self.job_id,
                "provider": data.get("provider"),
                "billing": data.get("billing"),
            }
            finish = data.get("finish_reason") or "stop"
            if not self.include_usage:
                yield self._chunk(
                    [{"index": 0, "delta": {}, "logprobs": None, "finish_reason": finish}],
                    flopex=flopex,
                )
            else:
                yield self._delta({}, finish)
                usage = data.get("usage") or {}
                yield self._chunk(
                    [],
                    usage={
                        "prompt_tokens": usage.get("input_tokens", 0),
                        "completion_tokens": usage.get("output_tokens", 0),
                        "total_tokens": usage.get("total_tokens", 0),
                    },
                    flopex=flopex,
                )
            yield b"data: [DONE]\n\n"
        elif event.name == FAILED:
            body = {**event.data}
            body.pop("status", None)
            yield b"data: " + dumps_exact(body).encode() + b"\n\n"


def _finished(job_id: uuid.UUID) -> Callable[[], Event | None]:
    def read() -> Event | None:
        from app.db import session_scope
        from app.jobs.render import terminal_event
        from app.models import Job

        with session_scope() as session:
            job = session.get(Job, job_id)
            if job is None or job.status not in states.FINAL:
                return None
            name, data = terminal_event(job)
            return Event("", name, data)

    return read


def _stop(job_id: uuid.UUID, celery: Any) -> None:
    """The client of a synchronous stream left: a job not yet executing is cancelled (nothing
    charged); a running one is told to close the provider's stream (charged for what was
    generated, docs/billing.md)."""
    from app.db import session_scope
    from app.exceptions import FlopexError
    from app.jobs.cancel import announce_cancelled, cancel
    from app.models import Job

    client = events.relay_client()
    events.request_stop(client, job_id, get_settings().stream_events_ttl_s)
    try:
        with session_scope() as session:
            job = session.get(Job, job_id)
            if job is None or job.status not in states.CANCELLABLE:
                return
            cancel(session, job)
            session.commit()
            announce_cancelled(job, client, celery)
    except FlopexError:
        pass  # it started executing meanwhile: the stop request reaches its worker
    except Exception:
        log.exception("stopping job %s after its client left", job_id)


def relay(
    job_id: uuid.UUID,
    frames: Frames,
    *,
    after: str | None = None,
    stop_on_disconnect: bool = False,
    early_error: bool = False,
    celery: Any = None,
    headers: dict[str, str] | None = None,
) -> Response:
    """The response that relays a job's events. ``early_error``: wait (up to one keep-alive
    interval) for the first delta; a job that fails before it is answered as a plain error with
    its status, as a request that does not stream would be. ``stop_on_disconnect``: a client
    that goes away stops the job (a synchronous stream; an attached reader never does)."""
    settings = get_settings()
    source = events.follow(
        events.relay_client(), job_id, after, settings.stream_keepalive_s, _finished(job_id)
    )
    ready: list[list[Event] | None] = []
    if early_error:
        for batch in source:
            ready.append(batch)
            if batch is None or any(e.name in (DELTA, COMPLETED, FAILED) for e in batch):
                break
        seen = [e for batch in ready if batch for e in batch]
        last = seen[-1] if seen else None
        first_output = next((e for e in seen if e.name in (DELTA, COMPLETED, FAILED)), None)
        if first_output is not None and first_output is last and last.name == FAILED:
            error = last.data["error"]
            response = Response(
                dumps_exact({"error": error}),
                status=status_for(error.get("code", "internal_error")),
                mimetype="application/json",
            )
            response.headers.update(headers or {})
            return response

    def body() -> Iterator[bytes]:
        ended = False
        how = "error"
        STREAMS_OPEN.inc()
        try:
            if not ready:
                yield KEEPALIVE  # the headers go out now, before the first event
            for batch in _chain(ready, source):
                if batch is None:
                    yield KEEPALIVE
                    continue
                # A batch is written at once: one write for all the events Redis had.
                yield b"".join(frame for event in batch for frame in frames(event))
                ended = ended or batch[-1].terminal
            how = "ended"
        except GeneratorExit:
            how = "client_left"
            # The server closes the body when the client has gone (a write failed). A fault of
            # ours (Redis, PostgreSQL) ends the body too, but is not the client leaving: the
            # job carries on and the client can resume it.
            if not ended and stop_on_disconnect:
                _stop(job_id, celery)
            raise
        finally:
            STREAMS_OPEN.dec()
            STREAMS_CLOSED.labels(how).inc()

    response = Response(body(), mimetype="text/event-stream")
    response.headers.update({**_HEADERS, **(headers or {})})
    return response


def _chain(
    first: list[list[Event] | None], rest: Iterator[list[Event] | None]
) -> Iterator[list[Event] | None]:
    yield from first
    yield from rest
