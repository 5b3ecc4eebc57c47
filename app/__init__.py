"""Flopex: the inference exchange. ``create_app()`` is the application factory."""

from __future__ import annotations

import os
from typing import Any

from flask import Flask

from config.settings import get_settings


def create_app(overrides: dict[str, Any] | None = None) -> Flask:
    from app.api import register_api
    from app.extensions import celery_init_app
    from app.json import FlopexJSONProvider

    settings = get_settings()
    app = Flask(__name__)
    app.json_provider_class = FlopexJSONProvider
    app.json = FlopexJSONProvider(app)
    app.config.update(
        MAX_CONTENT_LENGTH=settings.max_body_bytes,
        API_TITLE="Flopex Inference Exchange",
        API_VERSION="v1",
        OPENAPI_VERSION="3.0.3",
        OPENAPI_URL_PREFIX="/",
        OPENAPI_JSON_PATH="openapi.json",
        OPENAPI_REDOC_PATH="/docs",
        OPENAPI_REDOC_URL="https://cdn.jsdelivr.net/npm/redoc@2/bundles/redoc.standalone.js",
    )
    if overrides:
        app.config.update(overrides)
    if not app.testing:
        from app.logs import configure_logging

        configure_logging(os.environ.get("LOG_LEVEL", "INFO"))
    celery_init_app(app)
    register_api(app)
    return app
