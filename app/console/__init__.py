"""The customer console at /console: server-rendered pages (Flask + Jinja, SVG charts drawn on
the server, no script needed) over the same domain commands and queries as the API
(docs/console.md)."""

from __future__ import annotations

import hashlib
import hmac
from datetime import timedelta

from flask import Flask
from flask_wtf.csrf import CSRFProtect

from config.settings import get_settings

csrf = CSRFProtect()


def init_console(app: Flask) -> None:
    from app.console.views import blp

    settings = get_settings()
    secret = (
        settings.console_secret
        or hmac.new(
            settings.webhook_secret.encode(), b"flopex console session", hashlib.sha256
        ).hexdigest()
    )
    if not app.config.get("SECRET_KEY"):
        app.config["SECRET_KEY"] = secret
    app.config.update(
        SESSION_COOKIE_NAME="flopex_console",
        SESSION_COOKIE_HTTPONLY=True,
        SESSION_COOKIE_SAMESITE="Lax",
        SESSION_COOKIE_SECURE=settings.console_cookie_secure,
        SESSION_COOKIE_PATH="/console",
        PERMANENT_SESSION_LIFETIME=timedelta(hours=12),
        # Checked by the console's own before_request, not on every view of the app: the API
        # authenticates with a bearer key, which a browser never sends on its own.
        WTF_CSRF_CHECK_DEFAULT=False,
        WTF_CSRF_TIME_LIMIT=None,  # the token lives as long as the session
    )
    csrf.init_app(app)
    app.register_blueprint(blp)
