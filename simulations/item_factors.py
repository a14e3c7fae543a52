"""What federated MF is worth, private or not, with no language model (issue #17: the collaborative base the
adapter could correct). Every training user of the split is a device; `common.item_factors` runs its rounds:
each device fits its own user factors and answers with its clipped gradient for the item half, the sum gets the
Gaussian noise of a user-level (eps, delta) budget spent over all rounds, the coordinator takes an Adam step.

The round count is tuned without test ratings: each user's newest `--val-fraction` of training ratings is held
out, the federation runs `--rounds` rounds on the rest and scores the held-out ratings every 10 rounds; the best
count is then rerun on all training ratings (under DP the budget is spent over that count). Scored on the
evaluation users' test ratings next to classical user+item bias and MF (centralised, non-private, tuned the same
way), on the same users: RMSE per noise draw (seed), mean and sd over seeds, paired per-user MSE difference
against classical MF with a 95% interval.

`--centre` adds the population centre (`common.item_factors`: after the rounds, the mean of the devices' clipped
user halves, one more release, noised like a round under DP and accounted with them), which each device's user half
is shrunk toward instead of zero; its rows are tuned on validation the same way and paired with the rows without it
on the same users and seeds.

`python -m simulations.item_factors [--epsilons inf,8] [--seeds 0,1,2] [--split paper] [--eval-users 40] [--centre]`
prints the table and writes `results/item_factors/table.{md,json}`.
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd

from common.item_factors import (USER_HALF_BOUND, ItemFactors, ItemFactorTrainer, clip, cohort_size, contribution,
                                 fit_user, predict, user_half)
from common.metrics import rmse
from common.privacy import noise_for_target
from common.split import validation_split
from simulations.centralised import paired_vs
from simulations.classical import Biases, tune_mf
from simulations.item_stats import evaluation_split, save_table


def federate(train: pd.DataFrame, n_items: int, rounds: int, noise_multiplier: float, args: argparse.Namespace,
             seed: int, reg: float, prior: float = 0.0, score=None, fraction: float = 1.0, centre: bool = False
             ) -> tuple[ItemFactors, list[tuple[int, float]]]:
    """`rounds` rounds over the users of `train` (each round a fresh sample of `fraction` of them, as the
    coordinator's `item-factors-fraction` draws); `score(model) -> float` is called every 10 rounds and at the
    end (the validation curve). With noise, each gradient is clipped to `args.bound` and the sum gets
    N(0, (noise_multiplier x bound)^2) per coordinate. With `centre`, the model scored and returned carries the
    population centre of that point (`population_centre`)."""
    rng = np.random.default_rng(10_000 + seed)
    centre_rng = np.random.default_rng(20_000 + seed)  # its own draws: the rounds replay with or without a centre
    devices = [(g["item"].to_numpy(), g["rating"].to_numpy()) for _, g in train.groupby("user")]
    cohort = cohort_size(len(devices), fraction)
    trainer = ItemFactorTrainer(ItemFactors.initial(n_items, args.rank, seed), lr=args.lr)
    curve = []
    for t in range(1, rounds + 1):
        total = None
        asked = devices if cohort == len(devices) else [devices[i] for i in rng.choice(len(devices), cohort, False)]
        for items, ratings in asked:
            c = contribution(items, ratings, trainer.model, reg, prior)
            if noise_multiplier > 0:  # the sensitivity DP needs; without noise, every gradient counts in full
                c = clip(c, args.bound)
            total = c if total is None else {k: total[k] + c[k] for k in total}
        if noise_multiplier > 0:
            total = {k: v + rng.normal(0.0, noise_multiplier * args.bound, v.shape) for k, v in total.items()}
        trainer.step(total, float(len(train)))  # the rating count: public here, the item statistics' volume slot
        if score is not None and (t % 10 == 0 or t == rounds):
            model = population_centre(trainer.model, devices, cohort, reg, prior, noise_multiplier, centre_rng) \
                if centre else trainer.model
            curve.append((t, score(model)))
    if centre:
        return population_centre(trainer.model, devices, cohort, reg, prior, noise_multiplier, centre_rng), curve
    return trainer.model, curve


def population_centre(model: ItemFactors, devices: list, cohort: int, reg: float, prior: float,
                      noise_multiplier: float, rng: np.random.Generator) -> ItemFactors:
    """The coordinator's `release_user_centre` without Flower: a fresh cohort's clipped user halves, summed, noised
    (N(0, (noise_multiplier x USER_HALF_BOUND)^2) per coordinate), divided by the cohort size."""
    asked = devices if cohort == len(devices) else [devices[i] for i in rng.choice(len(devices), cohort, False)]
    total = sum(user_half(items, ratings, model, reg, prior) for items, ratings in asked)
    if noise_multiplier > 0:
        total = total + rng.normal(0.0, noise_multiplier * USER_HALF_BOUND, total.shape)
    return replace(model, centre=total / len(asked))


def _scorer(train: pd.DataFrame, held: pd.DataFrame):
    own = {int(u): (g["item"].to_numpy(), g["rating"].to_numpy()) for u, g in train.groupby("user")}

    def score(model: ItemFactors, reg: float, prior: float) -> np.ndarray:
        pred = np.empty(len(held))
        for u, idx in held.groupby("user").indices.items():
            items, ratings = own.get(int(u), (np.array([], int), np.array([])))
            pred[idx] = predict(fit_user(items, ratings, model, reg, prior), held["item"].to_numpy()[idx], model)
        return pred
    return score


def run(args: argparse.Namespace) -> dict:
    split, n_items, users, test = evaluation_split(args)
    y, who, what = test["rating"].to_numpy(), test["user"].to_numpy(), test["item"].to_numpy()
    fit_part, valid = validation_split(split.train, args.val_fraction)
    valid = valid.reset_index(drop=True)
    mf = tune_mf(split.train, args.val_fraction).predict(who, what)
    reference = (mf - y) ** 2
    rows = [{"method": "user+item bias (classical)", "epsilon": None,
             "rmse": [rmse(Biases().fit(split.train).predict(who, what), y)]},
            {"method": "matrix factorisation (classical)", "epsilon": None, "rmse": [rmse(mf, y)]}]
    print(f"{split.train['user'].nunique()} devices, {n_items} movies; evaluation: {len(users)} users, "
          f"{len(test):,} test ratings; classical MF {rows[1]['rmse'][0]:.4f}", flush=True)
    on_valid = _scorer(fit_part, valid)
    on_test = _scorer(split.train, test)
    tuned = {}

    def noise_free(seed: int, centre: bool) -> tuple[float, int, float, float]:
        """(validation RMSE, rounds, penalty, prior count): the best point over the (penalty, prior) curves."""
        if (seed, centre) not in tuned:
            best = (math.inf, args.rounds, args.regs[0], args.priors[0])
            for reg in args.regs:
                for prior in args.priors:
                    _, curve = federate(fit_part, n_items, args.rounds, 0.0, args, seed, reg, prior,
                                        score=lambda m: rmse(on_valid(m, reg, prior), valid["rating"].to_numpy()),
                                        fraction=args.fraction, centre=centre)
                    best = min(best, min((e, t, reg, prior) for t, e in curve))
                    print(f"  validation seed {seed}{', centre' if centre else ''}, reg {reg:g}, prior {prior:g}: "
                          + ", ".join(f"{t}: {e:.4f}" for t, e in curve), flush=True)
            tuned[seed, centre] = best
        return tuned[seed, centre]

    errors = {}  # (epsilon, seed) -> per-rating squared errors without the centre, to pair the centre's with
    for eps, centre in [(e, c) for e in args.epsilons for c in ((False, True) if args.centre else (False,))]:
        result = {"method": "federated MF" + (" + population centre" if centre else " (device-side user factors)"),
                  "epsilon": eps, "rmse": [], "rounds": [], "reg": [], "prior": [], "diff_vs_mf": [],
                  "noise_multiplier": None, "seconds": [], **({"diff_vs_plain": []} if centre else {})}
        releases = lambda rounds: rounds + (1 if centre else 0)  # noqa: E731  (the centre is one more release)
        for seed in args.seeds:
            start = time.perf_counter()
            # tune on validation: without noise, the penalty and the best point of each penalty's curve; under DP,
            # the round count from the grid (each count run with the noise that spends the whole budget over it)
            # at the penalty the noise-free tuning chose
            if math.isinf(eps):
                best = noise_free(seed, centre)
            else:
                _, _, reg, prior = noise_free(seed, centre)
                best = (math.inf, args.rounds, reg, prior)
                for rounds in args.round_grid:
                    sigma = noise_for_target(eps, args.delta, 1.0, releases(rounds))
                    _, curve = federate(fit_part, n_items, rounds, sigma, args, seed, reg, prior,
                                        score=lambda m: rmse(on_valid(m, reg, prior), valid["rating"].to_numpy()),
                                        fraction=args.fraction, centre=centre)
                    best = min(best, (curve[-1][1], rounds, reg, prior))
            rounds, reg, prior = best[1], best[2], best[3]
            sigma = 0.0 if math.isinf(eps) else noise_for_target(eps, args.delta, 1.0, releases(rounds))
            model, _ = federate(split.train, n_items, rounds, sigma, args, seed, reg, prior, fraction=args.fraction,
                                centre=centre)
            pred = on_test(model, reg, prior)
            if centre:
                result["diff_vs_plain"].append(paired_vs((pred - y) ** 2, errors[eps, seed], who))
            else:
                errors[eps, seed] = (pred - y) ** 2
            result["rmse"].append(rmse(pred, y))
            result["rounds"].append(rounds)
            result["reg"].append(reg)
            result["prior"].append(prior)
            result["noise_multiplier"] = sigma
            result["diff_vs_mf"].append(paired_vs((pred - y) ** 2, reference, who))
            result["seconds"].append(time.perf_counter() - start)
            print(f"eps {eps:g} seed {seed}{' centre' if centre else ''}: reg {reg:g}, prior {prior:g}, {rounds} "
                  f"rounds (noise multiplier "
                  f"{sigma:.2f}), test RMSE {result['rmse'][-1]:.4f}, vs MF {result['diff_vs_mf'][-1][0]:+.4f} "
                  f"({result['seconds'][-1]:.0f} s)", flush=True)
        rows.append(result)
    return {"args": {k: (list(v) if isinstance(v, (list, tuple)) else v) for k, v in vars(args).items()},
            "users": len(users), "test_ratings": len(test), "devices": int(split.train["user"].nunique()),
            "rows": rows}


def markdown(result: dict) -> str:
    fraction = result["args"].get("fraction", 1.0)
    asked = "" if fraction == 1.0 else f"; each round asks {fraction:g} of the devices"
    lines = [f"{result['devices']} devices{asked}; {result['users']} evaluation users, {result['test_ratings']:,} "
             f"test ratings; epsilon over all rounds (delta {result['args']['delta']:g})", "",
             "| method | epsilon | rounds | penalty / prior count | RMSE (mean) | sd over seeds | paired MSE diff vs "
             "classical MF, mean over seeds [95% CI] | vs the same without the centre, per seed |",
             "|---|---:|---:|---:|---:|---:|---|---|"]
    for r in result["rows"]:
        eps = "-" if r["epsilon"] is None else ("no noise" if math.isinf(r["epsilon"]) else f"{r['epsilon']:g}")
        sd = f"{np.std(r['rmse'], ddof=1):.4f}" if len(r["rmse"]) > 1 else "-"
        d = r.get("diff_vs_mf")
        cell = "-" if not d else (f"{np.mean([m for m, _, _ in d]):+.4f} "
                                  f"[{np.mean([lo for _, lo, _ in d]):+.4f}, {np.mean([hi for _, _, hi in d]):+.4f}]")
        rounds = ", ".join(str(t) for t in r["rounds"]) if r.get("rounds") else "-"
        penalty = ", ".join(f"{g:g} / {c:g}" for g, c in zip(r["reg"], r["prior"])) if r.get("reg") else "-"
        plain = "; ".join(f"{m:+.4f} [{lo:+.4f}, {hi:+.4f}]" for m, lo, hi in r.get("diff_vs_plain", [])) or "-"
        lines.append(f"| {r['method']} | {eps} | {rounds} | {penalty} | {np.mean(r['rmse']):.4f} | {sd} | {cell} "
                     f"| {plain} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    floats = lambda s: [float(x) for x in s.split(",") if x]  # noqa: E731
    ints = lambda s: [int(x) for x in s.split(",") if x]  # noqa: E731
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dataset", default="ml-100k")
    ap.add_argument("--split", default="paper")
    ap.add_argument("--epsilons", type=floats, default=[math.inf, 8])
    ap.add_argument("--delta", type=float, default=1e-5)
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--regs", type=floats, default=[0.1, 0.2, 0.4],
                    help="per-rating L2 penalties tried on validation (as classical MF's)")
    ap.add_argument("--priors", type=floats, default=[0.0],
                    help="prior counts tried on validation: a user's ridge penalty is reg x (ratings + prior)")
    ap.add_argument("--lr", type=float, default=0.02)
    ap.add_argument("--bound", type=float, default=5.0, help="L2 clip of one device's gradient, under DP")
    ap.add_argument("--rounds", type=int, default=100, help="rounds of the non-private validation curve")
    ap.add_argument("--round-grid", type=ints, default=None,
                    help="round counts tried on validation under DP (each spends the whole budget)")
    ap.add_argument("--fraction", type=float, default=1.0,
                    help="share of the devices asked each round (the coordinator's item-factors-fraction); under DP "
                         "accounted as if every device took part (no amplification by sampling claimed)")
    ap.add_argument("--val-fraction", type=float, default=0.1)
    ap.add_argument("--centre", action="store_true",
                    help="also run each setting with the population centre (one more release) and pair the two")
    ap.add_argument("--seeds", type=ints, default=[0, 1, 2])
    ap.add_argument("--eval-users", type=int, default=40)
    ap.add_argument("--eval-seed", type=int, default=0)
    ap.add_argument("--out", default="results/item_factors")
    args = ap.parse_args(argv)
    args.round_grid = args.round_grid or [args.rounds]
    return save_table(run(args), Path(args.out), markdown)


if __name__ == "__main__":
    main()
