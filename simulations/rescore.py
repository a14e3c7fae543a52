"""Paired per-user comparison of a finished federation's persona adapter with the classical baselines.

The coordinator pools evaluation sums and never sees a user's predictions, so a federation's table can pair its
adapters only with the private bias model, whose per-user terms travel in the same sums. The classical baselines
(global mean, item bias only, user+item bias, MF) are fitted in the simulation process, outside the federation.
This script closes the gap for a simulation, after the fact: it loads the persona version the last evaluation
served (the registry's stable version, a released artefact) and scores the same evaluation users exactly as their
devices did (the same split, validation hold-out, released item statistics, prompts and, with `residual-to-bias`,
prior), then pairs each user's MSE with the baselines' fitted on the same ratings. The pooled RMSE must equal the
federation's own `persona_rmse`: a check that it scored what the devices scored.

    python -m simulations.rescore results/federated/k1 [results/federated-seed1/k1 ...]

Which persona a warm device joined is kept on the device, so runs of several personas (K > 1) are rescored on
cold-start users only (`--cold-only`): those are placed by the released onboarding tables
(`common.personas.cold_start_persona` over `onboarding.json`), exactly as the coordinator placed them in the run
and as its cold-start service places a new user. Prints a table per run and, over several runs, each user's
squared error averaged over runs, paired (as `simulations.centralised` does); runs of several K are pooled per K
and each K paired with the smallest (`... k1-seed0 k1-seed1 k4-seed0 k4-seed1 --cold-only`: personas against one
shared adapter on the same users); runs whose MF releases differ in having a population centre are grouped by that
too, and the centre's groups paired the same way, adapters and private bases (`... old/k1-seed0 new/k1-seed0`);
so are runs that started from the public warm start (`warm-start`) against runs that did not.
Users with fewer than `cold-start-threshold` training ratings (`split=mixed`)
get rows of their own: the cold-start comparison of #17 (persona adapter vs global mean and item bias only).
`--cold-only` scores only those users:

    python -m simulations.rescore results/mixed/k1 results/mixed-seed1/k1 --eval-users 240 --cold-only

`--population default --eval-users 943 --cold-only` scores every cold-start user of ML-100K, those outside the
federation as new users (the released adapter and statistics are what a newly enrolled device receives).

ML-100K's 172 real cold-start users hold about 5 test ratings each: too few for a paired interval to separate
models (even classical user+item bias from item bias only). `--first N` simulates cold start instead: every scored
user keeps only their N oldest training ratings and all their test ratings, and is served as a cold-start user:

    python -m simulations.rescore results/federated/k1 results/federated/k4 --eval-users 300 --first 10

`--last N` keeps each user's N newest training ratings instead. A real cold-start user's test ratings come right
after their few ratings; `--first` puts the whole of a long history between them (hundreds of ratings for a heavy
user), `--last` none: the two bracket the real case. `--last 0` keeps none: a device that has just enrolled, served
from the released artefacts and its sign-up answers alone (ML-100K has no such user: every one rated 20 movies).

`--served` scores what the run serves (the adapter blended with its private base at the validation weight, which
the system keeps in [0, 1]); with K=1, `--unclipped-weight` also scores what a weight allowed above 1 would serve,
and the weight every scored user's validation ratings would give (docs/results.md, eighteenth session):

    python -m simulations.rescore results/main-job/k1 results/c216-seed1/k1 results/c216-seed2/k1 \
        --eval-users 216 --served --unclipped-weight
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import numpy as np
import pandas as pd

from client.device import Device, runtime
from common import blend
from common.config import FederationConfig, ScoringConfig, split_preset
from common.data import load_movielens
from common.item_factors import ItemFactors, read_release
from common.item_stats import ItemStats
from common.metrics import rmse
from common.personas import cold_start_persona
from common.split import sample_users, temporal_split, validation_split
from server.registry import PersonaRegistry
from server.serving import ITEM_FACTORS_FILE, ITEM_STATS_FILE, ONBOARDING_FILE, load_onboarding
from simulations.centralised import paired_vs
from simulations.classical import Biases, GlobalMean, ItemBias, tune_mf


def config_of(history: dict) -> FederationConfig:
    names = {f.name for f in dataclasses.fields(FederationConfig)}
    return FederationConfig(**{k: tuple(v) if isinstance(v, list) else v
                               for k, v in history["config"].items() if k in names})


@dataclasses.dataclass
class FinishedRun:
    """What a finished federation released, and the ratings its evaluation devices held."""

    out: Path
    history: dict
    cfg: FederationConfig
    data: object
    fit: object  # training ratings minus the validation hold-out (what devices trained on)
    val: object
    test: object  # the evaluation users' test ratings, in the devices' order
    users: np.ndarray
    arrays: dict[int, dict[str, np.ndarray]]  # per persona, the stable version the last evaluation served
    released: ItemStats | None
    rt: object
    # (ItemFactors, penalty, prior count) with item-factors-rounds: MF is the private base
    factors: tuple | None = None
    onboarding: tuple | None = None  # (layout, feature counts, persona sizes): the cold-start rule, with K > 1
    kept: int | None = None  # simulated cold start: the evaluation users kept only this many training ratings,
    newest: bool = False  # their newest (`--last`) rather than their oldest (`--first`)
    baseline_fit: object = None  # what the classical baselines are fitted on (`fit` before any truncation)
    ratings: tuple = ()  # (dataset, split preset, validation fraction): which ratings `baseline_fit` holds
    evaluated: np.ndarray = dataclasses.field(default_factory=lambda: np.asarray([], int))  # the run's own
    # evaluation users (its `eval-users` sample): those whose validation sums the coordinator fitted weights on

    def device(self, user) -> Device:
        """The evaluation device of `user`, set up as its client app sets it up."""
        d = Device(int(user), self.data, self.fit[self.fit["user"] == user], self.test[self.test["user"] == user],
                   self.rt, ScoringConfig(), self.cfg.memory_items, val=self.val[self.val["user"] == user],
                   residual=self.cfg.residual_to_bias)
        if self.factors is not None:
            d.use_item_factors(*self.factors)
        return d.use_item_stats(self.released) if self.released is not None else d

    def persona(self, device: Device) -> int:
        """The persona `device` is served: the only one, or (K > 1, cold-start users only) the one the released
        onboarding tables give its sign-up answers, as in the run's `cold` query and the cold-start service."""
        if len(self.arrays) == 1:
            return next(iter(self.arrays))
        space, features, counts = self.onboarding
        return cold_start_persona(space.encode(device.onboarding()), features, counts, space)


