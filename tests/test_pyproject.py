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
