"""Celery entry point named by the Procfile: ``celery -A workers.main worker``."""

from app import create_app
from workers import signals  # noqa: F401  (registers the worker hooks)

flask_app = create_app()
celery = flask_app.extensions["celery"]
