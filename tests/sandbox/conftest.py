from __future__ import annotations

from collections.abc import Iterator

import pytest
import requests


@pytest.fixture
def session() -> Iterator[requests.Session]:
    with requests.Session() as s:
        # Ambient HTTP(S)_PROXY settings must never reroute loopback test traffic.
        s.trust_env = False
        yield s