def kept_ratings(fit: pd.DataFrame, users, n: int, newest: bool = False) -> pd.DataFrame:
    """What a simulated cold-start user keeps: each of `users`' `n` oldest (or `newest`) rows of `fit`."""
    rows = fit[fit["user"].isin(users)].sort_values(["user", "ts", "item"], kind="stable").groupby("user")
    return rows.tail(n) if newest else rows.head(n)


def cold_users(fit, users, threshold: int) -> np.ndarray:
    """The users among `users` with fewer than `threshold` ratings in `fit` (the cold-start users)."""
    counts = fit["user"].value_counts()
    return np.asarray([u for u in users if counts.get(u, 0) < threshold])


def load_run(out: Path, eval_users: int | None = None, cold_only: bool = False,
             population: str | None = None, first: int | None = None, last: int | None = None) -> FinishedRun:
    """Load the federation in `out` (its coordinator out-dir). `eval_users` other than the run's own samples that
    many users with the run's `eval-seed` (more users: more power; then the reported RMSE is not comparable).
    `cold_only` keeps only the cold-start users among them (fewer than `cold-start-threshold` training ratings).
    `population` (a split preset with the run's train fraction, e.g. "default": all 943 users) draws the users from
    it instead of the run's split: users who were not in the federation are scored as new users, served the
    released persona adapter and item statistics as a newly enrolled device would be; the baselines are fitted on
    the whole population's training ratings (more than the federation saw: the comparison favours them).
    `first` simulates cold start with the power ML-100K's few real cold-start users lack (about 5 test ratings
    each): every evaluation user keeps only their `first` oldest training ratings (fewer than
    `cold-start-threshold`) and no validation ratings, and is served as a cold-start user; their test ratings are
    all kept. The released artefacts saw their whole history, as the classical baselines do, which are fitted on
    every training rating (only those with no user term are then comparable: `baselines`). `last` is the same with
    each user's `last` newest training ratings: those just before their test ratings."""
    if first is not None and last is not None:
        raise SystemExit("--first and --last: choose one (which training ratings a simulated cold-start user keeps)")
    newest = last is not None
    first, flag = (last, "--last") if newest else (first, "--first")  # `first` is now the count kept, either way
    history = json.loads((out / "history.json").read_text())
    cfg = config_of(history)
    k = history["personas"]["k"]
    if k != 1 and not cold_only and first is None:
        raise SystemExit(f"{out}: K={k}; with several personas only cold-start users can be rescored (--cold-only, "
                         "--first or --last): a warm device's persona is kept on the device")
    if first is not None and not 0 <= first < cfg.cold_start_threshold:
        raise SystemExit(f"{flag} {first}: a simulated cold-start user keeps 0 to {cfg.cold_start_threshold - 1} "
                         f"ratings (cold-start-threshold {cfg.cold_start_threshold})")
    data = load_movielens(cfg.dataset)
    preset = split_preset(cfg.split)
    if population is not None:
        preset = split_preset(population)
        if preset.train_frac != split_preset(cfg.split).train_frac:
            raise SystemExit(f"--population {population}: its train fraction differs from the run's split "
                             f"{cfg.split!r}, so the run's users would not keep their training ratings")
    split = temporal_split(data.ratings, preset)
    # the run's own users (another population's split draws others): its evaluation sample is drawn from them
    own_users = split.users if population is None else temporal_split(data.ratings, split_preset(cfg.split)).users
    fit, val = validation_split(split.train, cfg.validation_fraction)
    users = sample_users(split.users, eval_users or cfg.eval_users, cfg.eval_seed)
    if cold_only:
        users = cold_users(fit, users, cfg.cold_start_threshold)
    baseline_fit = fit
    if first is not None:
        chosen = fit["user"].isin(users)
        fit, val = pd.concat([fit[~chosen], kept_ratings(fit, users, first, newest)]), val[~val["user"].isin(users)]
    registry = PersonaRegistry(out)
    arrays = {j: registry.arrays(registry.rollout(j)["stable"]) for j in range(k)}
    stats_file = out / ITEM_STATS_FILE
    test = split.test[split.test["user"].isin(users)].sort_values(["user", "ts", "item"], kind="stable")
    return FinishedRun(out, history, cfg, data, fit, val, test, np.asarray(users), arrays,
                       ItemStats.from_arrays(dict(np.load(stats_file))) if stats_file.is_file() else None,
                       runtime(cfg.base_model, cfg.lora), _released_factors(out),
                       load_onboarding(out / ONBOARDING_FILE) if k > 1 else None, first, newest, baseline_fit,
                       (cfg.dataset, population or cfg.split, cfg.validation_fraction),
                       sample_users(own_users, cfg.eval_users, cfg.eval_seed))


