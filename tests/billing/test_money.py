"""app/billing/money.py: exact conversions and the one rounding rule (docs/billing.md)."""

from __future__ import annotations

from decimal import Decimal
from fractions import Fraction

import pytest
from hypothesis import given
from hypothesis import strategies as st

from app.billing.money import (
    blended_rate_usd_per_million,
    ceil_micros,
    customer_charge,
    display_usd,
    micros_to_usd,
    provider_cost,
    usd_to_micros,
    usd_to_micros_floor,
)
from app.billing.pricing import estimated_charge

MARKUP = Decimal("0.15")

# -- usd_to_micros ---------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "micros"),
    [
        ("0", 0),
        ("1", 1_000_000),
        (1, 1_000_000),
        ("0.05", 50_000),
        ("0.000001", 1),
        ("0.0000010", 1),  # a trailing zero is not a seventh decimal
        (Decimal("0.18"), 180_000),
        ("12345678.123456", 12_345_678_123_456),
        ("1E+2", 100_000_000),
        ("-0.25", -250_000),
    ],
)
def test_usd_to_micros_is_exact(value, micros):
    result = usd_to_micros(value)
    assert result == micros
    assert type(result) is int


@pytest.mark.parametrize(
    "value",
    ["0.0000001", "0.1234567", "1.0000005", Decimal("0.00000001"), "1e-7"],
)
def test_usd_to_micros_rejects_more_than_six_decimals(value):
    with pytest.raises(ValueError, match="more than six decimal places"):
        usd_to_micros(value)


@pytest.mark.parametrize("value", ["NaN", "sNaN", "Infinity", "-Infinity", "inf", Decimal("NaN")])
def test_usd_to_micros_rejects_non_finite(value):
    with pytest.raises(ValueError, match="not a finite amount"):
        usd_to_micros(value)


@pytest.mark.parametrize("value", ["", "abc", "1,50", "$1"])
def test_usd_to_micros_rejects_non_decimal_text(value):
    with pytest.raises(ValueError, match="not a decimal amount"):
        usd_to_micros(value)


@given(st.integers(min_value=-(10**15), max_value=10**15))
def test_usd_round_trip(micros):
    assert usd_to_micros(micros_to_usd(micros)) == micros
    assert usd_to_micros(str(micros_to_usd(micros))) == micros


@pytest.mark.parametrize(
    ("value", "micros"),
    [
        ("0.02", 20_000),
        ("0.0199999", 19_999),
        ("0.01999999", 19_999),  # floor, never up: the customer's limit binds
        ("0.0000009", 0),
        ("5", 5_000_000),
    ],
)
def test_usd_to_micros_floor(value, micros):
    assert usd_to_micros_floor(Decimal(value)) == micros


# -- formatting --------------------------------------------------------------


@pytest.mark.parametrize(
    ("micros", "text"),
    [
        (41, "0.000041"),
        (0, "0.000000"),
        (1, "0.000001"),
        (1_500_000, "1.500000"),
        (123_456_789, "123.456789"),
        (-41, "-0.000041"),
    ],
)
def test_micros_to_usd_has_exactly_six_places(micros, text):
    value = micros_to_usd(micros)
    assert isinstance(value, Decimal)
    assert str(value) == text
    assert value.as_tuple().exponent == -6


def test_display_usd_never_uses_exponent_notation():
    assert display_usd(41) == "$0.000041"
    assert display_usd(0) == "$0.000000"
    assert display_usd(10_000_000) == "$10.000000"
    assert "e" not in display_usd(1).lower()


# -- customer_charge: the one rounding rule -----------------------------------


