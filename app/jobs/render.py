"""The public shape of a job. Documented fields are never renamed; ``provider`` and ``routing``
are the extra keys the contract allows."""

from __future__ import annotations

from typing import Any

from app.exceptions import error_body, status_for
from app.jobs import states
from app.models import Job, iso_utc
from app.money import blended_rate_usd_per_million, display_usd, micros_to_usd


def render_success(job: Job) -> dict[str, Any]:
    input_tokens = job.input_tokens or 0
    output_tokens = job.output_tokens or 0
    total = input_tokens + output_tokens
    charge = job.charge_micros or 0
    return {
        "id": str(job.id),
        "object": "inference",
        "model": job.model,
        "output_text": job.output_text,
        "status": states.PUBLIC[job.status],
        "usage": {
            "input_tokens": input_tokens,
            "output_tokens": output_tokens,
            "total_tokens": total,
        },
        "performance": {"latency_ms": job.latency_ms},
        "billing": {
            "cost_usd": micros_to_usd(charge),
            "cost_display": display_usd(charge),
            "input_tokens": input_tokens,
            "output_tokens": output_tokens,
            "total_tokens": total,
            "cost_per_million_tokens_usd": blended_rate_usd_per_million(charge, total),
            "balance_remaining_usd": micros_to_usd(job.balance_after_micros or 0),
        },
        "customer_ref": job.customer_ref,
        "metadata": job.metadata_,
        "created_at": iso_utc(job.created_at),
        "provider": job.provider_name,
        "routing": routing_summary(job),
    }


def routing_summary(job: Job) -> dict[str, Any]:
    """Why this route: the decision and every quote considered, enough to replay it."""
    quotes = [
        {
            "provider": q.get("provider"),
            "live": q.get("live"),
            "estimated_latency_ms": q.get("estimated_latency_ms"),
            "estimated_charge_usd": micros_to_usd(q["estimated_charge_micros"]),
            "success_rate": q.get("success_rate"),
        }
        for q in (job.quotes or [])
        if "live" in q
    ]
    routing = job.routing or {}
    return {
        "performance_profile": job.performance_profile,
        "routing_strategy": job.routing_strategy,
        "winner": routing.get("winner"),
        "reason": routing.get("reason"),
        "dropped": routing.get("dropped", []),
        "quotes": quotes,
        "attempts": [
            {k: a.get(k) for k in ("provider", "outcome", "failure", "latency_ms") if k in a}
            for a in (job.attempts or [])
        ],
    }


def _error(job: Job) -> dict[str, Any]:
    if job.status == states.CANCELLED:
        code, message = "job_cancelled", "The job was cancelled before it ran."
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


def render_job(job: Job) -> dict[str, Any]:
    """The job object of the async API: the synchronous body once it succeeded; otherwise its
    state (queued, running) or, once failed or cancelled, the error object."""
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
    return body