def _released_factors(out: Path) -> tuple[ItemFactors, float, float] | None:
    """The run's released item factors and their penalty (`item_factors.npz`: per rating, prior count), None if it
    released none."""
    path = out / ITEM_FACTORS_FILE
    if not path.is_file():
        return None
    return read_release(dict(np.load(path)))


BASELINES = ("global mean", "item bias only", "user+item bias", "matrix factorisation")
_FITTED: dict[tuple, object] = {}  # (ratings, baseline) -> fitted model, shared by the runs of one invocation


def baselines(run: FinishedRun, who: np.ndarray, items) -> dict[str, np.ndarray]:
    """The classical baselines' predictions, fitted on the ratings the devices trained on. Under a simulated cold
    start (`first`) they are fitted on every training rating, so only those without a user term are kept: a user
    term would know the history the evaluation users gave up."""
    names = BASELINES[:2] if run.kept is not None else BASELINES
    models = {"global mean": lambda: GlobalMean().fit(run.baseline_fit),
              "item bias only": lambda: ItemBias().fit(run.baseline_fit),
              "user+item bias": lambda: Biases().fit(run.baseline_fit),
              # MF's own seed fixed, so runs of several training seeds are paired with one MF
              "matrix factorisation": lambda: tune_mf(run.baseline_fit, seed=0)}
    for name in names:  # runs on the same ratings (several seeds) share one fit: tuning MF is most of a rescore
        if (run.ratings, name) not in _FITTED:
            _FITTED[run.ratings, name] = models[name]()
    return {name: _FITTED[run.ratings, name].predict(who, items) for name in names}


