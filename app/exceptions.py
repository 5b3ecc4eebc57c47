"""Domain errors. Each carries the stable public code, the HTTP status it maps to and the
offending parameter, so the API layer renders every failure the same way."""

from __future__ import annotations

import uuid

# code -> (http status, error type). The single table of public error codes.
ERROR_CODES: dict[str, tuple[int, str]] = {
    "invalid_request": (400, "invalid_request_error"),
    "max_output_tokens_exceeds_model_cap": (400, "invalid_request_error"),
    "context_length_exceeded": (400, "invalid_request_error"),
    "invalid_api_key": (401, "authentication_error"),
    "insufficient_balance": (402, "billing_error"),
    "model_not_found": (404, "invalid_request_error"),
    "not_found": (404, "invalid_request_error"),
    "job_not_found": (404, "invalid_request_error"),
    "method_not_allowed": (405, "invalid_request_error"),
    "request_timeout": (408, "invalid_request_error"),
    "request_too_large": (413, "invalid_request_error"),
    "uri_too_long": (414, "invalid_request_error"),
    "unsupported_media_type": (415, "invalid_request_error"),
    "idempotency_key_in_use": (409, "idempotency_error"),
    "job_not_cancellable": (409, "invalid_request_error"),
    "job_cancelled": (409, "invalid_request_error"),
    "max_price_exceeded": (422, "routing_error"),
    "idempotency_key_reused_with_different_request": (422, "idempotency_error"),
    "max_latency_exceeded": (422, "routing_error"),
    "rate_limited": (429, "rate_limit_error"),
    "header_fields_too_large": (431, "invalid_request_error"),
    "internal_error": (500, "api_error"),
    "provider_error": (502, "provider_error"),
    "no_provider_available": (503, "provider_error"),
    "service_unavailable": (503, "api_error"),
    "timeout": (504, "timeout_error"),
    "job_still_running": (504, "timeout_error"),
}


def status_for(code: str) -> int:
    return ERROR_CODES.get(code, (500, "api_error"))[0]


def type_for(code: str) -> str:
    return ERROR_CODES.get(code, (500, "api_error"))[1]


class FlopexError(Exception):
    """An error with a public code. Raising one before a job is committed changes nothing."""

    def __init__(
        self,
        code: str,
        message: str,
        param: str | None = None,
        job_id: uuid.UUID | str | None = None,
    ) -> None:
        if code not in ERROR_CODES:
            raise ValueError(f"unknown error code {code!r}")
        super().__init__(message)
        self.code = code
        self.message = message
        self.param = param
        # An error about a job that exists names it as error.job_id (docs/api.md).
        self.job_id = job_id

    @property
    def http_status(self) -> int:
        return status_for(self.code)

    def to_dict(self) -> dict[str, str | None]:
        return error_body(self.code, self.message, self.param)


def error_body(code: str, message: str, param: str | None = None) -> dict[str, str | None]:
    return {"type": type_for(code), "code": code, "message": message, "param": param}


class InvalidRequest(FlopexError):
    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__("invalid_request", message, param)
