"""`flwr run .` reads its settings from pyproject.toml; they must be the ones the code documents."""

import tomllib
from dataclasses import replace
from pathlib import Path

from common.config import FederationConfig

ROOT = Path(__file__).resolve().parents[1]


def test_flower_app_config_matches_the_dataclass_defaults():
    flwr = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]
    cfg = FederationConfig.from_run_config(flwr["app"]["config"])
    assert replace(cfg, out_dir=FederationConfig().out_dir) == FederationConfig()
    assert flwr["app"]["components"] == {"serverapp": "server.server_app:app", "clientapp": "client.client_app:app"}


def test_unknown_run_config_key_is_refused():
    import pytest

    with pytest.raises(ValueError, match="unknown run-config keys"):
        FederationConfig.from_run_config({"num-round": 3})


def test_bad_aggregation_settings_are_refused_with_the_reason():
    import pytest

    with pytest.raises(ValueError, match="aggregation must be one of"):
        FederationConfig.from_run_config({"aggregation": "krum"})
    with pytest.raises(ValueError, match="trim-fraction"):
        FederationConfig.from_run_config({"aggregation": "trimmed-mean", "trim-fraction": 0.5})
    with pytest.raises(ValueError, match="user-level DP"):
        FederationConfig.from_run_config({"aggregation": "median", "dp-user-noise": 1.0})


def test_persona_candidates_need_three_ks_and_two_kmeans_iterations():
    import pytest

    cfg = FederationConfig.from_run_config({"persona-candidates": "4, 1,2,2", "kmeans-iters": 3})
    assert cfg.candidate_ks == [1, 2, 4]
    with pytest.raises(ValueError, match="at least three"):
        FederationConfig.from_run_config({"persona-candidates": "2,4"})
    with pytest.raises(ValueError, match="kmeans-iters >= 2"):
        FederationConfig.from_run_config({"persona-candidates": "1,2,4", "kmeans-iters": 1})


def test_negative_memory_items_are_refused():
    import pytest

    with pytest.raises(ValueError, match="memory-items"):
        FederationConfig.from_run_config({"memory-items": -1})


def test_personal_lr_zero_follows_lr_and_bad_values_are_refused():
    import pytest

    assert FederationConfig.from_run_config({"lr": 0.01, "personal-lr": 0.0}).personal_train().lr == 0.01
    assert FederationConfig.from_run_config({"lr": 0.01, "personal-lr": 3e-4}).personal_train().lr == 3e-4
    for bad in (-1e-3, float("nan"), float("inf"), 2.0):
        with pytest.raises(ValueError, match="personal-lr"):
            FederationConfig.from_run_config({"personal-lr": bad})


def test_the_server_lr_schedule_must_be_a_known_one():
    import pytest

    from common.config import SERVER_LR_SCHEDULES

    for schedule in SERVER_LR_SCHEDULES:
        assert FederationConfig.from_run_config({"server-lr-schedule": schedule}).server_lr_schedule == schedule
    for bad in ("linear", "", "Cosine", 1):
        with pytest.raises(ValueError, match="server-lr-schedule"):
            FederationConfig.from_run_config({"server-lr-schedule": bad})


DP_POSITIVE = ("dp-device-clip", "dp-user-clip")


def _dp_value_is_valid(key: str, value: float) -> bool:
    import math

    if not math.isfinite(value):
        return False
    if key == "dp-delta":
        return 0.0 < value < 1.0
    return value > 0.0 if key in DP_POSITIVE else value >= 0.0


def test_every_dp_setting_refuses_nan_inf_and_out_of_range_values_naming_the_key():
    """NaN noise would compare as "off" (NaN > 0 is False) and silently train without DP; an infinite target or a
    delta >= 1 would be accounted as a guarantee it is not. Every DP field, every kind of float."""
    import pytest
    from hypothesis import given, settings
    from hypothesis import strategies as st

    from common.config import DP_NON_NEGATIVE

    keys = [k.replace("_", "-") for k in DP_NON_NEGATIVE] + list(DP_POSITIVE) + ["dp-delta"]
    values = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([0.0, -0.0, 1.0, 1e-5, 1e308]))

    @settings(max_examples=300, deadline=None)
    @given(key=st.sampled_from(keys), value=values)
    def check(key, value):
        if _dp_value_is_valid(key, value):
            cfg = FederationConfig.from_run_config({key: value})
            assert getattr(cfg, key.replace("-", "_")) == value
        else:
            with pytest.raises(ValueError, match=key):
                FederationConfig.from_run_config({key: value})

    check()
    # the silent case this guards: NaN noise must not turn DP off
    with pytest.raises(ValueError, match="dp-user-noise"):
        FederationConfig.from_run_config({"dp-user-noise": float("nan")})


