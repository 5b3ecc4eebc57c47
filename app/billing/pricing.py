"""Estimates made before a provider runs: input tokens and the worst-case customer charge."""

from __future__ import annotations

from decimal import Decimal

from app.billing.money import customer_charge

# Chat templates add a few tokens around each message.
TEMPLATE_OVERHEAD_TOKENS = 8


def estimate_input_tokens(prompt: str) -> int:
    """A deliberately generous estimate (about one token per three UTF-8 bytes, where common
    tokenizers average about four), so that holds rarely fall short. The real count comes from
    the provider's usage; the charge is capped at the hold either way (docs/billing.md)."""
    size = len(prompt.encode("utf-8"))
    return -(-size // 3) + TEMPLATE_OVERHEAD_TOKENS


def estimated_charge(
    estimated_input_tokens: int,
    max_output_tokens: int,
    input_price_micros_per_m: int,
    output_price_micros_per_m: int,
    markup: Decimal,
) -> int:
    """Worst case for a quote: the estimated input plus every allowed output token."""
    return customer_charge(
        estimated_input_tokens,
        max_output_tokens,
        input_price_micros_per_m,
        output_price_micros_per_m,
        markup,
    )
