"""The RFC 7240 Prefer header: ``respond-async`` and ``wait=N``."""

from __future__ import annotations

from dataclasses import dataclass

from werkzeug.datastructures import Headers

from app.exceptions import InvalidRequest


@dataclass(frozen=True)
class Preferences:
    respond_async: bool = False
    wait_s: float | None = None


def parse_prefer(headers: Headers, max_wait_s: float) -> Preferences:
    respond_async = False
    wait: float | None = None
    for header in headers.getlist("Prefer"):
        for token in header.split(","):
            name, _, value = token.strip().partition("=")
            name = name.strip().lower()
            value = value.strip().strip('"')
            if name == "respond-async":
                respond_async = True
            elif name == "wait":
                try:
                    seconds = int(value)
                except ValueError:
                    raise InvalidRequest(
                        "Prefer: wait must be a whole number of seconds.", "Prefer"
                    ) from None
                if seconds < 0:
                    raise InvalidRequest("Prefer: wait cannot be negative.", "Prefer")
                # Capped before any float conversion: wait=10**300 is a long wait, not a 500.
                wait = float(min(seconds, max_wait_s))
            # Unknown preferences are ignored, as RFC 7240 asks.
    return Preferences(respond_async, wait)
