"""The persona-separation measurement finds planted taste groups, and its payoff model sees planted group effects."""

import numpy as np
import pandas as pd

from common.data import MovieLens
from simulations.persona_separation import (discovery_noise_std, genre_deviations, lloyd, persona_errors, run,
                                            separation)

GENRES = ("Action", "Comedy", "Drama", "Horror")


def _planted(n_users: int = 60, n_items: int = 80, seed: int = 0) -> tuple[MovieLens, np.ndarray]:
    """Three taste groups: each loves one genre (+1.5) and hates another (-1.5) relative to the user's own mean."""
    rng = np.random.default_rng(seed)
    items = pd.DataFrame({"title": [f"m{i}" for i in range(n_items)], "year": pd.array([1990] * n_items, "Int64"),
                          "genres": [(GENRES[i % 4],) for i in range(n_items)]}, index=pd.RangeIndex(n_items))
    group = np.arange(n_users) % 3
    taste = np.array([[1.5, -1.5, 0, 0], [0, 1.5, -1.5, 0], [-1.5, 0, 1.5, 0]])
    rows = []
    for u in range(n_users):
        mean = rng.uniform(2.8, 3.6)
        for t, i in enumerate(rng.choice(n_items, 40, replace=False)):
            r = mean + taste[group[u], i % 4] + rng.normal(0, 0.4)
            rows.append((u, int(i), float(np.clip(np.rint(r), 1, 5)), t))
    ratings = pd.DataFrame(rows, columns=["user", "item", "rating", "ts"])
    users = pd.DataFrame({"age": 30, "gender": "F", "occupation": "writer"}, index=pd.RangeIndex(n_users))
    return MovieLens("planted", ratings, items, users), group


def _adjusted_agreement(a: np.ndarray, b: np.ndarray) -> bool:
    """Same partition up to relabelling."""
    return all(len(set(a[b == c])) == 1 for c in np.unique(b)) and len(set(a)) == len(set(b))


def test_lloyd_on_genre_deviations_recovers_planted_groups_and_random_does_not_separate():
    data, group = _planted()
    users = np.arange(60)
    x = genre_deviations(data.ratings, data.items, users)
    recovered = [_adjusted_agreement(lloyd(x, users, 3, iters=10, seed=s), group) for s in range(5)]
    assert sum(recovered) >= 3, recovered  # random-partition starts can merge two groups now and then
    assert separation(x, group) > 0.6
    random_sep = np.mean([separation(x, np.random.default_rng(s).integers(0, 3, 60)) for s in range(10)])
    assert random_sep < 0.15


def test_persona_terms_pay_for_planted_groups_and_not_for_random_ones():
    data, group = _planted()
    train = data.ratings[data.ratings["ts"] < 30].reset_index(drop=True)
    test = data.ratings[data.ratings["ts"] >= 30].reset_index(drop=True)
    one = persona_errors(train, test, data.items, {u: 0 for u in range(60)}, warm=True, level="genre").mean()
    true = persona_errors(train, test, data.items, dict(enumerate(group)), warm=True, level="genre").mean()
    rng = np.random.default_rng(1)
    rand = persona_errors(train, test, data.items, dict(enumerate(rng.integers(0, 3, 60))), warm=True,
                          level="genre").mean()
    assert true < 0.6 * one  # the planted taste is most of the signal beyond user + item bias
    assert rand > true


def test_run_reports_every_grouping_and_k_on_the_same_users():
    data, _ = _planted()
    rows = run("default", ks=(2, 3), seeds=2, iters=6, groupings=("genre-deviation", "random"), data=data)
    assert [(r["grouping"], r["k"]) for r in rows] == [("one persona", 1), ("genre-deviation", 2),
                                                       ("genre-deviation", 3), ("random", 2), ("random", 3),
                                                       ("each user", 60)]
    assert len({r["test_ratings"] for r in rows}) == 1
    by = {(r["grouping"], r["k"]): r for r in rows}
    assert by[("genre-deviation", 3)]["separation"] > by[("random", 3)]["separation"] + 0.3
    assert by[("genre-deviation", 3)]["rmse_warm_genre"] < by[("one persona", 1)]["rmse_warm_genre"]


