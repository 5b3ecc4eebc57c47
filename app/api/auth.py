"""Bearer-key authentication and the per-account rate limit for /v1 routes."""

from __future__ import annotations

import time

from flask import current_app, g, request

from app.accounts import Principal, authenticate_digest, hash_key, key_prefix
from app.api.session import db
from app.exceptions import FlopexError
from app.ratelimit import RateLimiter
from app.redis_client import get_redis
from config.settings import get_settings


class RateLimited(FlopexError):
    def __init__(self, retry_after_s: int, what: str = "Too many requests") -> None:
        super().__init__("rate_limited", f"{what}; retry after {retry_after_s} s.")
        self.retry_after_s = retry_after_s


class PrincipalCache:
    """Seconds of memory for key lookups (FLOPEX_AUTH_CACHE_S; 0 disables): the lookup is a
    query on every request. Keyed by the key's hash, never the key. A revoked key, or a changed
    rate limit, takes effect within the TTL.

    Failed lookups are counted per client address (FLOPEX_AUTH_FAILURES_PER_MIN, 0 disables):
    past that many in a burst, an address's further failures answer 429 with Retry-After
    instead of 401, so a client that keeps guessing (or a service stuck on a revoked key) is
    told to back off. A valid key is never refused by it: the key is looked up first, and only
    a failure is counted and judged (one atomic step in Redis), so customers behind the same
    NAT or proxy as a guesser are not locked out. IPv6 addresses count per /64, what one host
    usually has to itself."""

    def __init__(self, ttl_s: float, failures_per_min: int = 0) -> None:
        self.ttl_s = ttl_s
        self.failures_per_min = failures_per_min
        self._entries: dict[str, tuple[float, Principal]] = {}

    def get(self, raw_key: str, client: str | None = None) -> Principal | None:
        return self.get_digest(key_prefix(raw_key), hash_key(raw_key), client)

    def get_digest(self, prefix: str, digest: str, client: str | None = None) -> Principal | None:
        """The lookup by the key's prefix and hash (a console session keeps those, not the key)."""
        now = time.monotonic()
        if self.ttl_s > 0:
            hit = self._entries.get(digest)
            if hit is not None and hit[0] > now:
                return hit[1]
        principal = authenticate_digest(db(), prefix, digest)
        if principal is None:
            if self.failures_per_min > 0 and client is not None:
                verdict = RateLimiter(get_redis()).record_auth_failure(
                    client, self.failures_per_min
                )
                if not verdict.allowed:
                    raise RateLimited(
                        max(1, -(-verdict.retry_after_ms // 1000)),
                        "Too many requests with invalid API keys from your address",
                    )
            return None
        if self.ttl_s > 0:  # failures are not cached: a new key works at once
            if len(self._entries) > 10_000:
                self._entries.clear()
            self._entries[digest] = (now + self.ttl_s, principal)
        return principal

    def forget(self, digest: str) -> None:
        """Drops a revoked key from this process's memory (other processes: within the TTL)."""
        self._entries.pop(digest, None)


def require_principal() -> Principal:
    """Authenticates once per request (cached on ``g``)."""
    principal: Principal | None = g.get("principal")
    if principal is not None:
        return principal
    header = request.headers.get("Authorization", "")
    scheme, _, raw = header.partition(" ")
    raw = raw.strip()
    if scheme.lower() != "bearer" or not raw:
        raise FlopexError("invalid_api_key", "Send your API key as 'Authorization: Bearer <key>'.")
    principal = current_app.extensions["flopex_principals"].get(raw, request.remote_addr)
    if principal is None:
        raise FlopexError("invalid_api_key", "The API key is invalid or revoked.")
    g.principal = principal
    return principal


def authenticate_and_limit() -> None:
    """before_request of every /v1 blueprint: who is calling, and may they call now."""
    enforce_rate_limit(require_principal())


def enforce_rate_limit(principal: Principal) -> None:
    """The account's request rate limit (the API's and the console playground's)."""
    settings = get_settings()
    # An account's own limit wins, zero included (zero: no requests at all). An account that
    # sets only its rate gets a burst of at most one minute of it, not the deployment's burst.
    own_rate = principal.rate_limit_per_min
    per_min = settings.rate_limit_per_min if own_rate is None else own_rate
    if principal.rate_limit_burst is not None:
        burst = principal.rate_limit_burst
    elif own_rate is not None:
        burst = min(settings.rate_limit_burst, max(per_min, 1))
    else:
        burst = settings.rate_limit_burst
    verdict = RateLimiter(get_redis()).hit(principal.account_id, per_min, burst)
    if not verdict.allowed:
        raise RateLimited(max(1, -(-verdict.retry_after_ms // 1000)))
