"""Request parsing for flask-smorest: JSON bodies are read whatever the Content-Type (curl's
default form type is a common slip), and a body that is not strict JSON is our invalid_request
error, never a 500: no NaN or Infinity, no number out of float range, no nesting deeper than the
interpreter's stack allows. A number with a fraction or an exponent keeps the text the client
wrote (``JsonNumber.text``), so a money field reads the exact decimal, not its binary
approximation."""

from __future__ import annotations

import json
import math
import typing

import flask
from webargs import core
from webargs.flaskparser import FlaskParser

from app.exceptions import InvalidRequest


class JsonNumber(float):
    """A JSON number with a fraction or exponent: a float everywhere (metadata is stored and
    echoed as before), with the client's own digits in ``text``."""

    __slots__ = ("text",)
    text: str


class _NotJson(ValueError):
    pass


def _number(text: str) -> JsonNumber:
    number = JsonNumber(text)
    if not math.isfinite(number):
        raise _NotJson(f"The number {text[:40]} is out of range.")
    number.text = text
    return number


def _constant(name: str) -> typing.NoReturn:
    raise _NotJson(f"{name} is not a JSON value.")


def load_json(data: bytes) -> typing.Any:
    """Strict JSON from a request body (UTF-8, no byte order mark); InvalidRequest otherwise."""
    try:
        return json.loads(data.decode("utf-8"), parse_float=_number, parse_constant=_constant)
    except _NotJson as exc:
        raise InvalidRequest(f"The request body is not valid JSON: {exc}") from None
    except RecursionError:
        raise InvalidRequest("The request body is nested too deeply.") from None
    except ValueError:  # JSONDecodeError, UnicodeDecodeError
        raise InvalidRequest("The request body is not valid JSON.") from None


class FlopexParser(FlaskParser):
    # Unknown query parameters are an error too (the schema's Meta.unknown decides).
    DEFAULT_UNKNOWN_BY_LOCATION = {**FlaskParser.DEFAULT_UNKNOWN_BY_LOCATION, "query": None}
    # An invalid parameter is a 400 invalid_request (app/api/errors.py), and flask-smorest
    # documents every endpoint's validation error with this status: the OpenAPI document says
    # what the API answers.
    DEFAULT_VALIDATION_STATUS = 400

    def _raw_load_json(self, req: flask.Request) -> typing.Any:
        data = req.get_data(cache=True)
        if not data:
            return core.missing
        return load_json(data)

    def _handle_invalid_json_error(
        self, error: Exception, req: flask.Request, *a, **k
    ) -> typing.NoReturn:  # type: ignore[no-untyped-def]
        raise InvalidRequest("The request body is not valid JSON.")
