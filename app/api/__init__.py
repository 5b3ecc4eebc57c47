"""HTTP layer: parse, authenticate, call a service, render. No business rules here."""

from __future__ import annotations

from flask import Flask
from flask_smorest import Api

from app.api import errors
from app.api.auth import PrincipalCache
from app.api.catalog import blp as catalog_blp
from app.api.chat import blp as chat_blp
from app.api.health import blp as health_blp
from app.api.inference import blp as inference_blp
from app.api.inference import document_streaming
from app.api.observability import init_observability
from app.api.schemas import ApiErrorSchema, number_or_string_property
from app.api.session import init_session
from app.api.wallet import blp as wallet_blp
from app.catalog import ModelCache
from config.settings import get_settings


class FlopexApi(Api):
    # Every documented operation's `default` response is our one error shape.
    ERROR_SCHEMA = ApiErrorSchema


def register_api(app: Flask) -> Api:
    api = FlopexApi(app)
    # Before any blueprint: its schemas are converted to the OpenAPI document as it registers.
    api.ma_plugin.converter.add_attribute_function(number_or_string_property)
    api.spec.components.security_scheme(
        "bearerAuth", {"type": "http", "scheme": "bearer", "description": "Flopex API key"}
    )
    api.register_blueprint(health_blp)
    api.register_blueprint(inference_blp)
    api.register_blueprint(chat_blp)
    document_streaming(api.spec)
    api.register_blueprint(wallet_blp)
    api.register_blueprint(catalog_blp)
    _state_the_prompt_rule(api)
    init_session(app)
    init_observability(app)
    errors.register(app)
    app.extensions["flopex_api"] = api
    settings = get_settings()
    app.extensions["flopex_models"] = ModelCache(settings.catalog_cache_s)
    app.extensions["flopex_principals"] = PrincipalCache(
        settings.auth_cache_s, settings.auth_failures_per_min
    )
    return api


def _state_the_prompt_rule(api: Api) -> None:
    """The OpenAPI document says what the server enforces of `input` and `prompt`, which no one
    field can: at least one of them is a non-empty string, and not both are (docs/api.md: two
    different prompts are refused; the same text twice is accepted)."""
    schema = api.spec.components.schemas.get("InferenceRequest")
    if schema is None:
        return
    schema["anyOf"] = [
        {"required": [name], "properties": {name: {"type": "string", "minLength": 1}}}
        for name in ("input", "prompt")
    ]
    schema["not"] = {
        "required": ["input", "prompt"],
        "properties": {
            "input": {"type": "string", "minLength": 1},
            "prompt": {"type": "string", "minLength": 1},
        },
    }
