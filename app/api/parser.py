"""Request parsing for flask-smorest: JSON bodies are read whatever the Content-Type (curl's
default form type is a common slip), and unparseable JSON is our invalid_request error."""

from __future__ import annotations

import typing

import flask
from webargs import core
from webargs.flaskparser import FlaskParser

from app.exceptions import InvalidRequest


class FlopexParser(FlaskParser):
    # Unknown query parameters are an error too (the schema's Meta.unknown decides).
    DEFAULT_UNKNOWN_BY_LOCATION = {**FlaskParser.DEFAULT_UNKNOWN_BY_LOCATION, "query": None}

    def _raw_load_json(self, req: flask.Request) -> typing.Any:
        data = req.get_data(cache=True)
        if not data:
            return core.missing
        return core.parse_json(data)

    def _handle_invalid_json_error(
        self, error: Exception, req: flask.Request, *a, **k
    ) -> typing.NoReturn:  # type: ignore[no-untyped-def]
        raise InvalidRequest("The request body is not valid JSON.")
