"""app/routing.py: the pure selection rules (docs/routing.md)."""

from __future__ import annotations

import dataclasses
import json
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from app.pricing import estimated_charge
from app.routing import PROFILES, STRATEGIES, Decision, Quote, select

WEIGHTS = (Decimal("0.4"), Decimal("0.4"), Decimal("0.2"))


def quote(
    provider: str,
    charge: int,
    latency: int | None,
    *,
    live: bool | None = None,
    success_rate: str | None = None,
    offering_id: int = 1,
) -> Quote:
    return Quote(
        provider=provider,
        offering_id=offering_id,
        provider_model_id=f"{provider}/model",
        input_price_micros_per_m=50_000,
        output_price_micros_per_m=80_000,
        estimated_charge_micros=charge,
        live=latency is not None if live is None else live,
        estimated_latency_ms=latency,
        success_rate=success_rate,
    )


def run(
    quotes: list[Quote],
    profile: str = "economy",
    strategy: str = "lowest_cost",
    max_price: int | None = None,
    max_latency: int | None = None,
    weights: tuple[Decimal, Decimal, Decimal] = WEIGHTS,
    hold: int | None = None,
) -> Decision:
    return select(
        quotes,
        profile=profile,
        strategy=strategy,
        max_price_micros=max_price,
        max_latency_ms=max_latency,
        weights=weights,
        hold_micros=hold,
    )


def order(decision: Decision) -> list[str]:
    return [r.quote.provider for r in decision.ranked]


# The conftest trio: alpha cheapest and slowest, bravo dearest and fastest, charlie between.
TRIO = [quote("alpha", 100, 80), quote("bravo", 300, 2), quote("charlie", 200, 12)]


def test_economy_ranks_by_lowest_charge():
    decision = run(TRIO, "economy")
    assert order(decision) == ["alpha", "charlie", "bravo"]
    assert decision.winner == TRIO[0]
    assert decision.error_code is None
    assert decision.dropped == []
    assert all(r.score is None for r in decision.ranked)


def test_fast_ranks_by_lowest_latency():
    decision = run(TRIO, "fast")
    assert order(decision) == ["bravo", "charlie", "alpha"]


def test_fast_puts_unknown_latency_last():
    quotes = [quote("a", 10, None, live=False), quote("b", 999, 500), quote("c", 500, 40)]
    assert order(run(quotes, "fast")) == ["c", "b", "a"]


def test_economy_breaks_charge_ties_by_latency_with_unknown_last():
    quotes = [quote("a", 100, None, live=False), quote("b", 100, 50), quote("c", 100, 20)]
    assert order(run(quotes, "economy")) == ["c", "b", "a"]


def test_balanced_weighted_score_computed_by_hand():
    quotes = [
        quote("a", 100, 50, success_rate="1.0000"),
        quote("b", 200, 10),  # no history counts as fully reliable
        quote("c", 150, None, live=False, success_rate="0.5000"),
    ]
    # max charge 200, max known latency 50, weights cost 0.4 / latency 0.4 / reliability 0.2:
    # a: 0.4*100/200 + 0.4*50/50 + 0.2*(1-1)   = 0.2 + 0.4       = 0.6
    # b: 0.4*200/200 + 0.4*10/50 + 0.2*(1-1)   = 0.4 + 0.08      = 0.48
    # c: 0.4*150/200 + 0.4*1     + 0.2*(1-0.5) = 0.3 + 0.4 + 0.1 = 0.8 (unknown latency = 1)
    decision = run(quotes, "balanced")
    assert [(r.quote.provider, r.score) for r in decision.ranked] == [
        ("b", "0.480000"),
        ("a", "0.600000"),
        ("c", "0.800000"),
    ]


def test_balanced_scores_are_quantized_to_six_places():
    quotes = [quote("a", 100, 30), quote("b", 300, 10)]
    # a: 0.4*1/3 + 0.4*1 = 0.5333...; b: 0.4*1 + 0.4*1/3 = 0.5333... -> tie on score,
    # then the lower charge wins.
    decision = run(quotes, "balanced")
    assert [(r.quote.provider, r.score) for r in decision.ranked] == [
        ("a", "0.533333"),
        ("b", "0.533333"),
    ]


