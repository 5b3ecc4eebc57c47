"""app/catalog.py: loading the TOML catalog into the database and reading it back.

Every test runs in a rolled-back transaction (``db_session``). ``load_catalog`` disables whatever
the file does not name, including the session catalog other tests use; the rollback undoes that.
Names carry a per-test suffix so that rows left by other tests never collide.
"""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from app.catalog import LoadReport, find_model, load_catalog
from app.models import ModelAlias, Offering, Provider


@pytest.fixture
def tag() -> str:
    return uuid.uuid4().hex[:8]


def provider_toml(name: str, base_url: str, **extra: str) -> str:
    lines = ["[[providers]]", f'name = "{name}"', f'base_url = "{base_url}"']
    lines += [f"{k} = {v}" for k, v in extra.items()]
    return "\n".join(lines) + "\n\n"


def model_toml(alias: str, max_out: int = 1024, context: int = 8192, **extra: str) -> str:
    lines = [
        "[[models]]",
        f'alias = "{alias}"',
        f"max_output_tokens = {max_out}",
        f"context_length = {context}",
    ]
    lines += [f"{k} = {v}" for k, v in extra.items()]
    return "\n".join(lines) + "\n\n"


def offering_toml(model: str, provider: str, price_in: str, price_out: str, **extra: str) -> str:
    lines = [
        "[[offerings]]",
        f'model = "{model}"',
        f'provider = "{provider}"',
        f'provider_model_id = "{provider}/{model}"',
        f"input_price_usd_per_million = {price_in}",
        f"output_price_usd_per_million = {price_out}",
    ]
    lines += [f"{k} = {v}" for k, v in extra.items()]
    return "\n".join(lines) + "\n\n"