PRIVATE_BASE = "private base"  # what the adapter corrects: released item half + the device's own user half


def served_weights(run: FinishedRun, prior_devices: float | None = None) -> dict[int, float]:
    """Per persona, the weight its stable version's adapter is served at, blended with the private base
    (`serve-blend`): the registry's (`PersonaRegistry.serving_weight`, at the run's `blend-prior-devices` or at
    `prior_devices`); for a run from before the registry kept them, the last evaluation's pooled weight of the
    persona from history.json (the same validation sums: every evaluation device was served the stable version).
    1 (the adapter alone) where neither has one."""
    registry = PersonaRegistry(run.out)
    last = run.history["evaluate"][max(run.history["evaluate"], key=int)] if run.history["evaluate"] else {}
    out = {}
    for j in run.arrays:
        recorded = registry.serving_weight(registry.rollout(j)["stable"], prior_devices)
        if recorded is not None:
            out[j] = recorded[0]["persona"]
        else:
            out[j] = float(last.get(f"p{j}_persona_blend_weight",
                                    last.get("persona_blend_weight", 1.0) if len(run.arrays) == 1 else 1.0))
    return out


UNCLIPPED = "served at its unclipped validation weight"  # the run's own evaluation users' sums, no bound at 1
EVERY_SCORED = "served at every scored user's validation weight"  # the same from all scored users' sums


def validation_sums(run: FinishedRun, users) -> dict[int, tuple[float, float]]:
    """Per user of `users`, the (sum r d, sum d^2) of their validation ratings (`common.blend.residual_sums`: r and
    d the rating's and the adapter's departure from the private base), as their device sends them; K=1 only."""
    (arrays,) = run.arrays.values()
    out = {}
    for user in users:
        device = run.device(user)
        y = device.val["rating"].to_numpy()
        if len(y):
            sums = blend.residual_sums(device.predict(arrays, "val"), device.bias("val"), y)
            out[int(user)] = (sums["rd"], sums["dd"])
    return out


def unclipped_weights(run: FinishedRun) -> dict[str, float]:
    """What a serving weight allowed above 1 would be: the least-squares weight on the pooled validation sums of the
    run's own evaluation users (those the coordinator fits the served weight on) bounded only below, by 0; and,
    as a diagnostic of how far validation ratings speak for test ones, the same from every scored user's sums."""
    sums = validation_sums(run, sorted(set(map(int, run.evaluated)) | set(map(int, run.users))))
    return {UNCLIPPED: pooled_weight(sums, run.evaluated), EVERY_SCORED: pooled_weight(sums, run.users)}


