"""The Celery application, configured from settings. The web process uses it only to send tasks
by name; tasks/ never imports the web app."""

from __future__ import annotations

from celery import Celery
from kombu import Queue

from app import broker, task_names
from app.redis_client import is_redis_url
from config.settings import Settings, get_settings

# Strict order: a worker always takes `fast` work before `balanced`, and `balanced` before
# `economy` (kombu's Redis transport polls queues in this order with the "priority" strategy).
QUEUES = ("fast", "balanced", "economy")


def make_celery(settings: Settings | None = None) -> Celery:
    settings = settings or get_settings()
    celery = Celery("flopex")
    celery.conf.update(
        broker_url=settings.broker_url,
        # kombu's Redis transport with one client per channel (app/broker.py); any other broker
        # URL keeps the transport its scheme names.
        broker_transport=broker.TRANSPORT if is_redis_url(settings.broker_url) else None,
        # PostgreSQL holds every result.
        result_backend=None,
        task_ignore_result=True,
        task_serializer="json",
        accept_content=["json"],
        task_queues=[Queue(q) for q in QUEUES],
        task_default_queue="balanced",
        # At-least-once: a task is acknowledged after it ran, and redelivered if its worker dies.
        # Every task is idempotent (conditional UPDATEs on the job), so a redelivery is harmless.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=4,
        broker_connection_retry_on_startup=True,
        broker_transport_options={
            "queue_order_strategy": "priority",
            "visibility_timeout": 3600,
        },
        worker_hijack_root_logger=False,
        include=["tasks.inference", "tasks.maintenance", "tasks.webhooks"],
        beat_schedule={
            "sweep-stuck-jobs": {
                "task": task_names.SWEEP,
                "schedule": settings.sweep_interval_s,
                "options": {"queue": "fast", "expires": settings.sweep_interval_s},
            },
            # The quote board's clock (app/providers/board.py).
            "refresh-quote-board": {
                "task": task_names.REFRESH_BOARD,
                "schedule": settings.quote_refresh_s,
                "options": {"queue": "fast", "expires": settings.quote_refresh_s},
            },
            "purge-idempotency-keys": {
                "task": task_names.PURGE_IDEMPOTENCY,
                "schedule": 600.0,
                "options": {"queue": "economy", "expires": 600},
            },
        },
    )
    return celery
