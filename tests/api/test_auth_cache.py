"""The per-process key lookup cache: a hit within its TTL, a fresh lookup after it, and failed
lookups never cached."""

from __future__ import annotations

from app.accounts import key_prefix, revoke_key
from app.api import auth
from app.api.auth import PrincipalCache
from app.db import session_scope


def test_cached_within_ttl_and_revocation_seen_after_it(flask_app, make_account, monkeypatch):
    account = make_account()
    clock = [1000.0]
    monkeypatch.setattr(auth.time, "monotonic", lambda: clock[0])
    cache = PrincipalCache(ttl_s=2)
    with flask_app.app_context():
        first = cache.get(account.api_key)
        assert first is not None and first.account_id == account.account_id
        with session_scope() as session:
            revoke_key(session, key_prefix(account.api_key))
        clock[0] += 1
        assert cache.get(account.api_key) == first  # within the TTL
        clock[0] += 2
        assert cache.get(account.api_key) is None  # the revocation is seen


def test_failed_lookups_are_not_cached(flask_app, make_account):
    cache = PrincipalCache(ttl_s=60)
    with flask_app.app_context():
        assert cache.get("fpx_unknown0_aaaaaaaaaaaaaaaaaaaaaaaa") is None
        assert cache._entries == {}
        assert cache.get(make_account().api_key) is not None
        assert len(cache._entries) == 1
        assert not any("fpx_" in digest for digest in cache._entries)  # hashes, never keys