def test_balanced_weights_change_the_winner():
    cost_only = (Decimal(1), Decimal(0), Decimal(0))
    latency_only = (Decimal(0), Decimal(1), Decimal(0))
    assert run(TRIO, "balanced", weights=cost_only).winner.provider == "alpha"
    assert run(TRIO, "balanced", weights=latency_only).winner.provider == "bravo"


def test_balanced_reliability_penalises_failing_providers():
    reliability_only = (Decimal(0), Decimal(0), Decimal(1))
    quotes = [quote("a", 100, 10, success_rate="0.2500"), quote("b", 300, 90)]
    decision = run(quotes, "balanced", weights=reliability_only)
    assert order(decision) == ["b", "a"]
    assert [r.score for r in decision.ranked] == ["0.000000", "0.750000"]


def test_prefer_live_puts_live_providers_first():
    quotes = [
        quote("a", 10, None, live=False),
        quote("b", 50, 30),
        quote("c", 20, None, live=False),
        quote("d", 40, 60),
    ]
    decision = run(quotes, "economy", "prefer_live")
    assert order(decision) == ["d", "b", "a", "c"]
    assert "live providers first" in decision.reason


def test_lowest_cost_ignores_liveness():
    quotes = [quote("a", 10, None, live=False), quote("b", 50, 30)]
    assert order(run(quotes, "economy", "lowest_cost")) == ["a", "b"]
    assert order(run(quotes, "economy", "prefer_live")) == ["b", "a"]


def test_max_price_drops_dearer_quotes_and_keeps_the_boundary():
    decision = run(TRIO, "fast", max_price=200)
    assert order(decision) == ["charlie", "alpha"]
    assert decision.dropped == [{"provider": "bravo", "reason": "over_max_price"}]
    assert decision.error_code is None


def test_max_latency_drops_slow_and_unknown_quotes_and_keeps_the_boundary():
    quotes = [*TRIO, quote("delta", 50, None, live=False)]
    decision = run(quotes, "economy", max_latency=12)
    assert order(decision) == ["charlie", "bravo"]
    assert decision.dropped == [
        {"provider": "alpha", "reason": "over_max_latency"},
        {"provider": "delta", "reason": "latency_unknown"},
    ]


def test_all_over_max_price_is_max_price_exceeded():
    decision = run(TRIO, "economy", max_price=99, max_latency=1)
    assert decision.error_code == "max_price_exceeded"
    assert decision.ranked == []
    assert decision.winner is None
    assert [d["reason"] for d in decision.dropped] == ["over_max_price"] * 3
    assert decision.reason == "all 3 quotes dropped"


def test_any_quote_within_price_but_none_fast_enough_is_max_latency_exceeded():
    decision = run(TRIO, "economy", max_price=150, max_latency=50)
    assert decision.error_code == "max_latency_exceeded"
    assert decision.winner is None
    assert decision.dropped == [
        {"provider": "bravo", "reason": "over_max_price"},
        {"provider": "charlie", "reason": "over_max_price"},
        {"provider": "alpha", "reason": "over_max_latency"},
    ]


def test_only_unknown_latency_is_max_latency_exceeded():
    decision = run([quote("a", 1, None, live=False)], "fast", max_latency=10_000)
    assert decision.error_code == "max_latency_exceeded"
    assert decision.dropped == [{"provider": "a", "reason": "latency_unknown"}]


def test_quotes_above_the_hold_are_dropped_and_never_win():
    # bravo would win `fast`, but its worst case is above what the wallet could hold.
    decision = run(TRIO, "fast", hold=200)
    assert order(decision) == ["charlie", "alpha"]
    assert decision.winner.provider == "charlie"
    assert decision.dropped == [{"provider": "bravo", "reason": "insufficient_balance"}]
    assert decision.to_dict()["winner"] == "charlie"


def test_every_quote_above_the_hold_is_insufficient_balance():
    decision = run(TRIO, "economy", max_price=10**6, max_latency=10**4, hold=99)
    assert decision.error_code == "insufficient_balance"
    assert decision.winner is None
    assert [d["reason"] for d in decision.dropped] == ["insufficient_balance"] * 3


