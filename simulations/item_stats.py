"""What the private per-movie statistics are worth (issue #17, the collaborative-signal lever), with no language
model: every training user of the split contributes `common.item_stats.contribution`, the sum gets the Gaussian
noise of a user-level (eps, delta) release, and two predictors are built from the release alone:

- item bias only: mu + b_item (what a cold-start user with no ratings gets),
- private user+item bias: b_item from the release, b_user computed on the device from its own ratings.

Both are scored on the evaluation users' test ratings next to the classical (non-private, centralised) user+item
bias, on the same users: per noise draw (seed) the RMSE, then the mean, sd over seeds, and the paired per-user
MSE difference against the classical model with a 95% interval. Epsilon here is this one release's alone (sample
rate 1, one step); in a federation it composes with discovery and rounds (`server/server_app.py` accounts it).

`python -m simulations.item_stats [--epsilons inf,8,4,2,1] [--seeds 0,1,2,3,4] [--eval-users 40]`
(`--eval-users 0`: every user of the split) prints the table and writes `results/item_stats/table.{md,json}`.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd

from common.config import split_preset
from common.data import load_movielens
from common.item_stats import contribution, estimate, predict, sensitivity, user_bias
from common.metrics import rmse
from common.privacy import noise_for_target
from common.split import sample_users, temporal_split
from simulations.centralised import paired_vs
from simulations.classical import Biases, GlobalMean


def release(train: pd.DataFrame, n_items: int, bound: float, noise_multiplier: float, rng: np.random.Generator
            ) -> tuple[np.ndarray, np.ndarray, float, float]:
    """The coordinator's view: the sum over devices plus N(0, (noise x sensitivity)^2) on every coordinate."""
    sums, weights, volume = np.zeros(n_items), np.zeros(n_items), 0.0
    for _, rows in train.groupby("user"):
        s, w, v = contribution(rows["item"].to_numpy(), rows["rating"].to_numpy(), n_items, bound)
        sums, weights, volume = sums + s, weights + w, volume + v
    std = noise_multiplier * sensitivity(bound)
    if std > 0:
        sums, weights = sums + rng.normal(0, std, n_items), weights + rng.normal(0, std, n_items)
        volume += float(rng.normal(0, std))
    return sums, weights, volume, std


def evaluation_split(args: argparse.Namespace):
    """(split, catalogue size, evaluation users, their test ratings) of `args.dataset` / `args.split`:
    `args.eval_users` sampled with `args.eval_seed`, 0 for every user."""
    data = load_movielens(args.dataset)
    split = temporal_split(data.ratings, split_preset(args.split))
    users = split.users if args.eval_users == 0 else sample_users(split.users, args.eval_users, args.eval_seed)
    test = split.test[split.test["user"].isin(users)].reset_index(drop=True)
    return split, int(data.items.index.max()), users, test


def run(args: argparse.Namespace) -> dict:
    split, n_items, users, test = evaluation_split(args)
    y, who, what = test["rating"].to_numpy(), test["user"].to_numpy(), test["item"].to_numpy()
    own = {int(u): (g["item"].to_numpy(), g["rating"].to_numpy()) for u, g in split.train.groupby("user")}
    classical = Biases().fit(split.train).predict(who, what)
    reference_err = (classical - y) ** 2
    rows = [{"method": "global mean (classical)", "epsilon": None,
             "rmse": [rmse(GlobalMean().fit(split.train).predict(who, what), y)]},
            {"method": "user+item bias (classical)", "epsilon": None, "rmse": [rmse(classical, y)]}]
    print(f"{split.train['user'].nunique()} contributing users, {n_items} movies; evaluation: {len(users)} users, "
          f"{len(test):,} test ratings", flush=True)
    for eps in args.epsilons:
        sigma = 0.0 if math.isinf(eps) else noise_for_target(eps, args.delta, 1.0, 1)
        item_only, both, diffs = [], [], []
        for seed in args.seeds:
            sums, weights, volume, std = release(split.train, n_items, args.bound, sigma,
                                                 np.random.default_rng(seed))
            stats = estimate(sums, weights, volume, std)
            p_item = predict(0.0, what, stats)
            p_both = np.empty(len(test))
            for u, idx in test.groupby("user").indices.items():
                items, ratings = own.get(int(u), (np.array([], int), np.array([])))
                p_both[idx] = predict(user_bias(items, ratings, stats), what[idx], stats)
            item_only.append(rmse(p_item, y))
            both.append(rmse(p_both, y))
            diffs.append(paired_vs((p_both - y) ** 2, reference_err, who))
            if math.isinf(eps):
                break  # no noise: every seed is the same release
        label = "no noise" if math.isinf(eps) else f"eps {eps:g} (noise multiplier {sigma:.2f})"
        rows.append({"method": "item bias only (private release)", "epsilon": eps, "rmse": item_only})
        rows.append({"method": "user+item bias (private release + on-device user bias)", "epsilon": eps,
                     "rmse": both, "diff_vs_classical": diffs})
        print(f"{label}: item bias only {np.mean(item_only):.4f}, user+item bias {np.mean(both):.4f} "
              f"(sd {np.std(both, ddof=1) if len(both) > 1 else 0:.4f} over {len(both)} noise draws)", flush=True)
    return {"args": {k: (list(v) if isinstance(v, (list, tuple)) else v) for k, v in vars(args).items()},
            "users": len(users), "test_ratings": len(test), "rows": rows}


def markdown(result: dict) -> str:
    lines = [f"{result['users']} evaluation users, {result['test_ratings']:,} test ratings; epsilon of this release "
             f"alone (delta {result['args']['delta']:g})", "",
             "| method | epsilon | RMSE (mean) | sd over noise draws | paired MSE diff vs classical bias [95% CI] |",
             "|---|---:|---:|---:|---|"]
    for r in result["rows"]:
        eps = "-" if r["epsilon"] is None else ("no noise" if math.isinf(r["epsilon"]) else f"{r['epsilon']:g}")
        sd = f"{np.std(r['rmse'], ddof=1):.4f}" if len(r["rmse"]) > 1 else "-"
        d = r.get("diff_vs_classical")
        cell = "-" if not d else (f"{np.mean([m for m, _, _ in d]):+.4f} "
                                  f"[{np.mean([lo for _, lo, _ in d]):+.4f}, {np.mean([hi for _, _, hi in d]):+.4f}]")
        lines.append(f"| {r['method']} | {eps} | {np.mean(r['rmse']):.4f} | {sd} | {cell} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    floats = lambda s: [float(x) for x in s.split(",") if x]  # noqa: E731
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dataset", default="ml-100k")
    ap.add_argument("--split", default="paper")
    ap.add_argument("--epsilons", type=floats, default=[math.inf, 8, 4, 2, 1])
    ap.add_argument("--delta", type=float, default=1e-5)
    ap.add_argument("--bound", type=float, default=1.0)
    ap.add_argument("--seeds", type=lambda s: [int(x) for x in s.split(",") if x], default=[0, 1, 2, 3, 4])
    ap.add_argument("--eval-users", type=int, default=40)
    ap.add_argument("--eval-seed", type=int, default=0)
    ap.add_argument("--out", default="results/item_stats")
    args = ap.parse_args(argv)
    return save_table(run(args), Path(args.out), markdown)


def save_table(result: dict, out: Path, render) -> dict:
    """Write `result` to out/table.json and its `render`ed markdown to out/table.md, and print the table."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "table.json").write_text(json.dumps(result, default=float))
    (out / "table.md").write_text(render(result) + "\n")
    print(render(result))
    return result


if __name__ == "__main__":
    main()
