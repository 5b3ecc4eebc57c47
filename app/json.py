"""JSON rendering with exact money: Decimal amounts are written as JSON numbers digit for digit
(``0.000041``, never ``4.1e-05`` or a rounded float), so a response equals the ledger."""

from __future__ import annotations

from typing import Any

import simplejson
from flask.json.provider import DefaultJSONProvider


def dumps_exact(obj: Any) -> str:
    """Compact JSON with Decimals written digit for digit (outside a Flask app too)."""
    return simplejson.dumps(obj, use_decimal=True, separators=(",", ":"), default=str)


class FlopexJSONProvider(DefaultJSONProvider):
    def dumps(self, obj: Any, **kwargs: Any) -> str:
        kwargs.pop("default", None)
        kwargs.setdefault("separators", (",", ":"))
        return simplejson.dumps(obj, use_decimal=True, default=self.default, **kwargs)

    def loads(self, s: str | bytes, **kwargs: Any) -> Any:
        return simplejson.loads(s, use_decimal=True, **kwargs)
