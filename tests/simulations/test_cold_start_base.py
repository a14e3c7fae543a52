"""The cold-start base sweep chooses on validation only and scores what it says it scores."""

import json

import numpy as np
import pytest

from common.config import split_preset
from common.data import load_movielens
from common.item_factors import (ItemFactors, ItemFactorTrainer, contribution, fit_user, predict, release_arrays,
                                 zero_user)
from common.item_stats import contribution as stats_contribution, estimate
from common.split import temporal_split, validation_split
from server.serving import ITEM_FACTORS_FILE, ITEM_STATS_FILE
from simulations import cold_start_base
from simulations.centralised import paired_vs
from simulations.classical import ItemBias
from tests.conftest import make_data, write_grouplens_100k


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """What a federation with item factors and statistics leaves in its out-dir, from synthetic ratings: 24 users
    with 40 ratings and 6 cut to 15 (cold-start at a threshold of 15: 12 training ratings, 10 of them to fit)."""
    root = tmp_path_factory.mktemp("coldbase")
    ratings, items, users = make_data(n_users=30, n_items=40, per_user=40, seed=4)
    ratings = ratings[~((ratings["user"] > 24) & (ratings.groupby("user").cumcount() >= 15))]
    data_dir = write_grouplens_100k(root / "ml", ratings, items, users)
    out = root / "out"
    out.mkdir()
    config = {"dataset": str(data_dir), "split": "default", "validation_fraction": 0.2, "eval_users": 10,
              "eval_seed": 0, "cold_start_threshold": 15}
    (out / "history.json").write_text(json.dumps({"config": config}))
    data = load_movielens(str(data_dir))
    fit, _ = validation_split(temporal_split(data.ratings, split_preset("default")).train, 0.2)
    n_items = int(data.items.index.max())
    trainer = ItemFactorTrainer(ItemFactors.initial(n_items, 2, 0), lr=0.05)
    for _ in range(30):  # federated MF as the coordinator runs it, without noise
        grads = [contribution(g["item"].to_numpy(), g["rating"].to_numpy(), trainer.model, 0.1, 50.0)
                 for _, g in fit.groupby("user")]
        trainer.step({k: sum(g[k] for g in grads) for k in grads[0]}, float(len(fit)))
    np.savez(out / ITEM_FACTORS_FILE, **release_arrays(trainer.model, 0.1, 50.0))
    parts = [stats_contribution(g["item"].to_numpy(), g["rating"].to_numpy(), n_items) for _, g in fit.groupby("user")]
    stats = estimate(sum(p[0] for p in parts), sum(p[1] for p in parts), float(sum(p[2] for p in parts)))
    np.savez(out / ITEM_STATS_FILE, **stats.to_arrays())
    return out, data, trainer.model


def test_each_population_is_chosen_on_validation_and_scored_as_it_says(finished_run):
    out, data, model = finished_run
    result = cold_start_base.measure(out, keep=5)
    pops = result["populations"]
    assert set(pops) == {"real cold-start users", "simulated, oldest 5", "simulated, newest 5"}
    assert result["released prior"] == 50.0
    split = temporal_split(data.ratings, split_preset("default"))
    fit, val = validation_split(split.train, 0.2)
    cold = sorted(u for u, n in fit["user"].value_counts().items() if n < 15)
    real = pops["real cold-start users"]
    assert real["users"] == len(cold) == 6 and real["validation users"] == 6
    for p in pops.values():
        # the choice is the lowest validation RMSE; test RMSE never enters it
        assert p["chosen"] == min(p["validation rmse"], key=p["validation rmse"].get)
        assert set(p["validation rmse"]) == set(p["test rmse"]) and len(p["test rmse"]) == 14
    # recomputed by hand: classical item bias only on the cold users' validation ratings, the item half alone on test
    held = val[val["user"].isin(cold)]
    item_bias = ItemBias().fit(fit).predict(held["user"].to_numpy(), held["item"].to_numpy())
    assert real["validation rmse"][cold_start_base.ITEM_BIAS] == pytest.approx(
        np.sqrt(np.mean((item_bias - held["rating"].to_numpy()) ** 2)))
    test = split.test[split.test["user"].isin(cold)]
    alone = predict(zero_user(model), test["item"].to_numpy(), model)
    assert real["test rmse"][cold_start_base.ITEM_HALF] == pytest.approx(
        np.sqrt(np.mean((alone - test["rating"].to_numpy()) ** 2)), rel=1e-5)
    # the run's setting (MF, prior 50, user factors from each user's own ratings) paired with item bias only, by hand
    own = [predict(fit_user(g["item"].to_numpy(), g["rating"].to_numpy(), model, 0.1, 50.0),
                   test[test["user"] == u].sort_values(["ts", "item"])["item"].to_numpy(), model)
           for u, g in fit[fit["user"].isin(cold)].groupby("user")]
    ordered = test.sort_values(["user", "ts", "item"], kind="stable")
    y, who = ordered["rating"].to_numpy(), ordered["user"].to_numpy()
    by_hand = paired_vs((np.concatenate(own) - y) ** 2,
                        (ItemBias().fit(fit).predict(who, ordered["item"].to_numpy()) - y) ** 2, who)
    np.testing.assert_allclose(real["run setting vs item bias"], by_hand, rtol=1e-5)
    # a user term fitted on what the user kept differs from the item half alone (the sweep measures something)
    assert real["test rmse"]["private MF, prior count 0"] != real["test rmse"][cold_start_base.ITEM_HALF]
    text = cold_start_base.table(result)
    assert text.count("**") == 2 * len(pops) and "prior count 50" in text


def test_a_run_without_item_factors_or_a_bad_keep_is_refused(finished_run, tmp_path):
    out = finished_run[0]
    for keep in (0, 15):
        with pytest.raises(SystemExit, match="--keep"):
            cold_start_base.measure(out, keep=keep)
    (tmp_path / "history.json").write_text((out / "history.json").read_text())
    with pytest.raises(SystemExit, match="item factors"):
        cold_start_base.measure(tmp_path, keep=5)
