"""Executing a streaming job: the provider's answer, streamed into the job's events.

``stream_completion`` is the streaming counterpart of ``openai_compat.complete`` for the route
step (app/jobs/execution.py): it opens the provider's stream, appends each delta to the job's
Redis Stream as it arrives (one round trip per delta, which also says whether the client asked
to stop) and returns the whole ``Completion`` at the end, so the job is recorded and settled
exactly as a non-streaming one. Before the first delta a failure is an ordinary
``ProviderFailure`` (the route step falls back to the next quote, as for any job); after it the
client has part of an answer, so there is no fallback: ``StreamCut`` carries what was generated,
and the job is settled for it (``cut_charge``, docs/billing.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from app.failpoints import failpoint
from app.jobs.events import DELTA, ROUTING, EventWriter
from app.models import Job
from app.money import ceil_micros, customer_charge, provider_cost
from app.providers.openai_compat import (
    Completion,
    ProviderFailure,
    ProviderStream,
    Usage,
    open_stream,
    resolve_api_key,
)
from app.routing import Decision, Quote
from config.settings import Settings


class StreamCut(Exception):
    """The stream ended after its first delta without the provider finishing: ``failure`` is the
    provider's (error event, dropped connection, stall), or None when the client asked to stop
    and the upstream stream was closed."""

    def __init__(
        self,
        text: str,
        delivered: int,
        usage: Usage | None,
        finish_reason: str | None,
        failure: ProviderFailure | None,
    ) -> None:
        super().__init__(str(failure) if failure else "stopped: the client disconnected")
        self.text = text
        self.delivered = delivered
        self.usage = usage
        self.finish_reason = finish_reason
        self.failure = failure

    @property
    def by_client(self) -> bool:
        return self.failure is None


class StopRequested(Exception):
    """The client left before any provider was called: nothing to charge."""


def is_streaming(job: Job) -> bool:
    return bool((job.request or {}).get("stream"))


def payload(job: Job, quote: Quote) -> dict[str, Any]:
    """The chat-completions body for this job at this provider."""
    request = job.request or {}
    return {
        "model": quote.provider_model_id,
        "messages": job.messages or [{"role": "user", "content": request.get("input", "")}],
        # A chat completion's sampling, tool and format parameters, sent unchanged.
        **(job.provider_params or {}),
        "max_tokens": job.max_output_tokens,
    }


def announce_route(writer: EventWriter, job: Job, decision: Decision, quote: Quote) -> None:
    """The ``routing`` event before each attempt: the provider about to be asked and the
    decision (a fallback sends another one). Raises StopRequested when the client has left."""
    data = {"id": str(job.id), "provider": quote.provider, **decision.to_dict()}
    if writer.append(ROUTING, data):
        raise StopRequested


def stream_completion(
    writer: EventWriter, job: Job, quote: Quote, endpoint: dict[str, Any], settings: Settings
) -> Completion:
    stream = open_stream(
        endpoint["base_url"],
        resolve_api_key(endpoint.get("api_key_env")),
        payload(job, quote),
        connect_timeout_s=settings.provider_connect_timeout_s,
        read_timeout_s=settings.provider_read_timeout_s,
        retries=settings.provider_retries,
    )
    delivered = 0
    with stream:
        try:
            for delta in stream:
                data: dict[str, Any] = {"text": delta.text}
                if delta.tool_calls:
                    data["tool_calls"] = list(delta.tool_calls)
                delivered += 1
                stop = writer.append(DELTA, data)
                failpoint("after_stream_delta")
                if stop:
                    # Closing the connection is how the provider learns to stop generating.
                    stream.close()
                    raise _cut(stream, delivered, None)
        except ProviderFailure as exc:
            if delivered == 0:
                raise  # nothing reached the client: the route step falls back
            raise _cut(stream, delivered, exc) from exc
    return Completion(
        text=stream.text,
        input_tokens=stream.usage.input_tokens if stream.usage else job.estimated_input_tokens,
        output_tokens=stream.usage.output_tokens if stream.usage else delivered,
        finish_reason=stream.finish_reason,
        provider_response_id=stream.response_id,
        tool_calls=stream.tool_calls or None,
    )


def _cut(stream: ProviderStream, delivered: int, failure: ProviderFailure | None) -> StreamCut:
    return StreamCut(stream.text, delivered, stream.usage, stream.finish_reason, failure)


@dataclass(frozen=True)
class CutCharge:
    input_tokens: int
    output_tokens: int
    charge_micros: int
    provider_cost_micros: int


def cut_charge(job: Job, quote: Quote, usage: Usage | None, delivered: int) -> CutCharge:
    """What a cut stream costs (docs/billing.md): the provider's reported usage when it sent
    one; failing that, what was delivered: one output token per delta received (every chunk
    carries at least one token) and the input as estimated at admission; never more than the
    hold."""
    input_tokens = usage.input_tokens if usage else job.estimated_input_tokens
    output_tokens = usage.output_tokens if usage else delivered
    exact = customer_charge(
        input_tokens,
        output_tokens,
        quote.input_price_micros_per_m,
        quote.output_price_micros_per_m,
        Decimal(job.markup),
    )
    cost = provider_cost(
        input_tokens, output_tokens, quote.input_price_micros_per_m, quote.output_price_micros_per_m
    )
    return CutCharge(input_tokens, output_tokens, min(exact, job.hold_micros), ceil_micros(cost))
