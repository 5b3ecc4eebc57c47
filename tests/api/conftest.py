"""Fixtures shared by the streaming tests of the API (native and chat)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from tests.conftest import PROVIDERS


@pytest.fixture
def providers(pipeline: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """The sandboxes streaming at a steady pace (each token 5 ms apart), put back afterwards."""
    for provider in pipeline.values():
        provider.configure(ttft_ms=20, tokens_per_s=200, output_tokens=24)
    yield pipeline
    for name, provider in pipeline.items():
        provider.configure(
            ttft_ms=0,
            tokens_per_s=0,
            output_tokens=24,
            stream_fault=None,
            latency_ms=PROVIDERS[name]["latency_ms"],
        )
