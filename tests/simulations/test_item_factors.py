"""The federated-MF measurement runs end to end, tunes on validation only, and orders its rows as noise says."""

import json
import math

from simulations.item_factors import main


def test_item_factors_table_end_to_end(ml100k_dir, tmp_path, capsys):
    out = tmp_path / "out"
    result = main(["--dataset", str(ml100k_dir), "--split", "default", "--epsilons", "inf,0.5", "--seeds", "0,1",
                   "--rank", "4", "--regs", "0.1,0.4", "--priors", "0,30", "--rounds", "20", "--round-grid", "5,10",
                   "--eval-users", "0", "--out", str(out)])
    assert json.loads((out / "table.json").read_text())["test_ratings"] == result["test_ratings"] > 0
    rows = {r["epsilon"]: r for r in result["rows"] if r["epsilon"] is not None}
    free, noisy = rows[math.inf], rows[0.5]
    assert len(free["rmse"]) == len(noisy["rmse"]) == 2
    assert set(free["reg"]) <= {0.1, 0.4} and all(1 <= t <= 20 for t in free["rounds"])
    assert set(free["prior"]) <= {0.0, 30.0}
    # DP reuses the noise-free penalty and prior count
    assert set(noisy["rounds"]) <= {5, 10} and noisy["reg"] == free["reg"] and noisy["prior"] == free["prior"]
    assert noisy["noise_multiplier"] > 1
    assert max(free["rmse"]) < min(noisy["rmse"])  # a release at eps 0.5 over its rounds is mostly noise
    assert all(len(d) == 3 and d[1] <= d[0] <= d[2] for d in free["diff_vs_mf"])
    assert "paired MSE diff vs classical MF" in capsys.readouterr().out


def test_sampled_rounds_ask_a_fresh_share_of_the_devices_and_still_learn(ml100k_dir, monkeypatch):
    """--fraction: each round sums the gradients of a fresh sample of ceil(f x devices) users, and a sampled
    federation still learns (its mean and item biases fit the training ratings better than at the start) without
    being the full federation."""
    import argparse

    import numpy as np

    from common import item_factors
    from common.data import load_movielens
    from common.config import split_preset
    from common.split import temporal_split
    from simulations.item_factors import federate

    data = load_movielens(str(ml100k_dir))
    train = temporal_split(data.ratings, split_preset("default")).train
    n_users, n_items = train["user"].nunique(), int(data.items.index.max())
    seen = []
    real = item_factors.contribution
    monkeypatch.setattr("simulations.item_factors.contribution",
                        lambda items, *a: seen.append(tuple(items)) or real(items, *a))
    args = argparse.Namespace(rank=4, lr=0.02, bound=5.0)
    full, _ = federate(train, n_items, 3, 0.0, args, 0, 0.1)
    assert len(seen) == 3 * n_users
    seen.clear()
    sampled, _ = federate(train, n_items, 20, 0.0, args, 0, 0.1, fraction=0.5)
    per_round = item_factors.cohort_size(n_users, 0.5)
    assert per_round < n_users and len(seen) == 20 * per_round
    assert set(seen[:per_round]) != set(seen[per_round:2 * per_round])  # a fresh sample each round
    items, y = train["item"].to_numpy() - 1, train["rating"].to_numpy()

    def bias_mse(m):  # the global part of MF (mean + item bias) on the training ratings
        return float(np.mean((m.mu + m.bias[items] - y) ** 2))

    assert bias_mse(sampled) < bias_mse(item_factors.ItemFactors.initial(n_items, 4, 0)) - 0.01  # it learnt
    assert not np.allclose(sampled.factors, full.factors)


def test_the_centre_rows_are_tuned_alike_accounted_as_one_more_release_and_paired_with_the_rows_without(
        ml100k_dir, tmp_path):
    from common.privacy import noise_for_target

    result = main(["--dataset", str(ml100k_dir), "--split", "default", "--epsilons", "inf,0.5", "--seeds", "0",
                   "--rank", "4", "--regs", "0.1", "--priors", "0,30", "--rounds", "20", "--round-grid", "5,10",
                   "--eval-users", "0", "--centre", "--out", str(tmp_path / "out")])
    rows = {(r["epsilon"], "centre" in r["method"]): r for r in result["rows"] if r["epsilon"] is not None}
    assert set(rows) == {(math.inf, False), (math.inf, True), (0.5, False), (0.5, True)}
    for eps in (math.inf, 0.5):
        plain, centre = rows[eps, False], rows[eps, True]
        assert "diff_vs_plain" not in plain and len(centre["diff_vs_plain"]) == 1
        # the centre changed the predictions (a zero or missing centre would leave both rows the same)
        assert centre["rmse"][0] != plain["rmse"][0] and centre["diff_vs_plain"][0][0] != 0.0
    # under DP the centre is one more release over the chosen rounds: the noise that spends eps over rounds + 1
    noisy = rows[0.5, True]
    assert noisy["noise_multiplier"] == noise_for_target(0.5, 1e-5, 1.0, noisy["rounds"][0] + 1)
    assert noisy["noise_multiplier"] > noise_for_target(0.5, 1e-5, 1.0, noisy["rounds"][0])
