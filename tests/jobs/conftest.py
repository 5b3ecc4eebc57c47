"""Fixtures shared by the job tests."""

from __future__ import annotations

from typing import Any

import pytest

from app.catalog import ModelCache
from app.db import session_scope
from tests.factories import SUBMISSION


@pytest.fixture
def models(pipeline: Any) -> ModelCache:
    """A warm model cache, as the web's: the submission then reads nothing before its hold."""
    cache = ModelCache(ttl_s=60)
    with session_scope() as session:
        assert cache.get(session, SUBMISSION.model) is not None
    return cache
