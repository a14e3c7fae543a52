import math

import pytest
from opacus.accountants import RDPAccountant

from common.privacy import PrivacyLedger, epsilon, user_level_history, user_level_noise


def _opacus(history, delta):
    accountant = RDPAccountant()
    accountant.history = list(history)
    return accountant.get_epsilon(delta)


def test_epsilon_is_opacus_rdp_for_the_same_history():
    history = [(2.0, 1.0, 5), (1.1, 0.06, 30)]
    assert epsilon(history, 1e-5) == pytest.approx(_opacus(history, 1e-5))
    assert epsilon([], 1e-5) == 0.0 and epsilon([(0.0, 0.1, 1)], 1e-5) == math.inf


def test_ledger_round_trips_and_refuses_over_budget():
    ledger = PrivacyLedger(budget=2.0, delta=1e-5)
    ledger.record([(1.0, 0.1, 10)])
    again = PrivacyLedger.from_bytes(ledger.to_bytes())
    assert again == ledger and again.spent == pytest.approx(_opacus([(1.0, 0.1, 10)], 1e-5))
    assert again.cost_after(1.0, 0.1, 10) > again.spent
    with pytest.raises(Exception, match="budget exhausted"):
        again.check(1.0, 0.1, 10_000)
    unlimited = PrivacyLedger.from_bytes(PrivacyLedger(math.inf, 1e-5).to_bytes())
    assert unlimited.budget == math.inf


@pytest.mark.parametrize("target", [1.0, 4.0, 8.0])
def test_user_level_noise_meets_its_target_tightly(target):
    sigma = user_level_noise(target, 1e-5, discovery_releases=3, sample_rate=0.06, rounds=5)
    spent = epsilon(user_level_history(sigma, 3, sigma, 0.06, 5), 1e-5)
    assert spent <= target and spent > 0.97 * target


def test_epsilon_of_a_long_release_history_is_exact_and_fast():
    """A persona lineage is one event per release; equal events compose by adding steps, so the result is
    Opacus' for the merged history, in about the time of one evaluation."""
    import time

    history = [(1.0, 1.0, 1)] + [(1.0, 0.2, 1)] * 30 + [(1.0, 1.0, 1)] + [(1.0, 0.2, 1)] * 30
    start = time.perf_counter()
    eps = epsilon(history, 1e-5)
    assert time.perf_counter() - start < 2.0
    assert eps == pytest.approx(_opacus([(1.0, 1.0, 2), (1.0, 0.2, 60)], 1e-5))