def test_no_quotes_is_no_provider_available():
    decision = run([], "balanced")
    assert decision.error_code == "no_provider_available"
    assert decision.winner is None
    assert decision.to_dict()["winner"] is None


@pytest.mark.parametrize("profile", PROFILES)
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_ties_are_broken_by_provider_name_whatever_the_input_order(profile, strategy):
    quotes = [quote(name, 100, 20) for name in ("delta", "alpha", "charlie", "bravo")]
    expected = ["alpha", "bravo", "charlie", "delta"]
    assert order(run(quotes, profile, strategy)) == expected
    assert order(run(list(reversed(quotes)), profile, strategy)) == expected


def test_fast_breaks_latency_ties_by_charge_before_name():
    quotes = [quote("a", 300, 20), quote("b", 100, 20), quote("c", 100, 20)]
    assert order(run(quotes, "fast")) == ["b", "c", "a"]


def test_unknown_profile_or_strategy_is_an_error():
    with pytest.raises(ValueError, match="unknown profile"):
        run(TRIO, "cheapest")
    with pytest.raises(ValueError, match="unknown strategy"):
        run(TRIO, "economy", "random")


def test_decision_to_dict_shape_for_balanced():
    decision = run(TRIO, "balanced", max_price=250)
    data = decision.to_dict()
    assert set(data) == {"order", "dropped", "winner", "reason"}
    assert data["dropped"] == [{"provider": "bravo", "reason": "over_max_price"}]
    # alpha: 0.4*100/200 + 0.4*80/80 = 0.6; charlie: 0.4*200/200 + 0.4*12/80 = 0.46
    assert data["order"] == [
        {"provider": "charlie", "score": "0.460000"},
        {"provider": "alpha", "score": "0.600000"},
    ]
    assert data["winner"] == "charlie"
    # "ranked first", not "won": execution may still fall back (the response tells the rest).
    assert data["reason"].startswith(
        "balanced/lowest_cost: lowest balanced score; charlie ranked first"
    )
    assert "among 2 eligible of 3 quotes" in data["reason"]
    json.dumps(data)  # stored in jobs.routing as JSON


def test_decision_to_dict_has_no_scores_outside_balanced():
    data = run(TRIO, "economy").to_dict()
    assert data["order"] == [{"provider": "alpha"}, {"provider": "charlie"}, {"provider": "bravo"}]
    assert data["winner"] == "alpha"
    assert "estimated charge 100 micro-USD" in data["reason"]


def test_quote_dict_round_trip_through_json():
    original = Quote(
        provider="alpha",
        offering_id=7,
        provider_model_id="alpha/llama-3.1-8b",
        input_price_micros_per_m=50_000,
        output_price_micros_per_m=80_000,
        estimated_charge_micros=38,
        live=True,
        estimated_latency_ms=12,
        success_rate="0.9500",
        error=None,
        rtt_ms=2,
        ttft_ms=4,
        tokens_per_s=2500.0,
        output_tokens=16,
        speed_source="learned",
        samples=9,
        checked_at=1_800_000_000.125,
        age_ms=310,
    )
    data = original.to_dict()
    assert data == {
        "provider": "alpha",
        "offering_id": 7,
        "provider_model_id": "alpha/llama-3.1-8b",
        "input_price_micros_per_m": 50_000,
        "output_price_micros_per_m": 80_000,
        "estimated_charge_micros": 38,
        "live": True,
        "estimated_latency_ms": 12,
        "success_rate": "0.9500",
        "error": None,
        "circuit_open": False,
        "rtt_ms": 2,
        "ttft_ms": 4,
        "tokens_per_s": 2500.0,
        "output_tokens": 16,
        "speed_source": "learned",
        "samples": 9,
        "checked_at": 1_800_000_000.125,
        "age_ms": 310,
    }
    assert Quote.from_dict(data) == original
    assert Quote.from_dict(json.loads(json.dumps(data))) == original


def test_quote_from_dict_ignores_unknown_keys_and_defaults_optional_ones():
    data = quote("x", 5, None, live=False).to_dict()
    del data["success_rate"], data["error"]
    data["something_new"] = 1
    restored = Quote.from_dict(data)
    assert restored == quote("x", 5, None, live=False)


# -- properties ----------------------------------------------------------------