def write(tmp_path: Path, text: str, name: str = "catalog.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def provider(session: Session, name: str) -> Provider | None:
    return session.scalar(select(Provider).where(Provider.name == name))


def alias_row(session: Session, alias: str) -> ModelAlias | None:
    return session.scalar(select(ModelAlias).where(ModelAlias.alias == alias))


def offering(session: Session, alias: str, name: str) -> Offering | None:
    return session.scalar(
        select(Offering)
        .join(ModelAlias, ModelAlias.id == Offering.alias_id)
        .join(Provider, Provider.id == Offering.provider_id)
        .where(ModelAlias.alias == alias, Provider.name == name)
    )


def test_load_creates_providers_models_and_offerings_with_exact_prices(db_session, tmp_path, tag):
    p1, p2, m1, m2 = f"p1-{tag}", f"p2-{tag}", f"m1-{tag}", f"m2-{tag}"
    path = write(
        tmp_path,
        provider_toml(p1, "http://127.0.0.1:9001/v1/", api_key_env='"P1_KEY"')
        + provider_toml(p2, "http://127.0.0.1:9002/v1")
        + model_toml(m1, 4096, 16384)
        + model_toml(m2, 2048, 8192)
        + offering_toml(m1, p1, '"0.05"', '"0.08"')
        + offering_toml(m1, p2, '"0.123456"', '"12.5"')
        # TOML numbers are accepted too: a float keeps its shortest text, an int is whole USD.
        + offering_toml(m2, p2, "0.18", "2"),
    )

    report = load_catalog(db_session, path)

    # P1_KEY is not in the test environment: the load says so, and goes ahead.
    assert report == LoadReport(
        providers=2,
        models=2,
        offerings=3,
        warnings=(
            f"provider {p1}: api_key_env P1_KEY is not set in this environment; the workers "
            "need it, or the provider is called without a key",
        ),
    )
    row = provider(db_session, p1)
    assert (row.base_url, row.api_key_env, row.enabled) == (
        "http://127.0.0.1:9001/v1",
        "P1_KEY",
        True,
    )
    assert provider(db_session, p2).api_key_env is None
    assert (
        alias_row(db_session, m1).max_output_tokens,
        alias_row(db_session, m1).context_length,
    ) == (
        4096,
        16384,
    )
    prices = {
        (a, p): (o.input_price_micros_per_m, o.output_price_micros_per_m, o.provider_model_id)
        for a, p in [(m1, p1), (m1, p2), (m2, p2)]
        for o in [offering(db_session, a, p)]
    }
    assert prices == {
        (m1, p1): (50_000, 80_000, f"{p1}/{m1}"),
        (m1, p2): (123_456, 12_500_000, f"{p2}/{m1}"),
        (m2, p2): (180_000, 2_000_000, f"{p2}/{m2}"),
    }


def test_find_model_returns_enabled_offerings_sorted_by_provider(db_session, tmp_path, tag):
    on_b, on_a, off_provider, off_offering = (
        f"b-{tag}",
        f"a-{tag}",
        f"c-disabled-{tag}",
        f"d-offering-off-{tag}",
    )
    alias = f"m-{tag}"
    path = write(
        tmp_path,
        provider_toml(on_b, "http://b/v1")
        + provider_toml(on_a, "http://a/v1", api_key_env='"A_KEY"')
        + provider_toml(off_provider, "http://c/v1", enabled="false")
        + provider_toml(off_offering, "http://d/v1")
        + model_toml(alias, 512, 2048)
        + offering_toml(alias, on_b, '"0.2"', '"0.3"')
        + offering_toml(
            alias, on_a, '"0.1"', '"0.4"', expected_ttft_ms="120", expected_tokens_per_s="85.5"
        )
        + offering_toml(alias, off_provider, '"0.01"', '"0.01"')
        + offering_toml(alias, off_offering, '"0.01"', '"0.01"', enabled="false"),
    )
    load_catalog(db_session, path)

    entry = find_model(db_session, alias)

    assert entry is not None
    assert (entry.alias, entry.max_output_tokens, entry.context_length) == (alias, 512, 2048)
    assert [o.provider for o in entry.options] == [on_a, on_b]
    a = entry.options[0]
    assert a.offering_id == offering(db_session, alias, on_a).id
    assert a.as_message() == {
        "offering_id": a.offering_id,
        "provider": on_a,
        "base_url": "http://a/v1",
        "api_key_env": "A_KEY",
        "provider_model_id": f"{on_a}/{alias}",
        "input_price_micros_per_m": 100_000,
        "output_price_micros_per_m": 400_000,
        "expected_ttft_ms": 120,
        "expected_tokens_per_s": 85.5,
    }
    # Without priors: the conservative default applies (app/providers/speed.py).
    b = entry.options[1]
    assert (b.expected_ttft_ms, b.expected_tokens_per_s) == (None, None)


@pytest.mark.parametrize(
    "priors",
    [
        {"expected_ttft_ms": "-1"},
        {"expected_ttft_ms": "1.5"},
        {"expected_ttft_ms": "true"},
        {"expected_tokens_per_s": "0"},
        {"expected_tokens_per_s": '"fast"'},
        {"expected_tokens_per_s": "nan"},
    ],
)
def test_speed_priors_out_of_range_are_refused(db_session, tmp_path, tag, priors):
    alias = f"m-{tag}"
    path = write(
        tmp_path,
        provider_toml(f"p-{tag}", "http://p/v1")
        + model_toml(alias, 512, 2048)
        + offering_toml(alias, f"p-{tag}", '"0.1"', '"0.1"', **priors),
    )
    with pytest.raises(ValueError, match="expected_"):
        load_catalog(db_session, path)


def test_find_model_unknown_or_disabled_alias_is_none(db_session, tmp_path, tag):
    path = write(
        tmp_path,
        provider_toml(f"p-{tag}", "http://p/v1")
        + model_toml(f"off-{tag}", enabled="false")
        + model_toml(f"bare-{tag}"),
    )
    load_catalog(db_session, path, allow_empty=True)

    assert find_model(db_session, f"nope-{tag}") is None
    assert find_model(db_session, f"off-{tag}") is None
    # An enabled alias nobody offers is known, with no options.
    bare = find_model(db_session, f"bare-{tag}")
    assert bare is not None and bare.options == ()


def test_reload_disables_what_the_file_no_longer_names(db_session, tmp_path, tag):
    keep, gone, alias, dropped_alias = f"keep-{tag}", f"gone-{tag}", f"m-{tag}", f"old-{tag}"
    first = write(
        tmp_path,
        provider_toml(keep, "http://keep/v1")
        + provider_toml(gone, "http://gone/v1")
        + model_toml(alias)
        + model_toml(dropped_alias)
        + offering_toml(alias, keep, '"0.1"', '"0.1"')
        + offering_toml(alias, gone, '"0.1"', '"0.1"')
        + offering_toml(dropped_alias, keep, '"0.1"', '"0.1"'),
        "first.toml",
    )
    load_catalog(db_session, first)
    ids = {
        "gone_provider": provider(db_session, gone).id,
        "gone_offering": offering(db_session, alias, gone).id,
        "kept_offering": offering(db_session, alias, keep).id,
    }
    assert [o.provider for o in find_model(db_session, alias).options] == [gone, keep]

    second = write(
        tmp_path,
        provider_toml(keep, "http://keep-2/v1")
        + model_toml(alias)
        + offering_toml(alias, keep, '"0.2"', '"0.3"'),
        "second.toml",
    )
    load_catalog(db_session, second)
    db_session.expire_all()

    # Disabled, never deleted: old jobs keep their references.
    gone_row = provider(db_session, gone)
    assert gone_row is not None and gone_row.id == ids["gone_provider"]
    assert gone_row.enabled is False
    gone_offering = db_session.get(Offering, ids["gone_offering"])
    assert gone_offering is not None and gone_offering.enabled is False
    assert alias_row(db_session, dropped_alias).enabled is False
    assert offering(db_session, dropped_alias, keep).enabled is False

    # The kept offering is updated in place.
    kept = db_session.get(Offering, ids["kept_offering"])
    assert (kept.enabled, kept.input_price_micros_per_m, kept.output_price_micros_per_m) == (
        True,
        200_000,
        300_000,
    )
    assert provider(db_session, keep).base_url == "http://keep-2/v1"
    entry = find_model(db_session, alias)
    assert [o.provider for o in entry.options] == [keep]
    assert find_model(db_session, dropped_alias) is None

    # Naming it again re-enables the same row.
    load_catalog(db_session, first)
    db_session.expire_all()
    assert provider(db_session, gone).enabled is True
    assert db_session.get(Offering, ids["gone_offering"]).enabled is True


def test_load_disables_providers_from_other_catalogs(db_session, tmp_path, tag):
    other = f"other-{tag}"
    only = {"allow_empty": True}  # providers without offerings: nothing served, on purpose
    load_catalog(db_session, write(tmp_path, provider_toml(other, "http://o/v1"), "a.toml"), **only)
    assert provider(db_session, other).enabled is True
    load_catalog(
        db_session, write(tmp_path, provider_toml(f"mine-{tag}", "http://m/v1"), "b.toml"), **only
    )
    db_session.expire_all()
    assert provider(db_session, other).enabled is False
    enabled = db_session.scalars(select(Provider.name).where(Provider.enabled)).all()
    assert enabled == [f"mine-{tag}"]


def test_environment_variables_are_expanded(db_session, tmp_path, tag, monkeypatch):
    host_var, key_var, unset_var = f"CAT_HOST_{tag}", f"CAT_KEYVAR_{tag}", f"CAT_UNSET_{tag}"
    monkeypatch.setenv(host_var, "10.0.0.7:8000")
    monkeypatch.setenv(key_var, "PROVIDER_SECRET_ENV")
    monkeypatch.delenv(unset_var, raising=False)
    empty_var = f"CAT_EMPTY_{tag}"
    monkeypatch.setenv(empty_var, "")
    set_with_default, from_default, empty_with_default = f"s-{tag}", f"d-{tag}", f"e-{tag}"
    path = write(
        tmp_path,
        provider_toml(
            set_with_default,
            f"http://${{{host_var}:-localhost:1}}/v1",
            api_key_env=f'"${{{key_var}}}"',
        )
        + provider_toml(from_default, f"http://${{{unset_var}:-127.0.0.1:9999}}/v1")
        # Like the shell's ${VAR:-default}, an empty value takes the default.
        + provider_toml(empty_with_default, f"${{{empty_var}:-http://fallback/v1}}"),
    )
    load_catalog(db_session, path, allow_empty=True)

    row = provider(db_session, set_with_default)
    assert row.base_url == "http://10.0.0.7:8000/v1"
    assert row.api_key_env == "PROVIDER_SECRET_ENV"
    assert provider(db_session, from_default).base_url == "http://127.0.0.1:9999/v1"
    assert provider(db_session, empty_with_default).base_url == "http://fallback/v1"


def test_missing_environment_variable_without_default_is_an_error(
    db_session, tmp_path, tag, monkeypatch
):
    var = f"CAT_MISSING_{tag}"
    monkeypatch.delenv(var, raising=False)
    path = write(tmp_path, provider_toml(f"p-{tag}", f"http://${{{var}}}/v1"))
    with pytest.raises(ValueError, match=f"catalog needs environment variable {var}"):
        load_catalog(db_session, path)
    assert provider(db_session, f"p-{tag}") is None


@pytest.mark.parametrize(
    ("price", "message"),
    [
        ('"0.0000001"', "more than six decimal places"),
        ("0.1234567", "more than six decimal places"),
        ('"-0.01"', "price cannot be negative"),
        ('"cheap"', "not a decimal amount"),
        ('"NaN"', "not a finite amount"),
    ],
)
def test_invalid_price_is_rejected(db_session, tmp_path, tag, price, message):
    path = write(
        tmp_path,
        provider_toml(f"p-{tag}", "http://p/v1")
        + model_toml(f"m-{tag}")
        + offering_toml(f"m-{tag}", f"p-{tag}", '"0.1"', price),
    )
    with pytest.raises(ValueError, match=rf"offerings\[0\]: .*{message}"):
        load_catalog(db_session, path)


def test_offering_for_an_unknown_provider_is_rejected(db_session, tmp_path, tag):
    path = write(
        tmp_path,
        model_toml(f"m-{tag}") + offering_toml(f"m-{tag}", f"ghost-{tag}", '"0.1"', '"0.1"'),
    )
    with pytest.raises(ValueError, match=r"offerings\[0\]: unknown model or provider"):
        load_catalog(db_session, path)


@pytest.mark.parametrize(("max_out", "context"), [(0, 100), (100, 0)])
def test_non_positive_model_caps_are_rejected(db_session, tmp_path, tag, max_out, context):
    path = write(tmp_path, model_toml(f"m-{tag}", max_out, context))
    with pytest.raises(ValueError, match="caps must be positive"):
        load_catalog(db_session, path)


def test_model_cache_serves_repeats_from_memory_until_its_ttl(db_session, monkeypatch):
    from app import catalog as catalog_module
    from app.catalog import ModelCache

    calls = []
    real = catalog_module.find_model

    def counting(session, alias):
        calls.append(alias)
        return real(session, alias)

    monkeypatch.setattr(catalog_module, "find_model", counting)
    clock = [100.0]
    monkeypatch.setattr(catalog_module.time, "monotonic", lambda: clock[0])
    cache = ModelCache(ttl_s=5)
    first = cache.get(db_session, "no-such-model")
    assert first is None and cache.get(db_session, "no-such-model") is None
    assert calls == ["no-such-model"]
    clock[0] += 6
    cache.get(db_session, "no-such-model")
    assert calls == ["no-such-model", "no-such-model"]
    ModelCache(ttl_s=0).get(db_session, "no-such-model")
    assert len(calls) == 3


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ('[[providers]]\nname = "x"\nbase_url = "http://x/v1"\nenable = false\n', "unknown keys"),
        ("[[provider]]\nname = 'x'\n", "unknown tables"),
        ("PROVIDERS_AND_A_DUPLICATE_OFFERING", "appears twice"),
        ("", "no enabled offering"),
    ],
    ids=["misspelt-key", "misspelt-table", "duplicate-offering", "serves-nothing"],
)
def test_a_catalog_with_a_mistake_is_refused_and_changes_nothing(
    db_session, tmp_path, tag, text, error
):
    if text == "PROVIDERS_AND_A_DUPLICATE_OFFERING":
        text = (
            provider_toml(f"p-{tag}", "http://p/v1")
            + model_toml(f"m-{tag}")
            + offering_toml(f"m-{tag}", f"p-{tag}", "0.10", "0.20")
            + offering_toml(f"m-{tag}", f"p-{tag}", "0.10", "0.20")
        )
    before = db_session.scalars(select(Provider.name).where(Provider.enabled)).all()
    with pytest.raises(ValueError, match=error):
        load_catalog(db_session, write(tmp_path, text))
    db_session.rollback()
    assert db_session.scalars(select(Provider.name).where(Provider.enabled)).all() == before


