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


def test_a_provider_disabled_after_acceptance_gets_no_more_work(
    pipeline, make_account, redis_client
):
    settings = dataclasses.replace(get_settings(), catalog_cache_s=0)
    account = make_account()
    request = InferenceRequest(
        model="llama-3.1-8b",
        prompt="Route me.",
        max_output_tokens=16,
        performance_profile="economy",
    )
    with session_scope() as session:
        principal = accounts.authenticate(session, account.api_key)
        job_id = SubmitInference(session, principal, request, settings).run().job.id  # queued
    before = chat_calls(pipeline)
    try:
        with session_scope() as session:  # a catalog load switched the cheapest provider off
            session.execute(update(Provider).where(Provider.name == "alpha").values(enabled=False))
        with session_scope() as session:
            outcome = RouteAndExecute(session, redis_client, settings).run(job_id)
        assert outcome is not None and outcome.status == "success"
    finally:
        with session_scope() as session:
            session.execute(update(Provider).where(Provider.name == "alpha").values(enabled=True))
    with session_scope() as session:
        job = session.get(Job, job_id)
        assert job.provider_name != "alpha"
        assert {"provider": "alpha", "reason": "provider_disabled"} in job.routing["dropped"]
        assert "alpha" not in {q["provider"] for q in job.quotes}
    assert chat_calls(pipeline)["alpha"] == before["alpha"]
