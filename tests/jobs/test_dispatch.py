"""app/jobs/dispatch.py and app/broker.py: the job's message as it lands in the real broker."""

from __future__ import annotations

import base64
import json
import uuid
from types import SimpleNamespace
from typing import Any

import pytest

from app.broker import PUBLISH_ERRORS, Channel
from app.jobs.dispatch import send_route
from app.logs import HEADER_JOB_ID
from tests.factories import route_option


def _option(provider: str) -> dict[str, Any]:
    # A job's stored option carries more than the message needs.
    return {**route_option(provider), "ignored": "not sent"}


def test_one_message_per_job_with_a_short_argsrepr(celery_app, redis_client):
    """The one hop: the job's id, one message, whatever the number of providers."""
    # A queue of its own, so that no worker of the test session consumes the messages.
    queue = f"dispatch-test-{uuid.uuid4().hex}"
    job = SimpleNamespace(id=uuid.uuid4(), quotes=[_option("p1"), _option("p2"), _option("p3")])
    try:
        send_route(celery_app, job, queue)
        raw = redis_client.lrange(queue, 0, -1)
    finally:
        redis_client.delete(queue)

    assert len(raw) == 1
    message = json.loads(raw[0])
    headers = message["headers"]
    assert headers["task"] == "flopex.route"
    args, kwargs, _ = json.loads(base64.b64decode(message["body"]))
    assert args == [str(job.id)] and not kwargs
    assert headers["argsrepr"] == f"[{str(job.id)!r}]"
    assert headers[HEADER_JOB_ID] == str(job.id)


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
        send_route(dead, job, "balanced")


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
