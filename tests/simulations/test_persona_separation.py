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
