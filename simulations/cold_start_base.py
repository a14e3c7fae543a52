"""What a cold-start device's private base should be, chosen on validation (issue #17, goal 1c; no language model).

A device with few ratings predicts from a released item half and a user half it fits on those ratings. How far its
few ratings should move it off the item half is the prior count of `common.item_factors.fit_user` (MF, the main
job's base) or the shrinkage of `common.item_stats.user_bias` (the user+item bias base over the released per-movie
statistics). This sweeps both over a finished federation's releases (`item_factors.npz`, `item_stats.npz`),
against classical item bias only (fitted on every training rating) and MF with no rating (the item half with the
released population centre, or alone for a release without one):

- **real cold-start users** (fewer than `cold-start-threshold` training ratings): chosen on their validation
  ratings (each one's newest training ratings, held out of every release), scored on their test ratings;
- **simulated, oldest N**: the evaluation users keep their N oldest training ratings (as `rescore --first`);
  chosen on the other users' validation ratings with the same truncation, scored on the evaluation users' test;
- **simulated, newest N**: the same with the N newest (as `rescore --last`), just before the held-out ratings.

Each column's choice is the candidate with the lowest validation RMSE; its test RMSE and its paired per-user MSE
difference with item bias only and with the run's own setting (the released prior count) follow.

    python -m simulations.cold_start_base results/federated/k1 [--eval-users 200] [--keep 10]

prints the table and writes it to `<run>/cold_start_base.md`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd

from common.config import split_preset
from common.data import load_movielens
from common.item_factors import fit_user, predict as mf_predict, read_release, zero_user
from common.item_stats import ItemStats, predict as bias_predict, user_bias
from common.metrics import rmse
from common.split import sample_users, temporal_split, validation_split
from server.serving import ITEM_FACTORS_FILE, ITEM_STATS_FILE
from simulations.centralised import paired_vs
from simulations.classical import ItemBias
from simulations.rescore import config_of, kept_ratings

MF_PRIORS = (0.0, 20.0, 50.0, 100.0, 200.0, 400.0)
BIAS_SHRINKAGE = (2.0, 5.0, 10.0, 20.0, 50.0)
ITEM_BIAS = "item bias only (classical)"
ITEM_HALF = "released MF, no rating"  # what a device with no rating predicts: the item half and the centre, if any
STATS_ALONE = "released item statistics alone"  # the bias model's zero user


def candidates(out: Path) -> tuple[dict, float]:
    """name -> predict(kept ratings, held-out items) for every base a cold-start device could use, and the run's
    own MF prior count. Needs the run's item factors; the bias base needs its item statistics too."""
    if not (out / ITEM_FACTORS_FILE).is_file():
        raise SystemExit(f"{out}: no {ITEM_FACTORS_FILE}; the run released no item factors (item-factors-rounds)")
    model, reg, released_prior = read_release(dict(np.load(out / ITEM_FACTORS_FILE)))
    bases = {ITEM_HALF: lambda kept, items: mf_predict(zero_user(model), items, model)}
    for prior in MF_PRIORS:
        bases[f"private MF, prior count {prior:g}"] = (
            lambda kept, items, p=prior: mf_predict(fit_user(kept["item"].to_numpy(), kept["rating"].to_numpy(),
                                                             model, reg, p), items, model))
    if (out / ITEM_STATS_FILE).is_file():
        stats = ItemStats.from_arrays(dict(np.load(out / ITEM_STATS_FILE)))
        bases[STATS_ALONE] = lambda kept, items: bias_predict(0.0, items, stats)
        for shrink in BIAS_SHRINKAGE:
            bases[f"private user+item bias, shrinkage {shrink:g}"] = (
                lambda kept, items, s=shrink: bias_predict(user_bias(kept["item"].to_numpy(),
                                                                     kept["rating"].to_numpy(), stats, s),
                                                           items, stats))
    return bases, released_prior


def _errors(predict, kept: pd.DataFrame, held: pd.DataFrame) -> np.ndarray:
    """Squared error of each held-out rating, held out in (user, time) order, each user's from their kept rows."""
    err = []
    kept_by_user = dict(tuple(kept.groupby("user")))
    for user, h in held.groupby("user", sort=True):
        k = kept_by_user.get(user, kept.iloc[:0])
        err.append((predict(k, h["item"].to_numpy()) - h["rating"].to_numpy()) ** 2)
    return np.concatenate(err) if err else np.zeros(0)


