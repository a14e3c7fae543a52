import numpy as np
import pytest

from common.metrics import attack_advantage, attack_auc, mae, rmse


def test_rating_errors():
    assert rmse([1, 3], [2, 5]) == pytest.approx(np.sqrt(2.5)) and mae([1, 3], [2, 5]) == pytest.approx(1.5)


def test_attack_metrics_separate_perfect_chance_and_inverted_attacks():
    assert attack_auc([3, 4, 5], [0, 1, 2]) == 1.0 and attack_advantage([3, 4, 5], [0, 1, 2]) == 1.0
    assert attack_auc([0, 1, 2], [3, 4, 5]) == 0.0
    assert attack_auc([1, 1], [1, 1]) == 0.5 and attack_advantage([1, 1], [1, 1]) == 0.0
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=2000), rng.normal(size=2000)
    assert attack_auc(a, b) == pytest.approx(0.5, abs=0.03) and attack_advantage(a, b) < 0.08
    assert attack_auc(a + 1, b) == pytest.approx(0.76, abs=0.03)  # Phi(1/sqrt(2))