def pooled_weight(sums: dict[int, tuple[float, float]], users) -> float:
    """The least-squares weight on the validation sums of `users` pooled (those without validation ratings add
    nothing), bounded below by 0 but not above."""
    rd, dd = (sum(sums[int(u)][i] for u in users if int(u) in sums) for i in (0, 1))
    return blend.weight(rd, dd, upper=float("inf"))


def rescore(out: Path, eval_users: int | None = None, cold_only: bool = False,
            population: str | None = None, first: int | None = None, last: int | None = None,
            served: bool = False, served_priors: tuple[float, ...] = (), unclipped: bool = False) -> dict:
    """Per-user predictions of the federation in `out` (its coordinator out-dir) and of the baselines; with released
    item statistics also of the private base model each device fits and the adapter corrects (`PRIVATE_BASE`).
    `served`: the adapter's predictions blended with that base at the weight the run serves it at
    (`served_weights`), i.e. what devices and the cold-start service return, instead of the adapter's alone.
    `served_priors`: also what it would serve at each of these `blend-prior-devices` (`served_at_prior(k)`
    references, paired like the baselines; the adapter is scored once). `unclipped` (K=1): also what it would
    serve at the weights of `unclipped_weights`, predictions clipped to the 1-5 scale."""
    run = load_run(out, eval_users, cold_only, population, first, last)
    weights = served_weights(run) if served else {}
    alternatives = {served_at_prior(k): served_weights(run, k) for k in served_priors} if served else {}
    if served and run.released is None:
        raise SystemExit(f"{out}: --served needs the released item statistics (the private base the blend uses)")
    if unclipped and (not served or len(run.arrays) != 1 or run.kept is not None):
        raise SystemExit(f"{out}: --unclipped-weight needs --served, one persona (K=1: every evaluation device's "
                         "sums are that persona's) and the devices' own validation ratings (not --first/--last)")
    above = unclipped_weights(run) if unclipped else {}
    alternatives.update({name: {0: w} for name, w in above.items()})
    other: dict[str, list[np.ndarray]] = {name: [] for name in alternatives}
    pred, personas, private = [], [], []
    for user in run.users:
        device = run.device(user)
        personas.append(run.persona(device))
        pred.append(device.predict(run.arrays[personas[-1]]))
        private.append(device.bias("test") if device.released is not None else None)
        if served:
            adapter, items = pred[-1], device.test["item"].to_numpy()
            for name, alternative in alternatives.items():
                if name in above:  # the device serves weights up to 1 only: the blend itself, kept on the scale
                    base = device.bias_of(items)
                    other[name].append(np.clip(base + above[name] * (np.asarray(adapter, np.float64) - base), 1, 5))
                    continue
                device.blend_weight = alternative[personas[-1]]
                other[name].append(device.served(adapter, items))
            device.blend_weight = weights[personas[-1]]
            pred[-1] = device.served(adapter, items)
        print(f"  user {user}: persona {personas[-1]}, {len(pred[-1])} ratings", flush=True)
    who, y = run.test["user"].to_numpy(), run.test["rating"].to_numpy()
    last_eval = run.history["evaluate"][max(run.history["evaluate"], key=int)]
    reported = last_eval.get("persona_blend_rmse", float("nan")) if served else last_eval["persona_rmse"]
    counts = run.fit["user"].value_counts()
    cold = run.test["user"].map(counts).fillna(0).to_numpy() < run.cfg.cold_start_threshold
    return {"run": str(out), "seed": run.cfg.seed, "who": who, "y": y, "persona": np.concatenate(pred), "cold": cold,
            "items": run.test["item"].to_numpy(),
            # how much training data each rating's movie and user had (what the devices fit on): where an adapter
            # adds to its base can depend on either (`--predictions`)
            "item_ratings": run.test["item"].map(run.fit["item"].value_counts()).fillna(0).to_numpy(int),
            "user_ratings": run.test["user"].map(counts).fillna(0).to_numpy(int),
            "k": len(run.arrays), "sizes": np.bincount(personas, minlength=len(run.arrays)).tolist(),
            "weights": weights,  # with `served`: the blend weight per persona
            "centre": run.factors is not None and run.factors[0].centre is not None,  # the MF base's centre
            "warm": bool(run.cfg.warm_start),  # started from the public warm start (`simulations.warm_start`)
            "reported": reported if eval_users in (None, run.cfg.eval_users) and not cold_only and population is None
            and run.kept is None else float("nan"),
            **baselines(run, who, run.test["item"]),
            **({PRIVATE_BASE: np.concatenate(private)} if all(p is not None for p in private) else {}),
            **{name: np.concatenate(p) for name, p in other.items()}, "alternatives": list(other),
            "alternative_weights": {name: list(w.values()) for name, w in alternatives.items()}}


