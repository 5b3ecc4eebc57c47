"""GET /v1/wallet and GET /v1/wallet/ledger, for the key's own account only."""

from __future__ import annotations

from typing import Any

from flask.views import MethodView
from flask_smorest import Blueprint

from app import wallet
from app.api.auth import authenticate_and_limit, require_principal
from app.api.parser import FlopexParser
from app.api.schemas import (
    NO_QUERY,
    ApiErrorSchema,
    LedgerPageSchema,
    LedgerQuerySchema,
    WalletSchema,
    WebhookSecretSchema,
)
from app.api.session import db
from app.ledger_queries import ledger_page
from app.models import LedgerEntry, iso_utc
from app.money import micros_to_usd
from app.webhooks import webhook_secret
from config.settings import get_settings

blp = Blueprint("wallet", __name__, url_prefix="/v1", description="Your prepaid wallet")
blp.ARGUMENTS_PARSER = FlopexParser()


blp.before_request(authenticate_and_limit)


@blp.route("/wallet")
class WalletView(MethodView):
    @blp.arguments(NO_QUERY, location="query", as_kwargs=True)
    @blp.response(200, WalletSchema)
    @blp.doc(security=[{"bearerAuth": []}])
    def get(self) -> Any:
        """Balance, the amount on hold for running jobs, and what is available."""
        principal = require_principal()
        state = wallet.get_state(db(), principal.wallet_id)
        return {
            "object": "wallet",
            "currency": "USD",
            "balance_usd": micros_to_usd(state.balance_micros),
            "held_usd": micros_to_usd(state.held_micros),
            "available_usd": micros_to_usd(state.available_micros),
        }


def _entry(e: LedgerEntry) -> dict[str, Any]:
    return {
        "id": str(e.id),
        "object": "ledger_entry",
        "kind": e.kind,
        "amount_usd": micros_to_usd(e.amount_micros),
        "held_delta_usd": micros_to_usd(e.held_delta_micros),
        "balance_after_usd": micros_to_usd(e.balance_after_micros),
        "held_after_usd": micros_to_usd(e.held_after_micros),
        "job_id": str(e.job_id) if e.job_id else None,
        "memo": e.memo,
        "created_at": iso_utc(e.created_at),
    }


@blp.route("/wallet/ledger")
class LedgerView(MethodView):
    @blp.arguments(LedgerQuerySchema(), location="query")
    @blp.response(200, LedgerPageSchema)
    @blp.alt_response(
        404,
        schema=ApiErrorSchema,
        description="not_found (param starting_after): the cursor is not one of your entries",
    )
    @blp.doc(security=[{"bearerAuth": []}])
    def get(self, query: dict[str, Any]) -> Any:
        """Ledger entries, newest first. Pass `starting_after` (an entry id, usually the previous
        page's `next_cursor`) for the next page."""
        principal = require_principal()
        page = ledger_page(db(), principal.wallet_id, query["limit"], query.get("starting_after"))
        return {
            "object": "list",
            "data": [_entry(e) for e in page.entries],
            "has_more": page.has_more,
            "next_cursor": page.next_cursor,
        }


@blp.route("/webhook_secret")
class WebhookSecret(MethodView):
    @blp.arguments(NO_QUERY, location="query", as_kwargs=True)
    @blp.response(200, WebhookSecretSchema)
    @blp.doc(security=[{"bearerAuth": []}])
    def get(self) -> Any:
        """The key that signs your webhooks (Flopex-Signature: t=<unix>,v1=<HMAC-SHA256 of
        "<t>.<body>">)."""
        principal = require_principal()
        return {
            "object": "webhook_secret",
            "secret": webhook_secret(get_settings().webhook_secret, principal.account_id),
        }