@st.composite
def quote_sets(draw: Any) -> list[Quote]:
    names = draw(st.lists(st.sampled_from("abcdefgh"), min_size=0, max_size=8, unique=True))
    quotes = []
    for i, name in enumerate(names):
        latency = draw(st.one_of(st.none(), st.integers(min_value=0, max_value=3000)))
        quotes.append(
            quote(
                name,
                draw(st.integers(min_value=0, max_value=10**7)),
                latency,
                live=draw(st.booleans()) if latency is not None else False,
                success_rate=draw(
                    st.one_of(st.none(), st.sampled_from(["0.0000", "0.5000", "0.9000", "1.0000"]))
                ),
                offering_id=i + 1,
            )
        )
    return quotes


weight_values = st.decimals(min_value=0, max_value=1, places=2)


@given(
    quote_sets(),
    st.sampled_from(PROFILES),
    st.sampled_from(STRATEGIES),
    st.one_of(st.none(), st.integers(min_value=0, max_value=10**7)),
    st.one_of(st.none(), st.integers(min_value=0, max_value=3000)),
    st.tuples(weight_values, weight_values, weight_values),
    st.one_of(st.none(), st.integers(min_value=0, max_value=10**7)),
)
def test_winner_is_eligible_and_ranking_is_a_permutation_of_eligible_quotes(
    quotes, profile, strategy, max_price, max_latency, weights, hold
):
    decision = run(quotes, profile, strategy, max_price, max_latency, weights, hold)

    def timely(q: Quote) -> bool:
        if max_price is not None and q.estimated_charge_micros > max_price:
            return False
        return max_latency is None or (
            q.estimated_latency_ms is not None and q.estimated_latency_ms <= max_latency
        )

    def eligible(q: Quote) -> bool:
        return timely(q) and (hold is None or q.estimated_charge_micros <= hold)

    expected = [q for q in quotes if eligible(q)]
    ranked = [r.quote for r in decision.ranked]
    assert sorted(ranked, key=lambda q: q.provider) == sorted(expected, key=lambda q: q.provider)
    assert len(decision.ranked) + len(decision.dropped) == len(quotes)
    assert {d["provider"] for d in decision.dropped}.isdisjoint({q.provider for q in ranked})

    if expected:
        assert decision.error_code is None
        assert decision.winner is not None and eligible(decision.winner)
        if strategy == "prefer_live" and any(q.live for q in expected):
            assert decision.winner.live
        if profile == "economy" and strategy == "lowest_cost":
            assert decision.winner.estimated_charge_micros == min(
                q.estimated_charge_micros for q in expected
            )
        if profile == "balanced":
            scores = [Decimal(r.score) for r in decision.ranked]
            assert scores[0] == min(scores) or strategy == "prefer_live"
    else:
        assert decision.winner is None
        within_price = [
            q for q in quotes if max_price is None or q.estimated_charge_micros <= max_price
        ]
        if not quotes:
            assert decision.error_code == "no_provider_available"
        elif not within_price:
            assert decision.error_code == "max_price_exceeded"
        elif not any(timely(q) for q in quotes):
            assert decision.error_code == "max_latency_exceeded"
        else:
            assert decision.error_code == "insufficient_balance"


def test_open_circuit_quotes_are_dropped_before_any_rule():
    import dataclasses

    tripped = [dataclasses.replace(TRIO[0], circuit_open=True, live=False), *TRIO[1:]]
    decision = run(tripped, "economy")
    assert order(decision) == ["charlie", "bravo"]
    assert decision.dropped == [{"provider": "alpha", "reason": "circuit_open"}]


def test_every_circuit_open_is_no_provider_available():
    import dataclasses

    decision = run([dataclasses.replace(q, circuit_open=True) for q in TRIO], "fast")
    assert decision.error_code == "no_provider_available" and decision.winner is None


