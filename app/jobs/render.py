"""The public shape of a job. Documented fields are never renamed; ``provider`` and ``routing``
are the extra keys the contract allows."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from app.exceptions import error_body, status_for
from app.jobs import states
from app.models import Job, iso_utc
from app.money import blended_rate_usd_per_million, display_usd, micros_to_usd


def _usage(job: Job) -> dict[str, Any]:
    input_tokens = job.input_tokens or 0
    output_tokens = job.output_tokens or 0
    return {
        "input_tokens": input_tokens,
        "output_tokens": output_tokens,
        "total_tokens": input_tokens + output_tokens,
    }


def _billing(job: Job) -> dict[str, Any]:
    usage = _usage(job)
    charge = job.charge_micros or 0
    return {
        "cost_usd": micros_to_usd(charge),
        "cost_display": display_usd(charge),
        **usage,
        "cost_per_million_tokens_usd": blended_rate_usd_per_million(charge, usage["total_tokens"]),
        "balance_remaining_usd": micros_to_usd(job.balance_after_micros or 0),
    }


def render_success(job: Job) -> dict[str, Any]:
    return {
        "id": str(job.id),
        "object": "inference",
        "model": job.model,
        "output_text": job.output_text,
        "status": states.PUBLIC[job.status],
        "usage": _usage(job),
        "performance": {"latency_ms": job.latency_ms},
        "billing": _billing(job),
        "customer_ref": job.customer_ref,
        "metadata": job.metadata_,
        "created_at": iso_utc(job.created_at),
        # Every finished job carries it, as failed and cancelled ones always did (docs/api.md).
        "finished_at": iso_utc(job.finished_at),
        "provider": job.provider_name,
        "routing": routing_summary(job),
        # A chat completion answered with tool calls: what a poll of its job must show too.
        **({"tool_calls": job.tool_calls} if job.tool_calls else {}),
    }


def _decimal(value: Any) -> Decimal | None:
    """A decimal the job stores as a string (a success rate, a balanced score), written as an
    exact JSON number like every amount of the API: the stored digits, not a float's."""
    return None if value is None else Decimal(str(value))


def _attempt(stored: dict[str, Any]) -> dict[str, Any]:
    """One attempt in the public shape: ``outcome`` is ``success`` or ``failed``, and a failed
    one says its ``failure`` kind (connect, timeout, http, ...). The worker stores a failure
    as its kind alone; an attempt with neither in a finished job is one whose worker died
    mid-call, which the resume counted as ``interrupted``."""
    attempt: dict[str, Any] = {"provider": stored.get("provider")}
    if stored.get("outcome") == "success":
        attempt["outcome"] = "success"
    else:
        attempt["outcome"] = "failed"
        attempt["failure"] = stored.get("failure") or "interrupted"
    if "latency_ms" in stored:
        attempt["latency_ms"] = stored["latency_ms"]
    return attempt


def _story(
    decision: str | None, ranked_first: str | None, attempts: list[dict[str, Any]]
) -> str | None:
    """The stored reason explains the ranking; when execution did not simply run the first
    ranked provider, what happened next is appended, so the reason never names a provider
    that failed as the one that won."""
    if decision is None or not attempts:
        return decision
    if ranked_first is not None:
        # Rows written before the wording changed said "<first> won among ...".
        decision = decision.replace(
            f"{ranked_first} won among", f"{ranked_first} ranked first among"
        )
    if [(a["provider"], a["outcome"]) for a in attempts] == [(ranked_first, "success")]:
        return decision
    steps = [
        f"{a['provider']} served"
        if a["outcome"] == "success"
        else f"{a['provider']} failed ({a['failure']})"
        for a in attempts
    ]
    return f"{decision}; " + "; ".join(steps)


def _quote(q: dict[str, Any]) -> dict[str, Any]:
    """One quote as the trace shows it: with the estimate's components and the age of the
    board entry it came from (rows routed before the quote board have neither)."""
    shown: dict[str, Any] = {
        "provider": q.get("provider"),
        "live": q.get("live"),
        "estimated_latency_ms": q.get("estimated_latency_ms"),
        "estimated_charge_usd": micros_to_usd(q["estimated_charge_micros"]),
        # A number, as in GET /v1/providers (the job stores the decimal as a string).
        "success_rate": _decimal(q.get("success_rate")),
    }
    if q.get("speed_source") is not None:
        shown["estimated_latency"] = {
            "rtt_ms": q.get("rtt_ms"),
            "ttft_ms": q.get("ttft_ms"),
            "tokens_per_s": q.get("tokens_per_s"),
            "output_tokens": q.get("output_tokens"),
            "speed_source": q.get("speed_source"),
            "samples": q.get("samples"),
        }
    if q.get("checked_at") is not None:
        shown["checked_at"] = iso_utc(datetime.fromtimestamp(q["checked_at"], UTC))
        shown["age_ms"] = q.get("age_ms")
    if not q.get("live") and q.get("error"):
        shown["not_live_reason"] = q["error"]
    return shown


