"""simulations.rescore's choice of users and of a weight above 1 (the rescoring itself runs on a real federation in
test_federated.py)."""

import numpy as np
import pytest
import pandas as pd
from hypothesis import given, settings
from hypothesis import strategies as st

from simulations.rescore import cold_users, kept_ratings


@settings(max_examples=60, deadline=None)
@given(counts=st.lists(st.integers(0, 15), min_size=1, max_size=6), n=st.integers(1, 8), newest=st.booleans(),
       seed=st.integers(0, 2**16))
def test_a_simulated_cold_start_user_keeps_exactly_their_n_oldest_or_newest_ratings(counts, n, newest, seed):
    # rows in any order, timestamps with ties (broken by item, as the split breaks them)
    rng = np.random.default_rng(seed)
    fit = pd.DataFrame({"user": np.repeat(np.arange(len(counts)), counts), "ts": rng.integers(0, 4, sum(counts)),
                        "item": rng.permutation(sum(counts)) + 1}).sample(frac=1.0, random_state=seed)
    chosen = list(range(0, len(counts), 2))
    kept = kept_ratings(fit, chosen, n, newest)
    assert set(kept["user"]) == {u for u in chosen if counts[u]}
    for u in chosen:
        own = sorted(fit[fit["user"] == u][["ts", "item"]].itertuples(index=False))
        expected = own[-n:] if newest else own[:n]
        assert sorted(kept[kept["user"] == u][["ts", "item"]].itertuples(index=False)) == expected


@settings(max_examples=60, deadline=None)
@given(counts=st.lists(st.integers(0, 40), min_size=1, max_size=12), threshold=st.integers(1, 30),
       absent=st.lists(st.integers(100, 110), max_size=3, unique=True))
def test_cold_users_are_exactly_those_under_the_threshold(counts, threshold, absent):
    # users 0..n-1 hold counts[u] training ratings; users 100+ hold none (they are cold too)
    fit = pd.DataFrame({"user": np.repeat(np.arange(len(counts)), counts)})
    users = list(range(len(counts))) + absent
    cold = cold_users(fit, users, threshold)
    assert list(cold) == [u for u in users if (counts[u] if u < len(counts) else 0) < threshold]


def _run(seed, k, persona, who, y, refs):
    return {"run": f"r{k}-{seed}", "seed": seed, "who": who, "y": y, "persona": persona, "cold": np.ones(len(y), bool),
            "k": k, "sizes": [len(np.unique(who))] + [0] * (k - 1), "reported": float("nan"), **refs}


def test_runs_of_two_persona_counts_are_pooled_per_count_then_paired():
    """Seeds of one K are pooled per user; K=4 is then paired with K=1 on the same users, and the references
    (here item bias only and the private base) are paired with item bias only."""
    from simulations.centralised import paired_vs
    from simulations.rescore import PRIVATE_BASE, table

    rng = np.random.default_rng(0)
    who = np.repeat(np.arange(30), 4)
    y = rng.integers(1, 6, len(who)).astype(float)
    refs = {"global mean": np.full(len(y), 3.5), "item bias only": y + rng.normal(0, 1.0, len(y))}
    k1 = [_run(s, 1, y + rng.normal(0, 0.8, len(y)), who, y, {**refs, PRIVATE_BASE: y + rng.normal(0, 0.9, len(y))})
          for s in (0, 1)]
    k4 = [_run(s, 4, y + rng.normal(0, 0.5, len(y)), who, y, {**refs, PRIVATE_BASE: y + rng.normal(0, 0.9, len(y))})
          for s in (0, 1, 2)]
    text = table(k1 + k4)
    assert "K=1, over the 2 runs" in text and "K=4, over the 3 runs" in text
    err = lambda runs: np.mean([(r["persona"] - y) ** 2 for r in runs], axis=0)  # noqa: E731
    d = paired_vs(err(k4), err(k1), who)
    assert f"| K=4 | 3 vs 2 | {d[0]:+.4f} [{d[1]:+.4f}, {d[2]:+.4f}] |" in text and d[0] < 0
    base = np.mean([(r[PRIVATE_BASE] - y) ** 2 for r in k1 + k4], axis=0)
    d = paired_vs(base, (refs["item bias only"] - y) ** 2, who)
    assert f"| {PRIVATE_BASE} | {d[0]:+.4f} [{d[1]:+.4f}, {d[2]:+.4f}] |" in text
    # one K: pooled without a K label, no K pairing
    single = table(k1)
    assert "| over the 2 runs (each user's squared error averaged), cold-start users only |" in single
    assert "paired with K=" not in single and "K=1, over" not in single


