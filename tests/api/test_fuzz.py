"""Schemathesis fuzzes every operation of the spec in-process (a bounded number of examples
each): no 5xx, and every status and body matches what the spec documents."""

from __future__ import annotations

import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import response_schema_conformance, status_code_conformance

CHECKS = [not_a_server_error, status_code_conformance, response_schema_conformance]


def test_no_server_errors_and_responses_match_the_spec(flask_app, pipeline, make_account):
    account = make_account("1000.00")
    schema = schemathesis.openapi.from_wsgi("/openapi.json", flask_app)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) == 15
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(
            max_examples=20, deadline=None, database=None, suppress_health_check=list(HealthCheck)
        )
        def fuzz(case):  # type: ignore[no-untyped-def]
            case.headers = {**(case.headers or {}), "Authorization": f"Bearer {account.api_key}"}
            case.call_and_validate(checks=CHECKS)

        fuzz()
