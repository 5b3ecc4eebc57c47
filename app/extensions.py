"""Flask extensions, after Flask's examples/celery: the factory calls ``celery_init_app``."""

from __future__ import annotations

from celery import Celery
from flask import Flask

from app.infra.celery_app import make_celery


def celery_init_app(app: Flask) -> Celery:
    celery = make_celery()
    celery.set_default()
    app.extensions["celery"] = celery
    return celery