def test_reasons_use_plain_words_and_never_claim_an_unknown_latency():
    # Every latency unknown (no provider answered its ping in time): fast orders by charge
    # and says so; the reason never prints Python's None or True.
    quotes = [
        quote("a", 300, None, live=False),
        quote("b", 100, None, live=False),
        quote("c", 200, None, live=False),
    ]
    decision = run(quotes, "fast")
    assert order(decision) == ["b", "c", "a"]
    assert "lowest estimated latency" not in decision.reason
    assert "no latency known, so lowest estimated charge" in decision.reason
    assert "estimated latency unknown" in decision.reason and "not live" in decision.reason
    assert "None" not in decision.reason and "live=" not in decision.reason
    # One known latency is a real comparison again.
    known = run([*quotes[:2], quote("c", 200, 30)], "fast")
    assert order(known)[0] == "c" and "lowest estimated latency" in known.reason
    assert "estimated latency 30 ms, live)" in known.reason


# -- exact costs: the rounded estimates tie, the providers' costs do not --------------------

# A small request (the job's estimated input and max_output_tokens), and two offerings whose
# worst cases both round up to 1 micro-USD: "lean" costs 0.2 micro-USD before the markup
# (0.23 with it), "plump" 0.7 (0.805), so "lean" is truly the cheaper one.
SMALL_REQUEST = {"estimated_input_tokens": 10, "max_output_tokens": 5}
PRICES = {"lean": (10_000, 20_000), "plump": (40_000, 60_000)}


def priced(provider: str, latency: int) -> Quote:
    price_in, price_out = PRICES[provider]
    return dataclasses.replace(
        quote(provider, 0, latency),
        input_price_micros_per_m=price_in,
        output_price_micros_per_m=price_out,
        estimated_charge_micros=estimated_charge(
            SMALL_REQUEST["estimated_input_tokens"],
            SMALL_REQUEST["max_output_tokens"],
            price_in,
            price_out,
            Decimal("0.15"),
        ),
    )


def run_small(quotes: list[Quote], profile: str, **kwargs: Any) -> Decision:
    return select(
        quotes,
        profile=profile,
        strategy="lowest_cost",
        max_price_micros=None,
        max_latency_ms=None,
        weights=WEIGHTS,
        **SMALL_REQUEST,
        **kwargs,
    )


def test_economy_ranks_by_the_exact_cost_when_the_rounded_estimates_tie():
    # "plump" is faster: on the rounded estimates alone the tie would go to it on latency.
    lean, plump = priced("lean", 80), priced("plump", 10)
    assert lean.estimated_charge_micros == plump.estimated_charge_micros == 1
    for quotes in ([lean, plump], [plump, lean]):
        decision = run_small(quotes, "economy")
        assert order(decision) == ["lean", "plump"]
        # The stored estimate is still the rounded one (app/money.py's one rule).
        assert "estimated charge 1 micro-USD" in decision.reason


def test_economy_exact_costs_never_reorder_distinct_rounded_estimates():
    # Rounding up keeps the order, so the exact cost only breaks ties.
    lean, plump = priced("lean", 80), priced("plump", 10)
    dearer_lean = dataclasses.replace(lean, estimated_charge_micros=2)
    assert order(run_small([dearer_lean, plump], "economy")) == ["plump", "lean"]


def test_fast_breaks_latency_ties_by_the_exact_cost():
    lean, plump = priced("lean", 10), priced("plump", 10)
    # "plump" sorts first by name; the exact cost decides before the name does.
    renamed = dataclasses.replace(plump, provider="aplump")
    assert order(run_small([renamed, lean], "fast")) == ["lean", "aplump"]


def test_balanced_scores_use_the_exact_cost_ratio():
    lean, plump = priced("lean", 30), priced("plump", 10)
    # Exact: lean 0.2/0.7 of plump's cost. lean: 0.4*2/7 + 0.4*30/30 = 0.514286;
    # plump: 0.4*1 + 0.4*10/30 = 0.533333. (On the rounded estimates both costs would count
    # as 1 and plump, 0.533333 against lean's 0.8, would win.)
    decision = run_small([lean, plump], "balanced")
    assert [(r.quote.provider, r.score) for r in decision.ranked] == [
        ("lean", "0.514286"),
        ("plump", "0.533333"),
    ]
    # Reproducible from what is stored: the quotes as JSON and the job's token counts.
    stored = [Quote.from_dict(json.loads(json.dumps(q.to_dict()))) for q in (lean, plump)]
    assert run_small(stored, "balanced").to_dict() == decision.to_dict()
