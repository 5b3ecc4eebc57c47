"""app/jobs/execution.py: routing works from the catalog as it is now, not as it was when the
job was accepted."""

from __future__ import annotations

import dataclasses

from sqlalchemy import update

from app import accounts
from app.db import session_scope
from app.jobs.execution import RouteAndExecute
from app.jobs.submit import InferenceRequest, SubmitInference
from app.models import Job, Provider
from config.settings import get_settings
from tests.conftest import chat_calls

REQUEST = InferenceRequest(
    model="llama-3.1-8b", prompt="Route me.", max_output_tokens=16, performance_profile="economy"
)


def _accept(account, settings):  # type: ignore[no-untyped-def]
    """A job accepted by the web (its row and hold), not sent to any worker."""
    with session_scope() as session:
        principal = accounts.authenticate(session, account.api_key)
        return SubmitInference(session, principal, REQUEST, settings).run().job.id


def _switch_alpha(enabled: bool) -> None:
    with session_scope() as session:
        session.execute(update(Provider).where(Provider.name == "alpha").values(enabled=enabled))


def test_a_provider_disabled_after_acceptance_gets_no_more_work(
    pipeline, make_account, redis_client, celery_app
):
    settings = dataclasses.replace(get_settings(), catalog_cache_s=0)
    job_id = _accept(make_account(), settings)
    before = chat_calls(pipeline)
    try:
        _switch_alpha(False)  # a catalog load switched the cheapest provider off
        with session_scope() as session:
            outcome = RouteAndExecute(session, redis_client, settings, celery_app).run(job_id)
        assert outcome is not None and outcome.status == "success"
    finally:
        _switch_alpha(True)
    with session_scope() as session:
        job = session.get(Job, job_id)
        assert job.provider_name != "alpha"
        assert {"provider": "alpha", "reason": "provider_disabled"} in job.routing["dropped"]
        assert "alpha" not in {q["provider"] for q in job.quotes}
    assert chat_calls(pipeline)["alpha"] == before["alpha"]


def test_an_offering_newer_than_the_workers_catalog_memory_is_not_withdrawn(
    pipeline, make_account, redis_client, celery_app
):
    """The web may accept a job with an offering the worker's cached catalog does not know yet
    (a load a moment ago): the worker reads the catalog again before withdrawing anything."""
    from app.jobs.execution import _catalog

    settings = dataclasses.replace(get_settings(), catalog_cache_s=600)
    try:
        _switch_alpha(False)  # the worker remembers a catalog without alpha
        with session_scope() as session:
            _catalog(settings).refresh(session, REQUEST.model)
    finally:
        _switch_alpha(True)  # alpha is added back; the web sees it at once
    job_id = _accept(make_account(), settings)
    with session_scope() as session:
        outcome = RouteAndExecute(session, redis_client, settings, celery_app).run(job_id)
    assert outcome is not None and outcome.status == "success"
    with session_scope() as session:
        job = session.get(Job, job_id)
        assert job.provider_name == "alpha"  # the cheapest, not withdrawn
        assert all(d["reason"] != "provider_disabled" for d in job.routing["dropped"])


def test_a_latency_refusal_says_when_faster_quotes_were_over_the_price_limit():
    """Both limits set, the fast provider too dear: the 422 must not read as if the latency
    limit alone could not be met."""
    from types import SimpleNamespace

    from app.jobs.execution import _no_route_message
    from app.routing import Decision

    job = SimpleNamespace(max_latency_ms=10, max_price_micros=100)
    priced_out = Decision(
        dropped=[
            {"provider": "bravo", "reason": "over_max_price"},
            {"provider": "alpha", "reason": "over_max_latency"},
        ],
        error_code="max_latency_exceeded",
    )
    assert _no_route_message(priced_out, job) == (
        "No live quote's estimated latency is within max_latency_ms (10 ms) among the quotes "
        "within max_price_usd ($0.000100); over that price: bravo."
    )
    slow_only = Decision(
        dropped=[{"provider": "alpha", "reason": "over_max_latency"}],
        error_code="max_latency_exceeded",
    )
    assert _no_route_message(slow_only, job) == (
        "No live quote's estimated latency is within max_latency_ms (10 ms)."
    )