def test_private_discovery_uses_the_coordinators_noise_and_drowns_under_too_much_of_it():
    # the noise follows the accountant: less epsilon, more noise; it does not depend on the data
    assert 0 < discovery_noise_std(8.0, 943, 4, 4, 5, 0.06) < discovery_noise_std(1.0, 943, 4, 4, 5, 0.06)
    data, group = _planted()
    users = np.arange(60)
    x = genre_deviations(data.ratings, data.items, users)
    light = np.mean([separation(x, lloyd(x, users, 3, iters=10, seed=s, noise_std=0.05)) for s in range(5)])
    heavy = np.mean([separation(x, lloyd(x, users, 3, iters=10, seed=s, noise_std=50.0)) for s in range(5)])
    assert light > 0.5 and heavy < light - 0.2, (light, heavy)
    rows = run("default", ks=(3,), seeds=2, iters=6, groupings=("genre-deviation", "random"), data=data,
               dp_epsilon=8.0)
    private = [r for r in rows if r["grouping"] == "genre-deviation, user-level DP ε=8"]
    assert len(private) == 1 and 1 <= private[0]["non_empty"] <= 3
    assert all(s["noise_std"] == discovery_noise_std(8.0, 60, 3, 6, 5, 0.06) for s in private[0]["seeds"])
    assert not any("random, user-level" in r["grouping"] for r in rows)


def test_on_the_mf_base_user_factors_carry_the_planted_taste_and_cold_users_still_gain_from_personas():
    """`--base mf`: MF's own user factors capture a low-rank group taste, so a persona term on top of warm MF
    gains far less than on top of the bias model; for cold users (MF's item half alone) true groups still pay."""
    from simulations.persona_separation import mf_bases

    data, group = _planted()
    data = MovieLens("planted", data.ratings.assign(item=data.ratings["item"] + 1),
                     data.items.set_axis(data.items.index + 1), data.users)  # MovieLens ids start at 1
    train = data.ratings[data.ratings["ts"] < 30].reset_index(drop=True)
    test = data.ratings[data.ratings["ts"] >= 30].reset_index(drop=True)
    bases = mf_bases(train, test, int(data.items.index.max()), rounds=60, reg=0.05, prior=0.0, rank=4)
    true, one = dict(enumerate(group)), {u: 0 for u in range(60)}

    def mse(persona, warm, b=None):
        return persona_errors(train, test, data.items, persona, warm, "genre", b).mean()
    # warm MF alone beats warm user+item bias: its user factors hold the taste
    assert mse(one, True, bases) < 0.8 * mse(one, True)
    gain_bias = mse(one, True) - mse(true, True)
    gain_mf = mse(one, True, bases) - mse(true, True, bases)
    assert gain_mf < 0.5 * gain_bias
    assert mse(true, False, bases) < 0.8 * mse(one, False, bases)  # no user factors: the group term pays
    # warm training predictions are out of fold (as a device's training targets): further from the ratings than
    # the in-sample fit, which has absorbed part of each rating's own residual
    from argparse import Namespace

    from common.item_factors import fit_user, predict
    from simulations.item_factors import federate

    model, _ = federate(train, int(data.items.index.max()), 60, 0.0, Namespace(rank=4, lr=0.02, bound=1.0), 0, 0.05)
    in_sample = np.concatenate([predict(fit_user(g["item"].to_numpy(), g["rating"].to_numpy(), model, 0.05),
                                        g["item"].to_numpy(), model) for _, g in train.groupby("user")])
    by_user = np.concatenate([g["rating"].to_numpy() for _, g in train.groupby("user")])
    order = np.concatenate([g.index.to_numpy() for _, g in train.groupby("user")])
    warm_train = bases[True][0][order]
    assert np.mean((warm_train - by_user) ** 2) > 1.1 * np.mean((in_sample - by_user) ** 2)
