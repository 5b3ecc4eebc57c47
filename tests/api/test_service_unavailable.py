"""Infrastructure faults anywhere in a request answer 503 service_unavailable with Retry-After in
the one error shape, naming the job when one was accepted; a bug is still a 500."""

from __future__ import annotations

from typing import Any

import pytest
import redis
from kombu.exceptions import OperationalError as KombuOperationalError
from sqlalchemy import exc as sa_exc

FAULTS = [
    redis.exceptions.ConnectionError("Connection closed by server."),
    redis.exceptions.TimeoutError("Timeout reading from socket"),
    sa_exc.OperationalError("SELECT 1", {}, Exception("server closed the connection")),
    sa_exc.TimeoutError("QueuePool limit of size 4 overflow 4 reached"),
    KombuOperationalError("Error 111 connecting to 127.0.0.1:6379"),
]


@pytest.mark.parametrize("fault", FAULTS, ids=lambda f: type(f).__name__)
def test_a_fault_reading_the_wallet_is_a_503(
    client: Any, make_account: Any, monkeypatch: pytest.MonkeyPatch, fault: Exception
) -> None:
    from app.api import wallet as wallet_api

    account = make_account("1.00")

    def fail(*_: Any, **__: Any) -> Any:
        raise fault

    monkeypatch.setattr(wallet_api.wallet, "get_state", fail)
    resp = client.get("/v1/wallet", headers=account.headers)
    assert resp.status_code == 503, resp.text
    assert resp.headers["Retry-After"] == "1"
    error = resp.get_json()["error"]
    assert error["code"] == "service_unavailable"
    assert error["type"] == "api_error"
    assert "job_id" not in error


def test_a_fault_after_the_job_was_accepted_names_it(
    client: Any, pipeline: Any, make_account: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from app.jobs import command

    account = make_account("1.00")

    def lost(*_: Any, **__: Any) -> bool:
        raise redis.exceptions.ConnectionError("Connection closed by server.")

    monkeypatch.setattr(command, "wait_done", lost)
    resp = client.post(
        "/v1/inference",
        json={"model": "llama-3.1-8b", "input": "hi", "max_output_tokens": 8},
        headers=account.headers,
    )
    assert resp.status_code == 503, resp.text
    error = resp.get_json()["error"]
    assert error["code"] == "service_unavailable" and error["job_id"]
    assert error["job_id"] in error["message"]
    assert (
        client.get(f"/v1/inference/{error['job_id']}", headers=account.headers).status_code == 200
    )


def test_a_bug_is_still_a_500(
    client: Any, make_account: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from app.api import wallet as wallet_api

    account = make_account("1.00")

    def bug(*_: Any, **__: Any) -> Any:
        raise sa_exc.IntegrityError("INSERT", {}, Exception("duplicate key"))

    monkeypatch.setattr(wallet_api.wallet, "get_state", bug)
    resp = client.get("/v1/wallet", headers=account.headers)
    assert resp.status_code == 500
    assert resp.get_json()["error"]["code"] == "internal_error"
