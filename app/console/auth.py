"""The console's session: signing in with an API key keeps the key's prefix and SHA-256 (never
the key) in a signed, HttpOnly, SameSite cookie. Every request looks the key up again through
the API's cached key lookup, so a revoked key ends its sessions within FLOPEX_AUTH_CACHE_S."""

from __future__ import annotations

from flask import current_app, g, session

from app.accounts import Principal, hash_key, key_prefix
from app.api.auth import PrincipalCache

SESSION_KEY = "key"


def _cache() -> PrincipalCache:
    cache: PrincipalCache = current_app.extensions["flopex_principals"]
    return cache


def sign_in(raw_key: str, client: str | None) -> Principal | None:
    """Checks the key (failures count toward the address's failed-key guard, as the API's do);
    on success starts a new session for it."""
    principal = _cache().get(raw_key, client)
    if principal is None:
        return None
    session.clear()
    session[SESSION_KEY] = {"prefix": key_prefix(raw_key), "digest": hash_key(raw_key)}
    session.permanent = True
    return principal


def current_principal() -> Principal | None:
    """The signed-in account, checked on every request; a session whose key was revoked is
    cleared."""
    principal: Principal | None = g.get("console_principal")
    if principal is not None:
        return principal
    stored = session.get(SESSION_KEY)
    if not isinstance(stored, dict):
        return None
    principal = _cache().get_digest(str(stored.get("prefix")), str(stored.get("digest")))
    if principal is None:
        session.clear()
        return None
    g.console_principal = principal
    return principal


def session_digest() -> str | None:
    stored = session.get(SESSION_KEY)
    return str(stored.get("digest")) if isinstance(stored, dict) else None


def forget_key(digest: str) -> None:
    _cache().forget(digest)


def sign_out() -> None:
    session.clear()
