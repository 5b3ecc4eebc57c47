"""Flopex: the inference exchange. ``create_app()`` is the application factory."""

from __future__ import annotations

import logging
from typing import Any

from flask import Flask

from config.settings import DEV_WEBHOOK_SECRET, get_settings


def create_app(overrides: dict[str, Any] | None = None) -> Flask:
    from app.api import register_api
    from app.console import init_console
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
        API_SPEC_OPTIONS={"info": {"description": _spec_description()}},
    )
    if overrides:
        app.config.update(overrides)
    if not app.testing:
        from app.logs import configure_logging

        configure_logging(settings.log_level)
        # Compared with the effective secret, not the environment: an empty value falls back to
        # the development secret too (config/settings.py:_env), and so does one copied from it.
        if settings.webhook_secret == DEV_WEBHOOK_SECRET:
            logging.getLogger(__name__).warning(
                "FLOPEX_WEBHOOK_SECRET is unset, empty or the development default: webhooks are "
                "signed with a development secret anyone can read; set it in production"
            )
    if settings.trusted_proxy_hops:
        from werkzeug.middleware.proxy_fix import ProxyFix

        # The client's address (the failed-key guard, the access log) is the one the trusted
        # proxies saw, not the proxy's own: X-Forwarded-For, read that many hops from the end.
        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=settings.trusted_proxy_hops)  # type: ignore[method-assign]
    celery_init_app(app)
    register_api(app)
    init_console(app)
    return app


def _spec_description() -> str:
    from app.exceptions import ERROR_CODES

    rows = "\n".join(
        f"| {status} | `{code}` | `{kind}` |"
        for code, (status, kind) in sorted(
            ERROR_CODES.items(), key=lambda item: (item[1][0], item[0])
        )
    )
    return (
        "Flopex routes each inference request to the provider that wins the live quotes for your "
        "performance profile and charges your prepaid wallet exactly.\n\n"
        "Authenticate with `Authorization: Bearer <key>`. Every response carries `X-Request-ID` "
        "(send your own to correlate). Rate-limited requests get 429 with `Retry-After`.\n\n"
        'Every error is `{"error": {"type", "code", "message", "param"}}`; one about a job '
        "that exists (its failure, a refused cancellation) also carries `job_id`:\n\n"
        "| status | code | type |\n|---|---|---|\n" + rows
    )
