"""The live quote board: what we last knew of each provider, in Redis, shared by every process.

One hash per provider (``flopex:board:{provider}``): ``live`` (1/0), ``rtt_ms`` (the last good
check's round trip), ``measured_at`` (Unix time of the last check or execution outcome),
``error`` (why not live), ``breaker`` (the breaker's state at that moment) and ``source``
(``check`` or ``execution``). Beat has every enabled provider checked every
``FLOPEX_QUOTE_REFRESH_S`` (``flopex.refresh_board`` fans out one ``flopex.check_provider`` per
provider), and execution outcomes update the entry at once: a failed or refused execution marks
the provider not live until its next good check, a served one confirms it live.

Routing reads the board; an entry older than the job's profile bound is refreshed first, with
one ping in flight per provider across every process (``refresh``: single flight through a
Redis lock; the others wait for its result on a per-flight list). Provider ping traffic is then
bounded by the refresh rate, whatever our request rate (docs/routing.md).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import redis
from redis.client import Pipeline
from redis.typing import EncodableT

from app.metrics import QUOTE_LATENCY
from app.providers import history
from app.providers.breaker import Breaker
from app.providers.openai_compat import ProviderFailure, ping, resolve_api_key

_TTL_S = 3600
# The longest Retry-After honoured (a provider asking for an hour is checked again sooner).
_MAX_HOLD_S = 300.0
# Takes the flight when nobody holds it; otherwise answers the holder's token (one round trip).
_ACQUIRE = """
local held = redis.call('GET', KEYS[1])
if held then return held end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return false
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


def _key(provider: str) -> str:
    return f"flopex:board:{provider}"


def _lock_key(provider: str) -> str:
    return f"flopex:board:flight:{provider}"


def _done_key(token: str) -> str:
    return f"flopex:board:landed:{token}"


@dataclass(frozen=True)
class Target:
    """A provider to check: its name and endpoint (as the job's options and the catalog hold)."""

    provider: str
    base_url: str
    api_key_env: str | None


@dataclass(frozen=True)
class Entry:
    provider: str
    live: bool
    rtt_ms: int | None
    measured_at: float
    error: str | None = None
    breaker: str = "closed"
    source: str = "check"

    def age_s(self, now: float) -> float:
        return max(0.0, now - self.measured_at)

    def mapping(self) -> dict[EncodableT, EncodableT]:
        return {
            "live": 1 if self.live else 0,
            "rtt_ms": "" if self.rtt_ms is None else self.rtt_ms,
            "measured_at": repr(self.measured_at),
            "error": self.error or "",
            "breaker": self.breaker,
            "source": self.source,
        }

    @classmethod
    def parse(cls, provider: str, raw: dict[str, str] | None) -> Entry | None:
        if not raw or "measured_at" not in raw:
            return None
        return cls(
            provider=provider,
            live=raw.get("live") == "1",
            rtt_ms=int(raw["rtt_ms"]) if raw.get("rtt_ms") else None,
            measured_at=float(raw["measured_at"]),
            error=raw.get("error") or None,
            breaker=raw.get("breaker") or "closed",
            source=raw.get("source") or "check",
        )


def _scripts(client: redis.Redis) -> tuple[Any, Any]:
    scripts = getattr(client, "_flopex_board_scripts", None)
    if scripts is None:
        scripts = (client.register_script(_ACQUIRE), client.register_script(_RELEASE))
        client._flopex_board_scripts = scripts  # type: ignore[attr-defined]
    return scripts


def write(client: redis.Redis | Pipeline, entry: Entry) -> None:
    client.hset(_key(entry.provider), mapping=entry.mapping())
    client.expire(_key(entry.provider), _TTL_S)


def queue_read(pipe: Pipeline, providers: Sequence[str]) -> Callable[[list[Any]], dict[str, Entry]]:
    """Adds the reads to ``pipe``; the returned function takes exactly these reads' results and
    gives the entries found."""
    for provider in providers:
        pipe.hgetall(_key(provider))

    def read(results: list[Any]) -> dict[str, Entry]:
        found = {}
        for provider, raw in zip(providers, results, strict=True):
            entry = Entry.parse(provider, raw)
            if entry is not None:
                found[provider] = entry
        return found

    return read


def read(client: redis.Redis, providers: Sequence[str]) -> dict[str, Entry]:
    pipe = client.pipeline(transaction=False)
    reader = queue_read(pipe, providers)
    return reader(pipe.execute())


def check(
    client: redis.Redis,
    breaker: Breaker,
    target: Target,
    timeout_s: float,
    now: float | None = None,
) -> Entry:
    """Ping the provider now and write what was seen. A failed ping counts toward its breaker;
    a good one closes a half-open breaker (the provider is back). Pings are not executions:
    they do not count in the success rate."""
    measured = now or time.time()
    hold_until = float(client.hget(_key(target.provider), "hold_until") or 0)
    started = time.perf_counter()
    try:
        rtt = ping(target.base_url, resolve_api_key(target.api_key_env), timeout_s)
        if breaker.state(target.provider, measured) == "half_open":
            breaker.record_success(target.provider)
        if measured < hold_until:
            # It answers pings, but asked us (Retry-After) not to send it work before then.
            entry = Entry(target.provider, False, rtt, measured, error="rate_limited")
        else:
            entry = Entry(target.provider, True, rtt, measured)
    except ProviderFailure as exc:
        breaker.record_failure(target.provider, measured)
        entry = Entry(target.provider, False, None, measured, error=exc.kind)
    QUOTE_LATENCY.labels(target.provider, "live" if entry.live else entry.error).observe(
        time.perf_counter() - started
    )
    entry = Entry(
        entry.provider,
        entry.live,
        entry.rtt_ms,
        entry.measured_at,
        entry.error,
        breaker=breaker.state(target.provider, measured),
    )
    pipe = client.pipeline(transaction=False)
    write(pipe, entry)
    history.queue_record(pipe, entry.provider, measured, entry.live, entry.rtt_ms)
    pipe.execute()
    return entry


