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
from webargs.flaskparser import FlaskParser

from app.exceptions import FlopexError, InvalidRequest


class JsonNumber(float):
    """A JSON number with a fraction or exponent: a float everywhere (metadata is stored and
    echoed as before), with the client's own digits in ``text``."""

    __slots__ = ("text",)
    text: str


class _NotJson(ValueError):
    pass


class UnsupportedMediaType(FlopexError):
    """415: a body we cannot read as sent. RFC 9110 §15.5.16 asks a 415 caused by a content
    coding to say in Accept-Encoding which codings would have been accepted: none but identity."""

    headers = {"Accept-Encoding": "identity"}

    def __init__(self, message: str) -> None:
        super().__init__("unsupported_media_type", message, "Content-Encoding")


def _repeated_key(pairs: list[tuple[str, typing.Any]]) -> str:
    seen: set[str] = set()
    for key, _ in pairs:
        if key in seen:
            return key
        seen.add(key)
    raise AssertionError("no repeated key")


def _path_to(root: typing.Any, target: dict[str, typing.Any]) -> list[str] | None:
    """The keys (and list indexes) leading from ``root`` to the object ``target``, found by
    identity; an explicit stack, since the body may nest as deep as the parser allowed."""
    stack: list[tuple[typing.Any, list[str]]] = [(root, [])]
    while stack:
        node, path = stack.pop()
        if node is target:
            return path
        if isinstance(node, dict):
            stack.extend((value, [*path, str(key)]) for key, value in node.items())
        elif isinstance(node, list):
            stack.extend((value, [*path, str(i)]) for i, value in enumerate(node))
    return None


def _number(text: str) -> JsonNumber:
    number = JsonNumber(text)
    if not math.isfinite(number):
        raise _NotJson(f"The number {text[:40]} is out of range.")
    number.text = text
    return number


def _constant(name: str) -> typing.NoReturn:
    raise _NotJson(f"{name} is not a JSON value.")


def load_json(data: bytes) -> typing.Any:
    """Strict JSON from a request body (UTF-8, no byte order mark, no key twice in one object);
    InvalidRequest otherwise."""
    # Python's json keeps the last of two equal keys silently ({"model": "a", "model": "b"}
    # ran b); RFC 8259 leaves their meaning undefined, so a strict parser refuses rather than
    # guess which one the client meant. The first object found with one is remembered and
    # reported once the whole body parsed, with its path from the top.
    repeated: list[tuple[str, dict[str, typing.Any]]] = []

    def unique_object(pairs: list[tuple[str, typing.Any]]) -> dict[str, typing.Any]:
        obj = dict(pairs)
        if len(obj) != len(pairs) and not repeated:
            repeated.append((_repeated_key(pairs), obj))
        return obj

    try:
        body = json.loads(
            data.decode("utf-8"),
            parse_float=_number,
            parse_constant=_constant,
            object_pairs_hook=unique_object,
        )
    except _NotJson as exc:
        raise InvalidRequest(f"The request body is not valid JSON: {exc}") from None
    except RecursionError:
        raise InvalidRequest("The request body is nested too deeply.") from None
    except ValueError:  # JSONDecodeError, UnicodeDecodeError
        raise InvalidRequest("The request body is not valid JSON.") from None
    if repeated:
        key, holder = repeated[0]
        # `param` names it like any invalid parameter: "model", or "metadata.env" inside one.
        param = ".".join([*(_path_to(body, holder) or []), key])
        raise InvalidRequest(
            f'The request body is not valid JSON: the key "{key}" appears more than once '
            f"in one object ({param}).",
            param,
        )
    return body


class FlopexParser(FlaskParser):
    # Unknown query parameters are an error too (the schema's Meta.unknown decides).
    DEFAULT_UNKNOWN_BY_LOCATION = {**FlaskParser.DEFAULT_UNKNOWN_BY_LOCATION, "query": None}
    # An invalid parameter is a 400 invalid_request (app/api/errors.py), and flask-smorest
    # documents every endpoint's validation error with this status: the OpenAPI document says
    # what the API answers.
    DEFAULT_VALIDATION_STATUS = 400

    def _raw_load_json(self, req: flask.Request) -> typing.Any:
        # Bodies are read as sent: a compressed one would only fail as "not valid JSON",
        # hiding the cause. Any coding but identity is 415, as the error table says.
        codings = [c.strip().lower() for c in req.headers.get("Content-Encoding", "").split(",")]
        if any(c not in ("", "identity") for c in codings):
            raise UnsupportedMediaType(
                f"Content-Encoding: {req.headers['Content-Encoding'][:40]} is not supported; "
                "send the JSON body uncompressed."
            )
        data = req.get_data(cache=True)
        if not data:
            # docs/api.md: a body that is not JSON, an empty one included, says so.
            raise InvalidRequest("The request body is not valid JSON: it is empty.")
        return load_json(data)

    def load_querystring(self, req: flask.Request, schema: typing.Any) -> typing.Any:
        # A parameter given twice (?limit=1&limit=2) is refused, not read first-wins: which one
        # the client meant is a guess. No query parameter of the API takes a list.
        for name, values in req.args.lists():
            if len(values) > 1:
                raise InvalidRequest(f"The query parameter {name} is given more than once.", name)
        return super().load_querystring(req, schema)

    def _handle_invalid_json_error(
        self, error: Exception, req: flask.Request, *a: typing.Any, **k: typing.Any
    ) -> typing.NoReturn:
        raise InvalidRequest("The request body is not valid JSON.")
