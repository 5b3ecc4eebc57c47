"""Where the time of each request went, from the client's clock and the job row's timestamps.

All timestamps come from the same machine's wall clock (the load generator's ``time.time()``,
the web's and the worker's ``datetime.now(UTC)``), so they can be subtracted:

| stage | from | to |
|---|---|---|
| submit | client sends | job row flushed (``created_at``: auth, validation, hold) |
| quote | ``created_at`` | route task claims the job (``started_at``): commit, enqueue, quote tasks, join |
| route | ``started_at`` | winning attempt's ``started_at``: collect quotes, select, commit |
| provider | | winning attempt's ``latency_ms`` as the worker measured ``complete()`` |
| settle | attempt end | ``finished_at``: record result, commit, settle wallet |
| respond | ``finished_at`` | client has the whole answer: commit, signal, wake, read, render |
"""

from __future__ import annotations

import contextlib
import uuid
from datetime import datetime
from typing import Any

from bench.load import Sample, parse_json, summary, winning_attempt

STAGES = ("submit", "quote", "route", "provider", "settle", "respond")


def job_rows(ids: list[uuid.UUID]) -> dict[uuid.UUID, dict[str, Any]]:
    from sqlalchemy import select

    from app.db import session_scope
    from app.models import Job

    rows: dict[uuid.UUID, dict[str, Any]] = {}
    with session_scope() as session:
        for i in range(0, len(ids), 1000):
            chunk = ids[i : i + 1000]
            for row in session.execute(
                select(
                    Job.id,
                    Job.status,
                    Job.created_at,
                    Job.started_at,
                    Job.finished_at,
                    Job.attempts,
                    Job.quotes,
                ).where(Job.id.in_(chunk))
            ):
                rows[row.id] = row._asdict()
    return rows


def _ts(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    return value.timestamp()


def stages(sample: Sample, row: dict[str, Any]) -> dict[str, float] | None:
    created, started, finished = (
        _ts(row.get(k)) for k in ("created_at", "started_at", "finished_at")
    )
    winner = next((a for a in row.get("attempts") or [] if a.get("outcome") == "success"), None)
    if None in (created, started, finished) or winner is None:
        return None
    assert created is not None and started is not None and finished is not None
    attempt_start = _ts(winner.get("started_at"))
    provider_ms = float(winner.get("latency_ms") or 0)
    if attempt_start is None:
        return None
    attempt_end = attempt_start + provider_ms / 1000
    received = sample.sent_at + sample.e2e_ms / 1000
    return {
        "submit": (created - sample.sent_at) * 1000,
        "quote": (started - created) * 1000,
        "route": (attempt_start - started) * 1000,
        "provider": provider_ms,
        "settle": (finished - attempt_end) * 1000,
        "respond": (received - finished) * 1000,
    }


def slowest_quote_ms(row: dict[str, Any], fanout_ms: float | None = None) -> float | None:
    """The slowest provider round trip the job waited for before routing. Rows quoted from the
    board carry each entry's age at routing: an entry older than the job's own fan-out was
    measured before the job existed (no ping on its path: 0); one refreshed for the job counts
    its round trip. Older rows: the live quotes' ping latencies."""
    quotes = row.get("quotes") or []
    if quotes and "age_ms" in quotes[0]:
        waited = [
            float(q["rtt_ms"])
            for q in quotes
            if q.get("rtt_ms") is not None
            and q.get("age_ms") is not None
            and fanout_ms is not None
            and q["age_ms"] <= fanout_ms
        ]
        return max(waited, default=0.0)
    latencies = [
        q.get("estimated_latency_ms")
        for q in quotes
        if q.get("live") and q.get("estimated_latency_ms") is not None
    ]
    return float(max(latencies)) if latencies else None


def analyse_sync(
    samples: list[Sample], service_times: dict[tuple[str, str], float]
) -> dict[str, Any]:
    """Latency, overhead and per-stage breakdown of the successful (200) answers."""
    e2e: list[float] = []
    overhead: list[float] = []
    overhead_worker: list[float] = []
    by_job: dict[uuid.UUID, Sample] = {}
    sources = {"sandbox": 0, "worker": 0}
    for s in samples:
        if s.status != 200:
            continue
        e2e.append(s.e2e_ms)
        job = parse_json(s.body) or {}
        attempt = winning_attempt(job)
        provider = job.get("provider")
        service = service_times.get((str(provider), s.tag))
        worker_ms = None
        if attempt is not None and attempt.get("latency_ms") is not None:
            worker_ms = s.e2e_ms - float(attempt["latency_ms"])
            overhead_worker.append(worker_ms)
        if service is not None:
            overhead.append(s.e2e_ms - service)
            sources["sandbox"] += 1
        elif worker_ms is not None:
            # No record from the sandbox (its hook could not be installed): the worker's timing.
            overhead.append(worker_ms)
            sources["worker"] += 1
        with contextlib.suppress(ValueError):
            by_job[uuid.UUID(str(job.get("id")))] = s
    rows = job_rows(list(by_job))
    per_stage: dict[str, list[float]] = {k: [] for k in STAGES}
    for job_id, s in by_job.items():
        row = rows.get(job_id)
        parts = stages(s, row) if row else None
        if parts:
            for k, v in parts.items():
                per_stage[k].append(v)
    return {
        "e2e_ms": summary(e2e),
        # e2e minus the sandbox's own X-Sandbox-Service-Ms for the winning chat completion
        # (overhead_source says how many answers fell back to the worker's timing).
        "overhead_ms": summary(overhead),
        "overhead_source": sources,
        # e2e minus the winning attempt's latency_ms as the worker timed complete() (whole ms).
        "overhead_vs_worker_ms": summary(overhead_worker),
        "stages_ms": {k: summary(v) for k, v in per_stage.items()},
    }
