"""Helpers shared by the sandbox tests."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from sandbox import SandboxConfig

LLAMA = "meta-llama/Llama-3.1-8B-Instruct"
TIMEOUT = 5.0


def sandbox_config(**overrides: Any) -> SandboxConfig:
    """Provider alpha serving LLAMA, with `overrides` applied."""
    values: dict[str, Any] = {"name": "alpha", "models": {LLAMA: "alpha"}}
    values.update(overrides)
    return SandboxConfig(**values)


def wait_until(predicate: Callable[[], bool], timeout: float = 3.0) -> None:
    # Polls an observable condition; this is synchronisation, not a guessed delay.
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.005)
