"""app/jobs/dispatch.py and app/broker.py: the quote messages as they land in the real broker."""

from __future__ import annotations

import base64
import json
import time
import uuid
from types import SimpleNamespace
from typing import Any

import pytest

from app.broker import PUBLISH_ERRORS, Channel
from app.jobs.dispatch import send_quotes
from app.logs import HEADER_JOB_ID
from tests.factories import route_option


def _option(provider: str) -> dict[str, Any]:
    # A job's stored option carries more than the quote message needs.
    return {**route_option(provider), "ignored": "not sent"}


def test_one_quote_message_per_provider_with_a_short_argsrepr(celery_app, redis_client):
    # A queue of its own, so that no worker of the test session consumes the messages.
    queue = f"dispatch-test-{uuid.uuid4().hex}"
    job = SimpleNamespace(id=uuid.uuid4(), quotes=[_option("p1"), _option("p2"), _option("p3")])
    deadline = time.time() + 5
    try:
        send_quotes(celery_app, job, deadline, queue)
        raw = redis_client.lrange(queue, 0, -1)
    finally:
        redis_client.delete(queue)

    assert len(raw) == 3
    messages = [json.loads(m) for m in raw]
    providers = []
    for message in messages:
        headers = message["headers"]
        assert headers["task"] == "flopex.quote"
        args, kwargs, _ = json.loads(base64.b64decode(message["body"]))
        job_id, option, deadline_at, expected = args
        assert job_id == str(job.id) and expected == 3 and deadline_at == deadline and not kwargs
        assert "ignored" not in option and option["base_url"].startswith("http://")
        assert headers["argsrepr"] == f"[{str(job.id)!r}, {option['provider']!r}]"
        assert headers[HEADER_JOB_ID] == str(job.id)
        providers.append(option["provider"])
    assert sorted(providers) == ["p1", "p2", "p3"]


def test_a_dead_broker_raises_a_publish_error(celery_app):
    from app.celery_app import make_celery

    dead = make_celery()
    dead.conf.broker_url = "redis://127.0.0.1:1/0"
    dead.conf.broker_transport_options = {
        **dead.conf.broker_transport_options,
        "max_retries": 0,
    }
    job = SimpleNamespace(id=uuid.uuid4(), quotes=[_option("p1")])
    with pytest.raises(PUBLISH_ERRORS):
        send_quotes(dead, job, time.time() + 5, "balanced")


def test_the_channel_keeps_one_client_for_its_commands(celery_app):
    with celery_app.connection_for_write() as conn:
        channel = conn.default_channel
        assert isinstance(channel, Channel)
        assert channel._create_client() is channel._create_client()
        # The event loop's client (BRPOP) stays the stock, separate one.
        assert channel._create_client(asynchronous=True) is not channel._create_client()


def test_the_cached_client_goes_with_the_pools_after_a_fork(celery_app):
    with celery_app.connection_for_write() as conn:
        channel = conn.default_channel
        before = channel._create_client()
        channel._after_fork()  # what kombu runs in a forked child
        after = channel._create_client()
        assert after is not before
        assert after.connection_pool is channel.pool
