"""The RFC 7240 Prefer header: ``respond-async`` and ``wait=N``.

A preference is a hint, never a requirement: RFC 7240 §2 asks a server to ignore any
preference it does not understand or cannot parse, so nothing in this header is ever an error.
``wait=abc``, ``wait=-1`` or ``wait=1.5`` are ignored exactly like an unknown ``foo=bar``, and
the request runs with the default wait. Only the first occurrence of a preference counts (§2).
What was honoured is echoed in ``Preference-Applied`` (§3) by the caller."""

from __future__ import annotations

from dataclasses import dataclass

from werkzeug.datastructures import Headers


@dataclass(frozen=True)
class Preferences:
    respond_async: bool = False
    # The wait honoured, in whole seconds, already capped by FLOPEX_MAX_WAIT_S.
    wait_s: float | None = None

    def applied_wait(self) -> str | None:
        """The Preference-Applied token for the wait, when one was honoured: the seconds
        actually waited at most (the cap, when the client asked for more)."""
        return None if self.wait_s is None else f"wait={int(self.wait_s)}"


def parse_prefer(headers: Headers, max_wait_s: float) -> Preferences:
    respond_async = False
    wait: float | None = None
    seen: set[str] = set()
    for header in headers.getlist("Prefer"):
        for token in header.split(","):
            # A preference may carry parameters after ';' (RFC 7240 §2); none is defined for
            # these two, so they are dropped.
            name, _, value = token.split(";", 1)[0].strip().partition("=")
            name = name.strip().lower()
            if not name or name in seen:
                continue
            seen.add(name)
            value = value.strip().strip('"')
            if name == "respond-async":
                respond_async = True
            elif name == "wait" and value.isascii() and value.isdigit():
                # delta-seconds is 1*DIGIT: no sign, no fraction. Capped before any float
                # conversion, and a number too long for int() (over 4300 digits) is simply
                # past the cap: wait=10**300 is a long wait, not a 500.
                seconds = int(value) if len(value) <= 18 else max_wait_s
                wait = float(min(seconds, max_wait_s))
    return Preferences(respond_async, wait)
