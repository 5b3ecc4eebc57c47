"""Money arithmetic. The one rounding rule lives here.

Amounts are integers of micro-USD (1 USD = 1_000_000 micros). Prices are micro-USD per million
tokens, so ``tokens * price / 1_000_000`` is an exact rational number of micros. A customer charge
is that provider cost times ``1 + markup``, **rounded up to the next whole micro-USD**
(``ROUND_CEILING``): a hold computed with the same rule from larger token counts can never be
smaller than the charge it covers, and no usage is ever billed as zero.
"""

from __future__ import annotations

import re
from decimal import ROUND_HALF_EVEN, Context, Decimal, InvalidOperation, localcontext
from fractions import Fraction

MICROS_PER_USD = 1_000_000
_SIX_PLACES = Decimal("0.000001")


# JSON's number grammar: how an amount may be written, to the API (a JSON number, or a string
# holding one) and to the admin CLI alike.
JSON_NUMBER = re.compile(r"-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?")


def _exact(value: Decimal):  # type: ignore[no-untyped-def]
    """A context wide enough that scaling by 10**6 never rounds (the default keeps 28 digits)."""
    return localcontext(Context(prec=len(value.as_tuple().digits) + 16))


def usd_to_micros(value: Decimal | str | int) -> int:
    """Exact conversion of a USD amount with at most six decimals; raises ValueError otherwise."""
    try:
        amount = Decimal(str(value))
    except InvalidOperation as exc:
        raise ValueError(f"not a decimal amount: {value!r}") from exc
    if not amount.is_finite():
        raise ValueError(f"not a finite amount: {value!r}")
    with _exact(amount):
        micros = amount * MICROS_PER_USD
        exact = micros == micros.to_integral_value()
    if not exact:
        raise ValueError(f"{value!r} has more than six decimal places")
    return int(micros)


def usd_to_micros_floor(value: Decimal) -> int:
    """A customer's limit (max_price_usd) may carry more than six decimals; the binding limit is
    the largest whole micro-USD not above it."""
    with _exact(value):
        return int((value * MICROS_PER_USD).to_integral_value(rounding="ROUND_FLOOR"))


def micros_to_usd(micros: int) -> Decimal:
    """A Decimal with exactly six places, e.g. 41 -> Decimal('0.000041')."""
    return (Decimal(micros) / MICROS_PER_USD).quantize(_SIX_PLACES)


def display_usd(micros: int) -> str:
    return f"${micros_to_usd(micros)}"


def provider_cost(
    input_tokens: int, output_tokens: int, input_price_per_m: int, output_price_per_m: int
) -> Fraction:
    """What the provider bills us, in exact (fractional) micro-USD."""
    return Fraction(
        input_tokens * input_price_per_m + output_tokens * output_price_per_m, MICROS_PER_USD
    )


def ceil_micros(value: Fraction) -> int:
    return -((-value.numerator) // value.denominator)


def customer_charge(
    input_tokens: int,
    output_tokens: int,
    input_price_per_m: int,
    output_price_per_m: int,
    markup: Decimal,
) -> int:
    """The customer's charge in micro-USD, markup included, rounded up (the one rounding rule)."""
    cost = provider_cost(input_tokens, output_tokens, input_price_per_m, output_price_per_m)
    return ceil_micros(cost * (1 + Fraction(markup)))


def blended_rate_usd_per_million(charge_micros: int, total_tokens: int) -> Decimal | None:
    """Effective USD per million tokens: micro-USD per token is numerically USD per million."""
    if total_tokens <= 0:
        return None
    return (Decimal(charge_micros) / Decimal(total_tokens)).quantize(
        _SIX_PLACES, rounding=ROUND_HALF_EVEN
    )
