"""Request rate limits in Redis (GCRA: a token bucket kept as one timestamp): per account, and
per client address for failed authentications.

The clock is Redis's own (``TIME`` inside the script), so many web processes on many machines
share one limit without trusting their clocks.
"""

from __future__ import annotations

import ipaddress
import logging
import uuid
from dataclasses import dataclass

import redis

log = logging.getLogger(__name__)

# Microseconds (exact in a Lua double until the year 2255): with milliseconds, the interval of
# a high rate rounded down (7,000/min allowed 7,500).
_GCRA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local tolerance = interval * tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or now)
if tat < now then tat = now end
local new_tat = tat + interval
if new_tat - now > tolerance then
  return {0, new_tat - now - tolerance}
end
redis.call('SET', KEYS[1], string.format('%d', new_tat), 'PX', math.ceil((new_tat - now) / 1000) + 1000)
return {1, 0}
"""


@dataclass(frozen=True)
class Verdict:
    allowed: bool
    retry_after_ms: int = 0


class RateLimiter:
    def __init__(self, client: redis.Redis) -> None:
        self._script = client.register_script(_GCRA)

    def hit(self, account_id: uuid.UUID, per_minute: int, burst: int) -> Verdict:
        """Take one request from the account's bucket. Fails open if Redis is unreachable: the
        request will meet the same outage at the broker and answer 503 there."""
        # A key of its own: a process still counting milliseconds (a rolling deploy, a
        # rollback) would read microseconds as a time far ahead and refuse everyone.
        return self._run(f"flopex:rl:us:{account_id}", per_minute, burst)

    def record_auth_failure(self, client: str, per_minute: int) -> Verdict:
        """One failed key lookup from ``client`` (an address): refused once it has failed
        ``per_minute`` lookups in a burst, until the bucket refills. An IPv6 address counts
        with its /64, what one host usually has to itself."""
        return self._run(_auth_failure_key(client), per_minute, per_minute)

    def _run(self, key: str, per_minute: int, burst: int) -> Verdict:
        if per_minute <= 0:
            return Verdict(False, 60_000)
        interval_us = -(-60_000_000 // per_minute)  # rounded up: never more than the rate
        try:
            allowed, retry_us = self._script(keys=[key], args=[interval_us, max(burst, 1)])
        except redis.RedisError:
            log.warning("rate limiter unavailable; allowing request")
            return Verdict(True)
        return Verdict(bool(allowed), -(-int(retry_us) // 1000))


def _auth_failure_key(client: str) -> str:
    try:
        address = ipaddress.ip_address(client)
    except ValueError:
        return f"flopex:rl:authfail:{client}"
    if address.version == 6:
        return f"flopex:rl:authfail:{ipaddress.ip_network(f'{address}/64', strict=False)}"
    return f"flopex:rl:authfail:{address}"