@pytest.mark.parametrize(
    ("tokens_in", "tokens_out", "price_in", "price_out", "markup", "expected"),
    [
        # 1 token at $0.05/M costs 0.05 micro; x1.15 = 0.0575 -> rounds up to 1, never 0.
        (1, 0, 50_000, 80_000, MARKUP, 1),
        (0, 1, 50_000, 80_000, MARKUP, 1),
        # (1000*50000 + 500*80000)/1e6 = 90 micros; x1.15 = 103.5 -> 104.
        (1000, 500, 50_000, 80_000, MARKUP, 104),
        # (20*180000 + 24*200000)/1e6 = 8.4; x1.15 = 9.66 -> 10.
        (20, 24, 180_000, 200_000, MARKUP, 10),
        # Exact results are not bumped: 1M tokens at $0.10/M = 100000; x1.15 = 115000.
        (1_000_000, 0, 100_000, 0, MARKUP, 115_000),
        # (13*100000 + 256*120000)/1e6 = 32.02; x1.15 = 36.823 -> 37.
        (13, 256, 100_000, 120_000, MARKUP, 37),
        # Without markup the provider cost itself is rounded up: 3/1e6 -> 1.
        (3, 0, 1, 0, Decimal("0"), 1),
        (2_000_000, 0, 1, 0, Decimal("0"), 2),
        # No usage is free of charge, but zero usage costs zero.
        (0, 0, 50_000, 80_000, MARKUP, 0),
        # Free prices cost nothing whatever the usage.
        (10_000, 10_000, 0, 0, MARKUP, 0),
    ],
)
def test_customer_charge_hand_computed(
    tokens_in, tokens_out, price_in, price_out, markup, expected
):
    assert customer_charge(tokens_in, tokens_out, price_in, price_out, markup) == expected


def test_markup_is_applied_exactly():
    # Exact products stay exact (no binary float drift pushes the ceiling up a micro).
    assert customer_charge(20, 0, 1_000_000, 0, MARKUP) == 23
    assert customer_charge(0, 60, 0, 1_000_000, MARKUP) == 69


def test_provider_cost_is_an_exact_fraction():
    assert provider_cost(1000, 500, 50_000, 80_000) == Fraction(90)
    assert provider_cost(1, 0, 50_000, 0) == Fraction(1, 20)


@pytest.mark.parametrize(
    ("value", "expected"),
    [(Fraction(0), 0), (Fraction(1, 10**9), 1), (Fraction(5), 5), (Fraction(51, 10), 6)],
)
def test_ceil_micros(value, expected):
    assert ceil_micros(value) == expected


tokens = st.integers(min_value=0, max_value=2_000_000)
prices = st.integers(min_value=0, max_value=100_000_000)  # up to $100 per million tokens
markups = st.decimals(min_value=0, max_value=3, places=4, allow_nan=False, allow_infinity=False)


@given(tokens, tokens, prices, prices, markups)
def test_charge_is_the_ceiling_of_the_exact_amount(t_in, t_out, p_in, p_out, markup):
    exact = provider_cost(t_in, t_out, p_in, p_out) * (1 + Fraction(markup))
    charge = customer_charge(t_in, t_out, p_in, p_out, markup)
    assert charge >= exact
    assert charge - exact < 1
    if exact > 0:
        assert charge >= 1


@given(tokens, tokens, tokens, tokens, prices, prices, markups)
def test_more_tokens_never_cost_less(a_in, a_out, extra_in, extra_out, p_in, p_out, markup):
    small = customer_charge(a_in, a_out, p_in, p_out, markup)
    large = customer_charge(a_in + extra_in, a_out + extra_out, p_in, p_out, markup)
    assert large >= small


@given(
    st.integers(min_value=0, max_value=500_000),
    st.integers(min_value=0, max_value=500_000),
    st.data(),
    prices,
    prices,
    markups,
)
def test_estimate_covers_actual_usage(est_in, max_out, data, p_in, p_out, markup):
    actual_in = data.draw(st.integers(min_value=0, max_value=est_in))
    actual_out = data.draw(st.integers(min_value=0, max_value=max_out))
    hold = estimated_charge(est_in, max_out, p_in, p_out, markup)
    assert hold >= customer_charge(actual_in, actual_out, p_in, p_out, markup)


# -- blended rate --------------------------------------------------------------


@pytest.mark.parametrize(
    ("charge", "total_tokens", "expected"),
    [
        (104, 1500, Decimal("0.069333")),
        (115_000, 1_000_000, Decimal("0.115000")),
        (37, 269, Decimal("0.137546")),
        # Half-even at the sixth place: 0.0000005 -> 0.000000, 0.0000015 -> 0.000002.
        (1, 2_000_000, Decimal("0.000000")),
        (3, 2_000_000, Decimal("0.000002")),
        (0, 10, Decimal("0.000000")),
    ],
)
def test_blended_rate(charge, total_tokens, expected):
    rate = blended_rate_usd_per_million(charge, total_tokens)
    assert rate == expected
    assert str(rate) == str(expected)


@pytest.mark.parametrize("total_tokens", [0, -1])
def test_blended_rate_is_none_without_tokens(total_tokens):
    assert blended_rate_usd_per_million(0, total_tokens) is None
    assert blended_rate_usd_per_million(10, total_tokens) is None
