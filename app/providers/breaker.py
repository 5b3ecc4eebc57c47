"""A circuit breaker per provider, in Redis so every worker shares it.

closed: calls flow. A failure (an execution or a health probe) counts within ``window_s``;
``threshold`` failures open the breaker for ``cooldown_s``: quotes for that provider are marked
``circuit_open`` and routing skips it. After the cool-down the breaker is half-open: one trial
(the next execution, or the next successful probe) is let through; success closes it, failure
opens it again for another cool-down.

All transitions are Lua scripts, so concurrent workers never race. Time is passed in (seconds),
which keeps the logic testable and the callers' clocks are the only clocks involved.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import redis
from redis.client import Pipeline
from redis.commands.core import Script

from config.settings import Settings

_FAIL = """
local now, window, threshold, cooldown = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local open_until = tonumber(redis.call('HGET', KEYS[1], 'open_until') or '0')
if open_until > 0 and now >= open_until then
  -- a failure while half-open: open again
  redis.call('HSET', KEYS[1], 'open_until', now + cooldown, 'fails', 0, 'trial_until', 0)
  redis.call('EXPIRE', KEYS[1], math.ceil(window + cooldown * 4))
  return 1
end
local start = tonumber(redis.call('HGET', KEYS[1], 'window_start') or '0')
if now - start > window then
  redis.call('HSET', KEYS[1], 'window_start', now, 'fails', 0)
end
local fails = redis.call('HINCRBY', KEYS[1], 'fails', 1)
if fails >= threshold and open_until == 0 then
  redis.call('HSET', KEYS[1], 'open_until', now + cooldown, 'fails', 0)
end
redis.call('EXPIRE', KEYS[1], math.ceil(window + cooldown * 4))
return 0
"""

_ALLOW = """
local now, cooldown = tonumber(ARGV[1]), tonumber(ARGV[2])
local open_until = tonumber(redis.call('HGET', KEYS[1], 'open_until') or '0')
if open_until == 0 then return 1 end
if now < open_until then return 0 end
local trial_until = tonumber(redis.call('HGET', KEYS[1], 'trial_until') or '0')
if now < trial_until then return 0 end
redis.call('HSET', KEYS[1], 'trial_until', now + cooldown)
return 1
"""


@dataclass(frozen=True)
class BreakerConfig:
    threshold: int
    window_s: float
    cooldown_s: float

    @classmethod
    def from_settings(cls, settings: Settings) -> BreakerConfig:
        return cls(
            settings.breaker_threshold, settings.breaker_window_s, settings.breaker_cooldown_s
        )


def _key(provider: str) -> str:
    return f"flopex:breaker:{provider}"


def _scripts(client: redis.Redis) -> tuple[Script, Script]:
    """The client's two scripts, registered once and kept on the client itself (a Breaker is
    built per quote task, and registering a script hashes its source every time). On the
    client, not in a module-level map: a Script refers to its client, so a map would keep every
    client ever used alive."""
    scripts = getattr(client, "_flopex_breaker_scripts", None)
    if scripts is None:
        scripts = (client.register_script(_FAIL), client.register_script(_ALLOW))
        client._flopex_breaker_scripts = scripts  # type: ignore[attr-defined]
    return scripts


class Breaker:
    def __init__(self, client: redis.Redis, config: BreakerConfig) -> None:
        self.client = client
        self.config = config
        self._fail, self._allow = _scripts(client)

    @classmethod
    def from_settings(cls, client: redis.Redis, settings: Settings) -> Breaker:
        return cls(client, BreakerConfig.from_settings(settings))

    def record_failure(self, provider: str, now: float | None = None) -> None:
        c = self.config
        self._fail(
            keys=[_key(provider)], args=[now or time.time(), c.window_s, c.threshold, c.cooldown_s]
        )

    def record_success(self, provider: str, pipe: Pipeline | None = None) -> None:
        """Closes the breaker; with ``pipe``, as one more command of the caller's pipeline."""
        (pipe if pipe is not None else self.client).delete(_key(provider))

    def allow(self, provider: str, now: float | None = None) -> bool:
        """May this provider be used now? Takes the single half-open trial when there is one."""
        return bool(
            self._allow(keys=[_key(provider)], args=[now or time.time(), self.config.cooldown_s])
        )

    def queue_states(
        self, pipe: Pipeline, providers: Sequence[str]
    ) -> Callable[[list[Any], float], dict[str, str]]:
        """``state`` of several providers in the caller's pipeline: the returned function takes
        exactly these reads' results (and the time) and gives each provider's state."""
        for provider in providers:
            pipe.hget(_key(provider), "open_until")

        def read(results: list[Any], now: float) -> dict[str, str]:
            return {p: _state(float(r or 0), now) for p, r in zip(providers, results, strict=True)}

        return read

    def state(self, provider: str, now: float | None = None) -> str:
        open_until = float(self.client.hget(_key(provider), "open_until") or 0)
        return _state(open_until, now or time.time())


def _state(open_until: float, now: float) -> str:
    if open_until == 0:
        return "closed"
    return "open" if now < open_until else "half_open"