def test_counts_and_rates_refuse_nan_zero_negative_and_wrong_types_naming_the_key():
    import pytest
    from hypothesis import given, settings
    from hypothesis import strategies as st

    minimum = {"num-rounds": 1, "num-personas": 1, "kmeans-iters": 1, "min-train-nodes": 1, "local-steps": 1,
               "personal-steps": 0, "rows-per-step": 1, "items-per-row": 1, "lora-rank": 1, "lora-alpha": 1,
               "eval-every": 1, "eval-users": 0, "cold-start-threshold": 0, "min-nodes": 1,
               "rollback-min-devices": 1, "device-keep-versions": 1}

    @settings(max_examples=200, deadline=None)
    @given(key=st.sampled_from(sorted(minimum)), value=st.integers(-2**70, 2**70))
    def integers(key, value):
        field = key.replace("-", "_")
        if value >= minimum[key]:
            assert getattr(FederationConfig(**{field: value}), field) == value
        else:
            with pytest.raises(ValueError, match=key):
                FederationConfig(**{field: value})

    @settings(max_examples=200, deadline=None)
    @given(key=st.sampled_from(["fraction-train", "lr", "rollback-margin", "blend-prior-devices"]),
           value=st.floats(allow_nan=True, allow_infinity=True))
    def rates(key, value):
        field = key.replace("-", "_")
        ok = 0 <= value < float("inf") if key in ("rollback-margin", "blend-prior-devices") else 0 < value <= 1
        if ok:
            assert getattr(FederationConfig(**{field: value}), field) == value
        else:
            with pytest.raises(ValueError, match=key):
                FederationConfig(**{field: value})

    integers()
    rates()
    for wrong in (2.5, "3", True, None):  # the dataclass itself, not only from_run_config's conversion
        with pytest.raises(ValueError, match="num-rounds"):
            FederationConfig(num_rounds=wrong)


def test_item_factor_settings_refuse_bad_values_and_combinations_naming_the_key():
    import pytest
    from hypothesis import given, settings
    from hypothesis import strategies as st

    on = {"item_stats": True, "item_factors_rounds": 3}

    @settings(max_examples=200, deadline=None)
    @given(key=st.sampled_from(["item-factors-reg", "item-factors-lr", "item-factors-clip"]),
           value=st.floats(allow_nan=True, allow_infinity=True))
    def positive(key, value):
        field = key.replace("-", "_")
        if 0 < value < float("inf"):
            assert getattr(FederationConfig(**on, **{field: value}), field) == value
        else:
            with pytest.raises(ValueError, match=key):
                FederationConfig(**on, **{field: value})

    @settings(max_examples=100, deadline=None)
    @given(value=st.floats(allow_nan=True, allow_infinity=True))
    def fraction(value):
        if 0 < value <= 1:
            assert FederationConfig(**on, item_factors_fraction=value).item_factors_fraction == value
        else:
            with pytest.raises(ValueError, match="item-factors-fraction"):
                FederationConfig(**on, item_factors_fraction=value)

    @settings(max_examples=100, deadline=None)
    @given(key=st.sampled_from(["item-factors-rounds", "item-factors-rank"]), value=st.integers(-2**70, 2**70))
    def counts(key, value):
        field = key.replace("-", "_")
        if value >= (0 if key == "item-factors-rounds" else 1):
            assert getattr(FederationConfig(item_stats=True, **{field: value}), field) == value
        else:
            with pytest.raises(ValueError, match=key):
                FederationConfig(item_stats=True, **{field: value})

    @settings(max_examples=100, deadline=None)
    @given(value=st.floats(allow_nan=True, allow_infinity=True))
    def prior(value):
        if 0 <= value < float("inf"):
            assert FederationConfig(**on, item_factors_prior=value).item_factors_prior == value
        else:
            with pytest.raises(ValueError, match="item-factors-prior"):
                FederationConfig(**on, item_factors_prior=value)

    positive()
    counts()
    prior()
    fraction()
    with pytest.raises(ValueError, match="needs item-stats"):  # the factors extend the released statistics
        FederationConfig(item_factors_rounds=2)
    # the rounds and the centre run through secure sums now (tests/simulations/test_secure_aggregation.py)
    both = FederationConfig(**on, secure_aggregation=True)
    assert both.secure_aggregation and both.item_factors_rounds == 3
    assert FederationConfig(**on).item_factors_rounds == 3