def check_once(
    client: redis.Redis, breaker: Breaker, target: Target, timeout_s: float
) -> Entry | None:
    """``check`` under the provider's single flight; None (nothing done) when a check of it is
    already in flight elsewhere. What beat's periodic check runs."""
    acquire, release = _scripts(client)
    token = uuid.uuid4().hex
    if acquire(keys=[_lock_key(target.provider)], args=[token, _lock_ms(timeout_s)]) is not None:
        return None
    return _lead(client, breaker, target, timeout_s, token, release)


def _lock_ms(timeout_s: float) -> int:
    # The flight outlives its ping's timeout a little: a leader that died frees it by then.
    return int(timeout_s * 1000) + 500


def _lead(
    client: redis.Redis,
    breaker: Breaker,
    target: Target,
    timeout_s: float,
    token: str,
    release: Any,
    fresh_after: float | None = None,
) -> Entry:
    try:
        if fresh_after is not None:
            # A flight that landed between the caller's read and this lock already did the
            # work: one ping per provider per staleness, not one per waiter that came late.
            landed = read(client, [target.provider]).get(target.provider)
            if landed is not None and landed.measured_at >= fresh_after:
                return landed
        return check(client, breaker, target, timeout_s)
    finally:
        # Wake every waiter of this flight (rotated, never taken: see app/jobs/notify.py), then
        # free the flight for the next refresh.
        pipe = client.pipeline(transaction=False)
        pipe.lpush(_done_key(token), "1")
        pipe.expire(_done_key(token), max(5, int(timeout_s * 4)))
        pipe.execute()
        release(keys=[_lock_key(target.provider)], args=[token])


def refresh_one(
    client: redis.Redis,
    breaker: Breaker,
    target: Target,
    timeout_s: float,
    fresh_after: float | None = None,
) -> Entry | None:
    """The provider's entry after a fresh check: ours if no check of it was in flight, else the
    one in flight, waited for (at most ``timeout_s`` and a little). None when a flight we waited
    for never landed (its process died): the caller keeps what it had. An entry measured since
    ``fresh_after`` (a flight that landed after the caller's read) is returned without a ping."""
    acquire, release = _scripts(client)
    token = uuid.uuid4().hex
    held = acquire(keys=[_lock_key(target.provider)], args=[token, _lock_ms(timeout_s)])
    if held is None:
        return _lead(client, breaker, target, timeout_s, token, release, fresh_after)
    done = _done_key(str(held))
    # redis-py types the timeout as int; the server takes seconds with decimals.
    if client.blmove(done, done, timeout_s + 0.5, "RIGHT", "LEFT") is None:  # type: ignore[arg-type]
        return None
    return read(client, [target.provider]).get(target.provider)


_pool: ThreadPoolExecutor | None = None


def _executor() -> ThreadPoolExecutor:
    global _pool
    if _pool is None:
        _pool = ThreadPoolExecutor(max_workers=16, thread_name_prefix="board-refresh")
    return _pool


def refresh(
    client: redis.Redis,
    breaker: Breaker,
    targets: Sequence[Target],
    timeout_s: float,
    fresh_after: float | None = None,
) -> dict[str, Entry]:
    """Refreshes every target (in parallel when there are several) under single flight and
    returns the entries that landed."""
    if not targets:
        return {}
    if len(targets) == 1:
        found = refresh_one(client, breaker, targets[0], timeout_s, fresh_after)
        return {found.provider: found} if found else {}
    futures = [
        _executor().submit(refresh_one, client, breaker, t, timeout_s, fresh_after) for t in targets
    ]
    entries = [f.result() for f in futures]
    return {e.provider: e for e in entries if e is not None}


def queue_execution_outcome(
    pipe: Pipeline,
    provider: str,
    ok: bool,
    error: str | None = None,
    now: float | None = None,
    hold_s: float | None = None,
) -> None:
    """An execution is a check too: a served one confirms the provider live (keeping the last
    measured round trip), a failed or refused one marks it not live until its next good check.
    The hash's other fields (the round trip) stay as the last check left them. Written with a
    pipeline's other commands (one round trip)."""
    measured = now or time.time()
    fields: dict[EncodableT, EncodableT] = {
        "live": 1 if ok else 0,
        "measured_at": repr(measured),
        "error": "" if ok else (error or "execution_failed"),
        "source": "execution",
    }
    if hold_s:
        # A 429's Retry-After: no check marks it live again before then.
        fields["hold_until"] = repr(measured + min(hold_s, _MAX_HOLD_S))
    pipe.hset(_key(provider), mapping=fields)
    pipe.expire(_key(provider), _TTL_S)
