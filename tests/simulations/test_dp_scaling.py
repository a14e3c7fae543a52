"""The DP scaling table: sigma meets the target epsilon, and the population it names reaches the ratio it names."""

import math

import pytest

from common.privacy import epsilon, user_level_history
from simulations.dp_scaling import ADAPTERS, population_for, row


def test_row_sigma_spends_the_target_and_ratio_falls_with_population():
    small = row(1_000, 4, 0.06, 8.0, 1e-5, 20, 5)
    large = row(100_000, 4, 0.06, 8.0, 1e-5, 20, 5)
    spent = epsilon(user_level_history(small["sigma"], 5, small["sigma"], 0.06, 20), 1e-5)
    assert spent == pytest.approx(8.0, rel=1e-3)
    assert small["sigma"] == pytest.approx(large["sigma"])  # fixed q: sigma does not depend on the population
    d = ADAPTERS["rank 8, q+v (default)"]
    assert small["ratio[rank 8, q+v (default)]"] == pytest.approx(small["sigma"] * math.sqrt(d) / (0.06 * 250))
    assert large["ratio[rank 8, q+v (default)]"] == pytest.approx(small["ratio[rank 8, q+v (default)]"] / 100)


def test_population_for_reaches_the_target_ratio():
    d = ADAPTERS["rank 1, v only"]
    n = population_for(1.0, 4, 0.06, 8.0, 1e-5, 20, 5, d)
    assert row(n, 4, 0.06, 8.0, 1e-5, 20, 5)["ratio[rank 1, v only]"] <= 1.0
    assert row(n - 50, 4, 0.06, 8.0, 1e-5, 20, 5)["ratio[rank 1, v only]"] > 1.0