def predictions_frame(runs: list[dict]) -> pd.DataFrame:
    """One row per scored rating of every run: the run's prediction (the adapter's, or with --served what is
    served), every reference's, and how many training ratings the movie and the user had, for analyses the table
    does not make (e.g. where the adapter adds to its base)."""
    frames = []
    for r in runs:
        refs = [b for b in (*BASELINES, PRIVATE_BASE, *r.get("alternatives", ())) if b in r]
        frames.append(pd.DataFrame({"run": r["run"], "seed": r["seed"], "k": r["k"], "user": r["who"],
                                    "item": r["items"], "rating": r["y"], "cold": r["cold"],
                                    "item_ratings": r["item_ratings"], "user_ratings": r["user_ratings"],
                                    "prediction": r["persona"], **{b: r[b] for b in refs}}))
    return pd.concat(frames, ignore_index=True)


def served_at_prior(prior: float) -> str:
    return f"served at blend-prior-devices {prior:g}"


def table(runs: list[dict]) -> str:
    """Per run (and, over several, each user's squared error averaged over runs) the persona adapter's paired
    per-user MSE difference with each baseline; the private base, which differs per run, is averaged the same way.
    A last line gives each reference's RMSE on the same ratings."""
    refs = [b for b in (*BASELINES, PRIVATE_BASE, *runs[0].get("alternatives", ())) if all(b in r for r in runs)]
    what = "served RMSE (the federation's blend RMSE)" if all(r.get("weights") for r in runs) else \
        "persona adapter RMSE (reported by the federation)"
    lines = [f"| run | users | {what} | "
             + " | ".join(f"vs {b}" for b in refs) + " |", "|---|---:|---|" + "---|" * len(refs)]

    def row(label: str, err: np.ndarray, ref_err: dict[str, np.ndarray], who: np.ndarray, rmse_text: str,
            keep: np.ndarray) -> str:
        cells = []
        for b in refs:
            d = paired_vs(err[keep], ref_err[b][keep], who[keep])
            cells.append(f"{d[0]:+.4f} [{d[1]:+.4f}, {d[2]:+.4f}]")
        return f"| {label} | {len(np.unique(who[keep]))} | {rmse_text} | " + " | ".join(cells) + " |"

    def rows(label: str, err: np.ndarray, ref_err: dict, r: dict, rmse_of) -> list[str]:
        if r["cold"].all():  # --cold-only: one row
            return [row(f"{label}, cold-start users only", err, ref_err, r["who"], rmse_of(r["cold"]), r["cold"])]
        everyone = np.ones_like(r["cold"])
        out = [row(label, err, ref_err, r["who"], rmse_of(everyone), everyone)]
        if r["cold"].any():
            out.append(row(f"{label}, cold-start users only", err, ref_err, r["who"], rmse_of(r["cold"]), r["cold"]))
        return out

    for r in runs:
        err = (r["persona"] - r["y"]) ** 2
        served = r.get("weights") or {}
        label = f"{r['run']} (seed {r['seed']}" + (f", K={r['k']}, users per persona {r['sizes']}" if r["k"] > 1
                                                   else "") + (
            f", served: blended with the private base at w {', '.join(f'{w:.2f}' for w in served.values())}"
            + "".join(f"; {name}: w {', '.join(f'{w:.2f}' for w in ws)}"
                      for name, ws in r.get("alternative_weights", {}).items()) + ")"
            if served else ")")
        lines += rows(label, err, {b: (r[b] - r["y"]) ** 2 for b in refs}, r,
                      lambda k, r=r: f"{rmse(r['persona'][k], r['y'][k]):.4f}" + (
                          f" ({r['reported']:.4f})" if k.all() and np.isfinite(r["reported"]) else ""))
    first = runs[0]
    if len(runs) > 1:
        if any(not np.array_equal(r["who"], first["who"]) or not np.array_equal(r["y"], first["y"]) for r in runs):
            raise SystemExit("the runs evaluated different users or ratings: they cannot be paired")
        # Runs of one setting are pooled (seeds); runs of several settings (K, whether the private MF base had a
        # released population centre, whether the run started from the public warm start) are pooled per setting
        # and then paired with the first (smallest K, no centre, fresh start).
        centres = {r.get("centre", False) for r in runs}
        warm = {r.get("warm", False) for r in runs}

        def setting(r: dict) -> str:
            return f"K={r['k']}" + ("" if len(centres) == 1 else
                                    ", population centre" if r.get("centre", False) else ", no centre") + (
                "" if len(warm) == 1 else ", public warm start" if r.get("warm", False) else ", fresh start")
        by_setting: dict[str, list[dict]] = {}
        # without the centre, and from a fresh adapter, first: the reference the others are paired with
        for r in sorted(runs, key=lambda r: (r["k"], r.get("centre", False), r.get("warm", False))):
            by_setting.setdefault(setting(r), []).append(r)
        pooled = {}
        for label, group in by_setting.items():
            pooled[label] = np.mean([(r["persona"] - r["y"]) ** 2 for r in group], axis=0)
            if len(group) == 1:
                continue
            ref_err = {b: np.mean([(r[b] - r["y"]) ** 2 for r in group], axis=0) for b in refs}
            of = f"{label}, " if len(by_setting) > 1 else ""
            lines += rows(f"{of}over the {len(group)} runs (each user's squared error averaged)", pooled[label],
                          ref_err, first,
                          lambda keep, g=group: f"{np.mean([rmse(r['persona'][keep], r['y'][keep]) for r in g]):.4f}"
                                                " (mean)")
        if len(by_setting) > 1:
            reference, *others = by_setting
            lines += ["", f"| persona adapters, paired with {reference} | runs | per-user MSE diff [95% CI] |",
                      "|---|---|---|"]
            for label in others:
                d = paired_vs(pooled[label], pooled[reference], first["who"])
                lines.append(f"| {label} | {len(by_setting[label])} vs {len(by_setting[reference])} | "
                             f"{d[0]:+.4f} [{d[1]:+.4f}, {d[2]:+.4f}] |")
            if PRIVATE_BASE in refs and len(centres) > 1:  # what the centre does to the base itself
                base = {label: np.mean([(r[PRIVATE_BASE] - r["y"]) ** 2 for r in group], axis=0)
                        for label, group in by_setting.items()}
                for label in others:
                    d = paired_vs(base[label], base[reference], first["who"])
                    lines.append(f"| {PRIVATE_BASE}: {label} | {len(by_setting[label])} vs "
                                 f"{len(by_setting[reference])} | {d[0]:+.4f} [{d[1]:+.4f}, {d[2]:+.4f}] |")
    lines.append("\nRMSE on the same ratings: " + ", ".join(
        f"{b} {np.mean([rmse(r[b], r['y']) for r in runs]):.4f}" for b in refs)
        + (f" (the private base: mean over the {len(runs)} runs)" if len(runs) > 1 and PRIVATE_BASE in refs else ""))
    if "item bias only" in refs:
        # What these users and ratings can resolve: the references themselves against item bias only, paired the
        # same way (a gap a reference cannot show here, the adapter cannot either).
        ref_err = {b: np.mean([(r[b] - r["y"]) ** 2 for r in runs], axis=0) for b in refs}
        lines += ["", "| reference, paired with item bias only | per-user MSE diff [95% CI] |", "|---|---|"]
        for b in refs:
            if b != "item bias only":
                d = paired_vs(ref_err[b], ref_err["item bias only"], first["who"])
                lines.append(f"| {b} | {d[0]:+.4f} [{d[1]:+.4f}, {d[2]:+.4f}] |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("runs", nargs="+", help="coordinator out-dirs of finished federations (history.json inside); "
                                            "with K > 1, --cold-only")
    ap.add_argument("--eval-users", type=int, default=None,
                    help="score this many users (sampled with the run's eval-seed) instead of the run's own; "
                         "e.g. 216 for every paper-protocol user")
    ap.add_argument("--cold-only", action="store_true",
                    help="score only the cold-start users among them (fewer than cold-start-threshold training "
                         "ratings): e.g. with --eval-users 240, every cold-start user of split=mixed")
    ap.add_argument("--population", default=None, metavar="SPLIT",
                    help="draw the users from this split preset instead of the run's (e.g. default: all 943 "
                         "users; those outside the federation are scored as new users)")
    ap.add_argument("--first", type=int, default=None, metavar="N",
                    help="simulated cold start: every scored user keeps only their N oldest training ratings "
                         "(0 to cold-start-threshold - 1; 0: a device that has just enrolled) and is served as a "
                         "cold-start user; compared with the baselines that have no user term and with the private "
                         "base")
    ap.add_argument("--last", type=int, default=None, metavar="N",
                    help="as --first, with each user's N newest training ratings (those just before their test "
                         "ratings, as a real cold-start user's are)")
    ap.add_argument("--served", action="store_true",
                    help="score what the run serves: the adapter blended with the private base at the weight "
                         "validation chose for its version (serve-blend), instead of the adapter alone")
    ap.add_argument("--served-priors", default="", metavar="K,K,...",
                    help="with --served, also score what each run would serve at these blend-prior-devices (e.g. "
                         "0,1e9: each persona's own weight, and the pooled one), paired with what it serves")
    ap.add_argument("--unclipped-weight", action="store_true",
                    help="with --served and K=1, also score what a serving weight allowed above 1 would serve (the "
                         "least-squares weight on the run's evaluation users' validation ratings, not capped at 1) "
                         "and, as a diagnostic, the weight every scored user's validation ratings give")
    ap.add_argument("--predictions", type=Path, default=None, metavar="CSV",
                    help="also write every scored rating's predictions (the run's and each reference's) with the "
                         "movie's and the user's training-rating counts to this CSV")
    args = ap.parse_args(argv)
    try:
        priors = tuple(float(k) for k in args.served_priors.split(",") if k.strip())
    except ValueError:
        raise SystemExit(f"--served-priors: numbers >= 0, got {args.served_priors!r}") from None
    if any(not 0 <= k < float("inf") for k in priors) or (priors and not args.served):
        raise SystemExit("--served-priors needs --served and finite numbers >= 0")
    runs = [rescore(Path(p), args.eval_users, args.cold_only, args.population, args.first, args.last, args.served,
                    priors, args.unclipped_weight) for p in args.runs]
    what = "what is served (the adapter blended with the private base)" if args.served else "persona adapter"
    print(f"\nPaired per-user MSE difference, {what} minus baseline [95% CI]:\n")
    print(table(runs))
    if args.predictions is not None:
        args.predictions.parent.mkdir(parents=True, exist_ok=True)
        predictions_frame(runs).to_csv(args.predictions, index=False)
        print(f"\nPer-rating predictions: {args.predictions}")


if __name__ == "__main__":
    main()