def test_a_models_default_max_tokens_is_loaded_or_derived_from_its_cap(db_session, tmp_path, tag):
    p, small, large, set_ = f"p-{tag}", f"small-{tag}", f"large-{tag}", f"set-{tag}"
    path = write(
        tmp_path,
        provider_toml(p, "http://127.0.0.1:9001/v1")
        + model_toml(small, 1024, 8192)
        + model_toml(large, 128000, 131072)
        + model_toml(set_, 8192, 32768, default_max_tokens="512")
        + "".join(offering_toml(m, p, '"0.1"', '"0.1"') for m in (small, large, set_)),
    )
    load_catalog(db_session, path)
    defaults = {m: find_model(db_session, m).default_max_tokens for m in (small, large, set_)}  # type: ignore[union-attr]
    # Absent: the smaller of 4,096 and the cap (docs/api.md); set: as written.
    assert defaults == {small: 1024, large: 4096, set_: 512}


@pytest.mark.parametrize("value", ["0", "9000", "true", '"512"', "1.5"])
def test_a_default_max_tokens_outside_the_models_cap_fails_the_load(
    db_session, tmp_path, tag, value
):
    p, m = f"p-{tag}", f"m-{tag}"
    path = write(
        tmp_path,
        provider_toml(p, "http://127.0.0.1:9001/v1")
        + model_toml(m, 8192, 32768, default_max_tokens=value)
        + offering_toml(m, p, '"0.1"', '"0.1"'),
    )
    with pytest.raises(ValueError, match="default_max_tokens"):
        load_catalog(db_session, path)