def measure(out: Path, eval_users: int | None = None, keep: int = 10) -> dict:
    """For each population (see the module doc), every candidate's validation and test RMSE, the choice on
    validation, and its paired per-user MSE difference on test with item bias only and the run's own setting."""
    cfg = config_of(json.loads((out / "history.json").read_text()))
    if not 0 < keep < cfg.cold_start_threshold:
        raise SystemExit(f"--keep {keep}: a simulated cold-start user keeps 1 to {cfg.cold_start_threshold - 1} "
                         "ratings")
    data = load_movielens(cfg.dataset)
    split = temporal_split(data.ratings, split_preset(cfg.split))
    fit, val = validation_split(split.train, cfg.validation_fraction)
    test = split.test.sort_values(["user", "ts", "item"], kind="stable")
    bases, released_prior = candidates(out)
    item_bias = ItemBias().fit(fit)  # no user term: it never sees what a user kept
    bases = {ITEM_BIAS: lambda kept, items: item_bias.predict(np.zeros(len(items)), items), **bases}
    counts = fit["user"].value_counts()
    evaluated = set(sample_users(split.users, eval_users or cfg.eval_users, cfg.eval_seed))
    cold = [u for u in split.users if counts.get(u, 0) < cfg.cold_start_threshold]
    # validation users for the simulated columns: not evaluated, with more than `keep` ratings to give up
    tuning = [u for u in split.users if u not in evaluated and counts.get(u, 0) > keep]
    evaluated = sorted(u for u in evaluated if counts.get(u, 0) > keep)
    cold_fit = fit[fit["user"].isin(cold)]  # a real cold-start user keeps everything, for validation and test
    populations = {
        "real cold-start users": (cold_fit, val[val["user"].isin(cold)], cold_fit, test[test["user"].isin(cold)]),
        f"simulated, oldest {keep}": (kept_ratings(fit, tuning, keep, False), val[val["user"].isin(tuning)],
                                      kept_ratings(fit, evaluated, keep, False), test[test["user"].isin(evaluated)]),
        f"simulated, newest {keep}": (kept_ratings(fit, tuning, keep, True), val[val["user"].isin(tuning)],
                                      kept_ratings(fit, evaluated, keep, True), test[test["user"].isin(evaluated)]),
    }
    own = f"private MF, prior count {released_prior:g}"
    result = {"run": str(out), "keep": keep, "released prior": released_prior, "populations": {}}
    for name, (tune_kept, tune_held, kept, held) in populations.items():
        val_err = {b: _errors(f, tune_kept, tune_held) for b, f in bases.items()}
        test_err = {b: _errors(f, kept, held) for b, f in bases.items()}
        chosen = min(bases, key=lambda b: np.mean(val_err[b]))
        who = held["user"].to_numpy()  # `test` is in (user, time) order, as `_errors` returns the errors
        row = {"users": int(held["user"].nunique()), "ratings": len(held),
               "validation users": int(tune_held["user"].nunique()), "chosen": chosen,
               "validation rmse": {b: float(np.sqrt(np.mean(e))) for b, e in val_err.items()},
               "test rmse": {b: float(np.sqrt(np.mean(e))) for b, e in test_err.items()},
               "chosen vs item bias": paired_vs(test_err[chosen], test_err[ITEM_BIAS], who)}
        if own in test_err:
            row["chosen vs run setting"] = paired_vs(test_err[chosen], test_err[own], who)
            row["run setting vs item bias"] = paired_vs(test_err[own], test_err[ITEM_BIAS], who)
        result["populations"][name] = row
        print(f"{name}: chosen on validation {chosen!r}", flush=True)
    return result


def table(result: dict) -> str:
    pops = result["populations"]
    lines = ["| base | " + " | ".join(f"{p}: validation / test RMSE" for p in pops) + " |",
             "|---|" + "---|" * len(pops)]
    names = next(iter(pops.values()))["test rmse"]
    for b in names:
        cells = []
        for p in pops.values():
            mark = "**" if p["chosen"] == b else ""
            cells.append(f"{mark}{p['validation rmse'][b]:.4f}{mark} / {p['test rmse'][b]:.4f}")
        lines.append(f"| {b} | " + " | ".join(cells) + " |")
    lines += ["", "| population | users (ratings) | validation users | chosen on validation | "
              "chosen vs item bias only [95% CI] | chosen vs the run's setting | the run's setting vs item bias only |",
              "|---|---|---:|---|---|---|---|"]
    fmt = lambda d: f"{d[0]:+.4f} [{d[1]:+.4f}, {d[2]:+.4f}]" if d else "-"  # noqa: E731
    for name, p in pops.items():
        lines.append(f"| {name} | {p['users']} ({p['ratings']}) | {p['validation users']} | {p['chosen']} | "
                     f"{fmt(p['chosen vs item bias'])} | {fmt(p.get('chosen vs run setting'))} | "
                     f"{fmt(p.get('run setting vs item bias'))} |")
    return "\n".join(lines) + (f"\n\nBold: chosen on validation. The run's setting: private MF, prior count "
                               f"{result['released prior']:g}. Differences are per-user MSE, paired.")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run", help="coordinator out-dir of a finished federation with item-factors-rounds")
    ap.add_argument("--eval-users", type=int, default=None,
                    help="evaluation users of the simulated columns (sampled with the run's eval-seed)")
    ap.add_argument("--keep", type=int, default=10, help="ratings a simulated cold-start user keeps")
    args = ap.parse_args(argv)
    result = measure(Path(args.run), args.eval_users, args.keep)
    text = table(result)
    (Path(args.run) / "cold_start_base.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