def test_runs_with_and_without_a_population_centre_are_grouped_and_paired_adapters_and_bases():
    """K=1 runs whose MF releases differ in the centre: pooled per centre, the centre's group paired with the one
    without, for the adapters and for the private bases; runs that all share one setting keep the plain labels."""
    from simulations.centralised import paired_vs
    from simulations.rescore import PRIVATE_BASE, table

    rng = np.random.default_rng(1)
    who = np.repeat(np.arange(25), 3)
    y = rng.integers(1, 6, len(who)).astype(float)
    refs = {"global mean": np.full(len(y), 3.5), "item bias only": y + rng.normal(0, 1.0, len(y))}
    plain = [{**_run(s, 1, y + rng.normal(0, 0.9, len(y)), who, y,
                     {**refs, PRIVATE_BASE: y + rng.normal(0, 1.0, len(y))}), "centre": False} for s in (0, 1)]
    centred = [{**_run(s, 1, y + rng.normal(0, 0.6, len(y)), who, y,
                       {**refs, PRIVATE_BASE: y + rng.normal(0, 0.7, len(y))}), "centre": True} for s in (0, 1, 2)]
    text = table(centred + plain)  # order given does not matter: the run without the centre is the reference
    assert "K=1, no centre, over the 2 runs" in text and "K=1, population centre, over the 3 runs" in text
    assert "| persona adapters, paired with K=1, no centre |" in text
    err = lambda runs, key="persona": np.mean([(r[key] - y) ** 2 for r in runs], axis=0)  # noqa: E731
    d = paired_vs(err(centred), err(plain), who)
    assert f"| K=1, population centre | 3 vs 2 | {d[0]:+.4f} [{d[1]:+.4f}, {d[2]:+.4f}] |" in text and d[0] < 0
    d = paired_vs(err(centred, PRIVATE_BASE), err(plain, PRIVATE_BASE), who)
    assert f"| {PRIVATE_BASE}: K=1, population centre | 3 vs 2 | {d[0]:+.4f} [{d[1]:+.4f}, {d[2]:+.4f}] |" in text
    same = table(centred)
    assert "centre" not in same and "paired with" not in same.split("RMSE on the same ratings")[0]


def test_runs_from_the_public_warm_start_are_paired_with_runs_from_a_fresh_adapter():
    """K=1 runs that differ only in `warm-start`: pooled per start, the warm-started group paired with the fresh
    one on the same users (the reference, whatever order the runs are given in)."""
    from simulations.centralised import paired_vs
    from simulations.rescore import PRIVATE_BASE, table

    rng = np.random.default_rng(2)
    who = np.repeat(np.arange(20), 5)
    y = rng.integers(1, 6, len(who)).astype(float)
    refs = {"global mean": np.full(len(y), 3.5), "item bias only": y + rng.normal(0, 1.0, len(y)),
            PRIVATE_BASE: y + rng.normal(0, 0.8, len(y))}
    fresh = [{**_run(s, 1, y + rng.normal(0, 0.8, len(y)), who, y, refs), "centre": True, "warm": False}
             for s in (0, 1, 2)]
    warm = [{**_run(s, 1, y + rng.normal(0, 0.5, len(y)), who, y, refs), "centre": True, "warm": True}
            for s in (0, 1, 2)]
    text = table(warm + fresh)
    assert "K=1, fresh start, over the 3 runs" in text and "K=1, public warm start, over the 3 runs" in text
    assert "| persona adapters, paired with K=1, fresh start |" in text and "centre" not in text
    err = lambda runs: np.mean([(r["persona"] - y) ** 2 for r in runs], axis=0)  # noqa: E731
    d = paired_vs(err(warm), err(fresh), who)
    assert f"| K=1, public warm start | 3 vs 3 | {d[0]:+.4f} [{d[1]:+.4f}, {d[2]:+.4f}] |" in text and d[0] < 0


@settings(max_examples=60, deadline=None)
@given(scale=st.floats(0.1, 6.0), dd=st.lists(st.floats(0.01, 10.0), min_size=1, max_size=8),
       absent=st.lists(st.integers(100, 110), max_size=3))
def test_a_weight_above_1_is_the_pooled_validation_ratio_of_the_chosen_users_only(scale, dd, absent):
    """`--unclipped-weight`: pooled over the chosen users' validation sums, the weight is their ratio, above 1 when
    the adapters move too little toward the ratings; users without validation ratings (absent from the sums) add
    nothing, and users not chosen are ignored however far off."""
    from simulations.rescore import pooled_weight

    sums = {u: (scale * d, d) for u, d in enumerate(dd)}
    sums[99] = (-50.0, 1.0)  # someone else's sums, pulling the other way
    assert pooled_weight(sums, [*range(len(dd)), *absent]) == pytest.approx(scale, rel=1e-9)
    assert pooled_weight(sums, [99]) == 0.0  # a negative ratio is no weight, as served
    assert pooled_weight(sums, absent) == 0.0