def routing_summary(job: Job) -> dict[str, Any]:
    """Why this route: the ranking, every quote considered and dropped, and what each attempt
    did; enough to replay the decision (docs/routing.md)."""
    quotes = [_quote(q) for q in (job.quotes or []) if "live" in q]
    routing = job.routing or {}
    order = [
        {"provider": r.get("provider"), **({"score": _decimal(r["score"])} if "score" in r else {})}
        for r in routing.get("order", [])
    ]
    # The stored decision's "winner" is the first ranked; older rows may lack the order.
    ranked_first = order[0]["provider"] if order else routing.get("winner")
    attempts = [_attempt(a) for a in (job.attempts or [])]
    # The winner is the provider that served, the response's `provider`; none when no
    # candidate did. Who ranked first stays visible as ranked_first and order[0].
    served = job.provider_name if job.status == states.SUCCESS else None
    return {
        "performance_profile": job.performance_profile,
        "routing_strategy": job.routing_strategy,
        "winner": served,
        "ranked_first": ranked_first,
        "reason": _story(routing.get("reason"), ranked_first, attempts),
        "order": order,
        "dropped": routing.get("dropped", []),
        "quotes": quotes,
        "attempts": attempts,
    }


def _error(job: Job) -> dict[str, Any]:
    if job.status == states.CANCELLED:
        # A stream stopped because its client left says so (app/jobs/streaming.py).
        code = "job_cancelled"
        message = job.error_message or "The job was cancelled before it ran."
    else:
        code, message = job.error_code or "internal_error", job.error_message or ""
    body = error_body(code, message or code, job.error_param)
    body["job_id"] = str(job.id)
    return body


def render_failure(job: Job) -> tuple[dict[str, Any], int]:
    """A failed job as the synchronous call answers it: the error shape and its status."""
    body = _error(job)
    return {"error": body}, status_for(body["code"])


def render_final(job: Job) -> tuple[dict[str, Any], int]:
    if job.status == states.SUCCESS:
        return render_success(job), 200
    return render_failure(job)


def render_job(job: Job, *, webhook: bool = True) -> dict[str, Any]:
    """The job object of the async API: the synchronous body once it succeeded; otherwise its
    state (queued, running) or, once failed or cancelled, the error object. A job submitted
    with a ``callback_url`` also shows how its webhook is doing (``webhook=False``: not in the
    webhook's own body, which is sent while it is still pending)."""
    body = _job_body(job)
    callback_url = (job.request or {}).get("callback_url")
    if webhook and callback_url:
        body["webhook"] = {"url": callback_url, "status": job.webhook_status or "pending"}
    return body


def _job_body(job: Job) -> dict[str, Any]:
    if job.status == states.SUCCESS:
        return render_success(job)
    body: dict[str, Any] = {
        "id": str(job.id),
        "object": "inference",
        "model": job.model,
        "status": states.PUBLIC[job.status],
        "customer_ref": job.customer_ref,
        "metadata": job.metadata_,
        "created_at": iso_utc(job.created_at),
    }
    if job.status in (states.FAILED, states.CANCELLED):
        body["error"] = _error(job)
        body["finished_at"] = iso_utc(job.finished_at)
        if job.quotes and "live" in job.quotes[0]:
            body["routing"] = routing_summary(job)
        body.update(_cut_stream(job))
    return body


def _cut_stream(job: Job) -> dict[str, Any]:
    """A stream cut after its first token (the provider failed, or the client left) was charged
    for what was generated (docs/billing.md): its failed or cancelled job shows that text, the
    usage and the billing."""
    if job.charge_micros is None:
        return {}
    return {
        "output_text": job.output_text,
        "usage": _usage(job),
        "billing": _billing(job),
        "provider": job.provider_name,
    }


def terminal_event(job: Job) -> tuple[str, dict[str, Any]]:
    """A finished job as its stream's last event (app/jobs/events.py): ``completed`` with the
    response object and the provider's ``finish_reason``, or ``failed`` with the error object
    (and, for a cut stream, what it was charged)."""
    if job.status == states.SUCCESS:
        return "completed", {**render_success(job), "finish_reason": job.finish_reason}
    body: dict[str, Any] = {"error": _error(job), "status": states.PUBLIC[job.status]}
    body.update(_cut_stream(job))
    return "failed", body
