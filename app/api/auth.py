"""Bearer-key authentication for /v1 routes."""

from __future__ import annotations

from flask import g, request

from app.accounts import Principal, authenticate
from app.api.session import db
from app.exceptions import FlopexError


def require_principal() -> Principal:
    header = request.headers.get("Authorization", "")
    scheme, _, raw = header.partition(" ")
    raw = raw.strip()
    if scheme.lower() != "bearer" or not raw:
        raise FlopexError("invalid_api_key", "Send your API key as 'Authorization: Bearer <key>'.")
    principal = authenticate(db(), raw)
    if principal is None:
        raise FlopexError("invalid_api_key", "The API key is invalid or revoked.")
    g.principal = principal
    return principal
