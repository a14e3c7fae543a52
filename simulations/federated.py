"""The whole system on one machine: a Flower simulation with one node per MovieLens user.

    python -m simulations.federated            # real SmolLM2-135M, ML-100K paper protocol: ~30 min on 2 CPU cores
    python -m simulations.federated --quick    # 2 rounds, 6 evaluation users: under 10 minutes
    python -m simulations.federated --set split=mixed     # 240 users of every activity level, cold start included
    python -m simulations.federated --set split=default   # all 943 users, 80/20 split
    python -m simulations.federated --personas 2,4,8,elbow --epsilons 1,4,8 --repeats 3   # the full comparison

Runs, on the same split and the same seeded evaluation users (`MAIN_JOB` below: item statistics, a private MF base
from 30 rounds of federated item factors, adapters that correct it, no personal fine-tuning (the validation ratings
chose none), a validation split, genre-deviation personas; `--set` changes any setting):
  classical baselines and the SLM with vanilla prompting (no adapter),
  the federation with K=1 (one shared adapter) and with K personas,
  optionally the K-persona federation under user-level DP at several epsilons (`--epsilons`),
  each federation `--repeats` times with training seeds seed, seed+1, ... (the table gives mean and sd),
and writes results/federated/results.{md,csv,json} plus rmse_per_round.png (lines over the evaluated rounds, or
bars when the run evaluated once, as --quick does); each run's persona versions go to results/federated/<run>/ and
its simulated devices' encrypted stores to results/federated/devices/<run>/. The console shows progress (a line per
baseline and per round) and the tables; library logging and warnings go to results/federated/federated.log.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from common import timing
from common.config import FederationConfig, PromptConfig, ScoringConfig, split_preset
from common.data import load_movielens
from common.evaluation import predict_users
from common.metrics import mae, rmse
from common.model import load_base_model
from common.split import sample_users, temporal_split, validation_split
from server.strategy import ACTIVITY_EDGES, activity_bucket
from simulations import console
from simulations.classical import Biases, GlobalMean, ItemBias, tune_mf

# The main job runs the best configuration measured so far (docs/results.md, "Adapters as a correction to the bias
# model"): the released per-movie statistics in every prompt, adapters that correct the private user+item bias
# model, a 10% validation split for the blend weights, one evaluation of 40 users after the last round, and the
# paired per-user comparison with the private bias model; personas from users' per-genre rating deviations, which
# separate taste ~10x better than profile-text embeddings (those are no better than random partitions) and, unlike
# the embeddings, survive user-level DP at epsilon 8 (docs/personas_and_dp_scaling.md; the product default too).
# pyproject.toml's defaults (what `flwr run .` and a deployment use) keep the rest opt-in; `--set` overrides any.
MAIN_JOB = {"item-stats": True, "validation-fraction": 0.1, "residual-to-bias": True, "eval-users": 40,
            "eval-every": 5, "discovery-features": "genre-deviation", "item-factors-rounds": 30,
            # On the MF base the validation ratings pick no personal fine-tuning (docs/results.md, "On the private MF
            # base"): the device serves the persona adapter over its own user factors, and saves ~30% of the wall.
            "personal-steps": 0}
QUICK = {"num-rounds": 2, "eval-every": 2, "eval-users": 6, "fraction-train": 0.025, "kmeans-iters": 2,
         "item-factors-rounds": 5}


def run_federation(overrides: dict, num_nodes: int, cpus_per_node: float | None = None, mods=()) -> dict:
    """One Flower simulation (its ClientApp wrapped in `mods`, e.g. simulated attackers); returns the ServerApp's
    history."""
    from client.client_app import build_app as client_app
    from server.server_app import build_app as server_app
    from simulations.console import worker_logging
    from simulations.runtime import LOG_ENV, simulate

    # Simulations replay exactly: DP sampling and noise come from the public seed (`reproducible`, recorded in
    # history.json's config), which voids the privacy claim against anyone who knows the seed. The accounted
    # epsilon is what a deployed device, drawing the same mechanism from secret randomness, would spend.
    overrides = {"reproducible": True, **overrides}
    cfg = FederationConfig.from_run_config(overrides)
    out = Path(cfg.out_dir)
    for d in (out, Path(cfg.device_dir)):  # a run's directories hold that run's persona versions and devices only
        if d.exists():
            shutil.rmtree(d)
    overrides = {**overrides, "min-nodes": num_nodes}
    # Every process (Ray's device actors inherit the variable) writes its phase totals here: the wall breakdown.
    timing_dir = Path(tempfile.mkdtemp(prefix="personafl-timing-"))
    previous = os.environ.get(timing.ENV)
    os.environ[timing.ENV] = str(timing_dir)
    timing.reset()
    started = time.time()
    try:
        simulate(server_app(overrides), client_app(overrides, (worker_logging, *mods)), num_nodes, cpus_per_node)
        wall = time.time() - started
        collected = timing.collect(timing_dir)
    finally:
        shutil.rmtree(timing_dir, ignore_errors=True)
        if previous is None:
            os.environ.pop(timing.ENV, None)
        else:
            os.environ[timing.ENV] = previous
    history_file = out / "history.json"
    if not history_file.exists():
        where = os.environ.get(LOG_ENV) or "the log above"
        raise RuntimeError(f"the simulation ended without writing {history_file}; see {where}")
    history = json.loads(history_file.read_text())
    history["timing"] = {"wall_s": wall, "seconds": timing.breakdown(collected, wall, started),
                         "calls": collected["calls"]}
    history_file.write_text(json.dumps(history, indent=2))
    return history


def baseline_rows(cfg: FederationConfig, eval_users, with_slm: bool) -> list[dict]:
    """Rows of the results table; each also carries its RMSE per user-activity bucket under "activity"."""
    data = load_movielens(cfg.dataset)
    split = temporal_split(data.ratings, split_preset(cfg.split))
    # the devices' validation hold-out is held out of the baselines too: every method fits on the same ratings
    train, _ = validation_split(split.train, cfg.validation_fraction)
    test = split.test[split.test["user"].isin(eval_users)]
    counts = train["user"].value_counts()

    def buckets(users: pd.Series) -> pd.Series:
        return users.map(counts).fillna(0).astype(int).map(activity_bucket)

    rows = []
    for name, fit in [("global mean", lambda: GlobalMean().fit(train)),
                      # what a recommender says to a user it knows nothing about: the cold-start bar (#17)
                      ("item bias only", lambda: ItemBias().fit(train)),
                      ("user+item bias", lambda: Biases().fit(train)),
                      ("matrix factorisation", lambda: tune_mf(train, seed=cfg.seed))]:
        start = time.perf_counter()
        pred = fit().predict(test["user"], test["item"])
        rows.append(_row(name, "-", test["rating"], pred, len(eval_users), time.perf_counter() - start,
                         buckets(test["user"])))
        print(f"baseline {name}: RMSE {rows[-1]['rmse']:.4f} ({rows[-1]['wall_s']:.0f} s)", flush=True)
    if with_slm:
        start = time.perf_counter()
        model, tok = load_base_model(cfg.base_model)
        pred = predict_users(model, tok, data.items, train, test, eval_users, PromptConfig(), ScoringConfig(),
                             memory_items=cfg.memory_items)
        rows.append(_row("SLM vanilla prompting" + _memory(cfg), "-", pred["rating"], pred["pred"], len(eval_users),
                         time.perf_counter() - start, buckets(pred["user"])))
        print(f"baseline {rows[-1]['method']}: RMSE {rows[-1]['rmse']:.4f} ({rows[-1]['wall_s']:.0f} s)", flush=True)
    return rows


def _memory(cfg: FederationConfig) -> str:
    return f" + long-term memory ({cfg.memory_items})" if cfg.memory_items else ""


def _target(cfg: FederationConfig) -> str:
    return (f", residual to {_base(cfg)}" if cfg.residual_to_bias else "") + _warm(cfg)


def _warm(cfg: FederationConfig) -> str:
    """A run that started from the public warm start says so in every row it prints."""
    return ", from the public warm start" if cfg.warm_start else ""


def _base(cfg: FederationConfig) -> str:
    """The private base model's name: MF with released item factors, else the user+item bias model."""
    return "private MF" if cfg.item_factors_rounds else "private bias"


def _row(method, personas, true, pred, users, wall, buckets: pd.Series) -> dict:
    true, pred = pd.Series(np.asarray(true, float)), pd.Series(np.asarray(pred, float))
    buckets = pd.Series(np.asarray(buckets))
    activity = {b: rmse(pred[buckets == b], true[buckets == b]) for b in sorted(set(buckets))}
    return {"method": method, "K": personas, "users": users, "test_ratings": len(true),
            "rmse": rmse(pred, true), "mae": mae(pred, true), "wall_s": round(wall, 1), "activity": activity}


def dp_level(epsilon: float, device_noise: float) -> dict:
    """One privacy level's settings: central user-level DP at `epsilon` per persona (discovery included) and
    DP-SGD at `device_noise` on every device (example level, from each device's ledger)."""
    return {"dp-user-target-epsilon": float(epsilon), "dp-device-noise": float(device_noise)}


def federated_rows(name: str, k: int, history: dict, base: str = "private bias") -> list[dict]:
    """The persona and personal adapters' rows; with blend sums (item-stats and validation-fraction on) also the
    private bias model's row and each adapter blended with it (weight fitted on validation; no MAE: the pooled sums
    give the blend's squared error at any weight, not its absolute error)."""
    evals = history["evaluate"]
    last = evals[max(evals, key=int)]
    paths = [("persona", "persona adapter"), ("personal", "personal adapter")]
    if "bias_rmse" in last:
        paths += [("bias", "private MF (released item factors + on-device user factors)" if base == "private MF"
                   else "private user+item bias (released item statistics)")]
        # with `serve-blend` a one-persona run serves exactly this blend (its version's weight pools the same
        # validation sums); with several personas each version is served at its own weight (the registry's)
        served = history.get("serving_blend") and k == 1
        paths += [(f"{p}_blend", f"{label} + {base}, w={last[f'{p}_blend_weight']:.2f} on validation"
                   + (f" (served: {who})" if served else ""))
                  for (p, label), who in zip(paths[:2], ("cold-start service", "devices"))]
        # with several personas, what is served: each persona at its own weight leaning on the pool (the strategy's
        # `served_metrics`, the registry's rule)
        paths += [(f"{p}_served", f"{label} + {base}, per-persona weights "
                   + "/".join(f"{last[f'p{j}_{p}_served_weight']:.2f}" for j in range(k)
                              if f"p{j}_{p}_served_weight" in last) + f" on validation (served: {who})")
                  for (p, label), who in zip(paths[:2], ("cold-start service", "devices"))
                  if history.get("serving_blend") and k > 1 and f"{p}_served_rmse" in last]
    # counts pooled through secure (quantised) sums are within rounding of an integer, either side: round, not int
    return [{"method": f"{name}: {label}", "K": k, "users": round(last["users"]),
             "test_ratings": round(last["ratings"]), "rmse": last[f"{path}_rmse"], "mae": last.get(f"{path}_mae"),
             "wall_s": round(history["seconds"], 1),
             # the paired per-user MSE difference from the private bias model, [mean, lo, hi] (plain aggregation)
             "vs_bias": [last[f"{path}_vs_bias_{k}"] for k in ("mean", "lo", "hi")]
             if f"{path}_vs_bias_mean" in last else None,
             "activity": {key[: -len(f"_{path}_rmse")]: v for key, v in last.items()
                          if key.startswith("ratings_") and key.endswith(f"_{path}_rmse")}}
            for path, label in paths]


def missing_evaluations(history: dict, expected: int) -> str | None:
    """Why a run's last evaluation is not comparable, or None: fewer users replied than were sampled (a device that
    misses the round timeout, e.g. on a loaded machine, is silently left out of the pooled figures)."""
    evals = history.get("evaluate") or {}
    if not evals:
        return None
    got = round(evals[max(evals, key=int)].get("users", expected))  # a secure sum's count: within rounding
    if got >= expected:
        return None
    return (f"the last evaluation pooled {got} of {expected} evaluation users (the others missed the round "
            f"timeout?); its rows are not comparable with runs that pooled all of them")


def _mean_rmse(runs: list[dict], rnd: int, path_name: str) -> float | None:
    """A federation's RMSE on one path at one evaluated round, the mean over its repeats (None if withheld)."""
    values = [h["evaluate"].get(str(rnd), {}).get(f"{path_name}_rmse") for h in runs]
    return float(np.mean(values)) if values and None not in values else None


def plot(histories: dict[str, list[dict]], baselines: list[dict], path: Path | None = None):
    """RMSE of each federation (the mean over its repeats) against the baselines, drawn as the run has it: lines
    over the evaluated rounds, or, when the run evaluated once (`--quick`), bars, where a line would be one dot.
    Returns the figure (a plain Figure: nothing stays open in pyplot), saved to `path` if given."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    rounds = sorted({int(r) for runs in histories.values() for h in runs for r in h["evaluate"]})
    users = {round(h["evaluate"][str(r)]["users"]) for runs in histories.values() for h in runs
             for r in map(str, rounds) if "users" in h["evaluate"].get(r, {})} or {r["users"] for r in baselines}
    rmse_label = "held-out RMSE (lower is better)"
    who = f"{'/'.join(map(str, sorted(users)))} evaluation users' test ratings"
    paths = (("persona", "shared persona adapter", "-o", "tab:blue"),
             ("personal", "on-device personal adapter", "--s", "tab:orange"),
             # with item-stats and validation-fraction on (absent otherwise, and then not drawn)
             ("bias", "private user+item bias", ":d", "tab:purple"),
             ("personal_blend", "personal adapter + private bias", "-.^", "tab:green"))
    fig = Figure(figsize=(8, 4.8))
    ax = fig.subplots()
    if len(rounds) > 1:
        for name, runs in histories.items():
            for path_name, label, style, _ in paths:
                points = [(r, _mean_rmse(runs, r, path_name)) for r in rounds]
                points = [(r, v) for r, v in points if v is not None]
                if not points:  # a path this run does not report (e.g. no blend without item statistics)
                    continue
                ax.plot([r for r, _ in points], [v for _, v in points], style, label=f"{name}: {label}")
        for row, colour in zip(baselines, ("grey", "tab:cyan", "tab:brown", "tab:olive", "black")):
            ax.axhline(row["rmse"], color=colour, linestyle=":", label=f"{row['method']} (baseline)")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("federated round (rounds with an evaluation)")
        ax.set_ylabel(rmse_label)
        ax.set_title(who, fontsize=10)
        ax.legend(fontsize=8)
    else:
        labels, values, colours = [], [], []
        for row in baselines:
            labels.append(f"{row['method']} (baseline)")
            values.append(row["rmse"])
            colours.append("grey")
        for name, runs in histories.items():
            for path_name, label, _, colour in paths:
                value = _mean_rmse(runs, rounds[0], path_name) if rounds else None
                if value is not None:
                    labels.append(f"{name}: {label}")
                    values.append(value)
                    colours.append(colour)
        # Horizontal bars: the method names are long; each bar carries its value, the differences being small.
        bars = ax.barh(range(len(values)), values, color=colours)
        ax.set_yticks(range(len(values)), labels, fontsize=8)
        ax.invert_yaxis()
        ax.bar_label(bars, fmt="%.4f", fontsize=8, padding=2)
        ax.set_xlim(0, max(values, default=1.0) * 1.15)
        ax.set_xlabel(rmse_label)
        ax.set_title(who + (f"\nafter federated round {rounds[0]}, the run's one evaluation" if rounds else ""),
                     fontsize=10)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=120)
    return fig


def markdown(rows: list[dict]) -> str:
    """The results table; with repeated runs, their count and the RMSE's sd across them get a column; with the
    private bias model's paired comparison (item-stats, validation-fraction, plain aggregation), its column."""
    repeated = any(r.get("repeats", 1) > 1 for r in rows)
    paired = any(r.get("vs_bias") for r in rows)
    spread = " RMSE sd (runs) |" if repeated else ""
    vs = " per-user MSE diff vs the private base (MF or bias model) [95% CI] |" if paired else ""
    lines = [f"| method | K | users | test ratings | RMSE |{spread} MAE | wall (s) |{vs}",
             "|---|---:|---:|---:|---:|" + ("---:|" if repeated else "") + "---:|---:|" + ("---|" if paired else "")]
    for r in rows:
        cell = ""
        if repeated:
            cell = f" {r['rmse_sd']:.4f} ({r['repeats']}) |" if r.get("rmse_sd") is not None else " - |"
        mae_ = "-" if r.get("mae") is None else f"{r['mae']:.4f}"
        line = (f"| {r['method']} | {r['K']} | {r['users']} | {r['test_ratings']:,} | {r['rmse']:.4f} |{cell} "
                f"{mae_} | {r['wall_s']:.1f} |")
        if paired:
            value = r.get("vs_bias") or []
            runs = value if value and isinstance(value[0], (list, type(None))) else [value]  # one run or repeats
            line += " " + ("; ".join(f"{m:+.4f} [{lo:+.4f}, {hi:+.4f}]" for m, lo, hi in filter(None, runs))
                           or "-") + " |"
        lines.append(line)
    return "\n".join(lines)


def persona_runs(spec: str, overrides: dict, epsilons: str = "", dp_k: int = 4,
                 device_noise: float = 1.0, single: bool = True) -> list[tuple[str, int | str, str, dict]]:
    """(name, K or 'elbow', directory name, settings) for each federation: K=1 first (unless `single` is false),
    then the requested persona counts, then K=dp_k at each user-level epsilon."""
    runs: list[tuple[str, int | str, str, dict]] = [("single adapter", 1, "k1", {"persona-candidates": ""})] \
        if single else []
    for part in (p.strip() for p in spec.split(",") if p.strip()):
        if part == "elbow":
            candidates = overrides.get("persona-candidates") or "1,2,4,8"
            runs.append((f"K at the elbow of {candidates}", "elbow", "kelbow", {"persona-candidates": candidates}))
        elif not part.isdigit() or int(part) < 1:
            raise SystemExit(f"--personas: each K must be an integer >= 1 or 'elbow', got {part!r}")
        elif int(part) > 1:
            runs.append((f"{int(part)} personas", int(part), f"k{int(part)}", {"persona-candidates": ""}))
    for part in (p.strip() for p in epsilons.split(",") if p.strip()):
        try:
            eps = float(part)
        except ValueError:
            eps = -1.0
        if not eps > 0:
            raise SystemExit(f"--epsilons: each must be a number > 0, got {part!r}")
        name = f"{dp_k} personas, user-level ε={eps:g}" if dp_k > 1 else f"single adapter, user-level ε={eps:g}"
        # Under DP each MF round is one more discovery release, and at eps <= 8 the private MF was no better than the
        # one-shot private bias model (docs/results.md, "Federated MF, without a language model"): the DP rows keep
        # the bias base and its budget.
        runs.append((name, dp_k, f"k{dp_k}-eps{eps:g}",
                     {"persona-candidates": "", "item-factors-rounds": 0, **dp_level(eps, device_noise)}))
    return runs


def summarise(repeats: list[list[dict]]) -> list[dict]:
    """One run's rows (persona, personal) over its repeats: mean RMSE/MAE/wall, the RMSE's sample sd, and the
    mean RMSE per activity bucket. K is shown as K, or e.g. "2/4" if repeats chose different K."""
    rows = []
    for path_rows in zip(*repeats):
        first = path_rows[0]
        ks = sorted({r["K"] for r in path_rows})
        rmses = [r["rmse"] for r in path_rows]
        buckets = sorted({b for r in path_rows for b in r["activity"]})
        rows.append({**first, "K": ks[0] if len(ks) == 1 else "/".join(map(str, ks)),
                     "rmse": float(np.mean(rmses)),
                     "mae": None if any(r["mae"] is None for r in path_rows) else
                     float(np.mean([r["mae"] for r in path_rows])),
                     "rmse_sd": float(np.std(rmses, ddof=1)) if len(rmses) > 1 else None,
                     "vs_bias": [r["vs_bias"] for r in path_rows] if any(r.get("vs_bias") for r in path_rows)
                     else None,
                     "rmse_runs": rmses, "repeats": len(path_rows),
                     "wall_s": round(float(np.mean([r["wall_s"] for r in path_rows])), 1),
                     "activity": {b: float(np.mean([r["activity"][b] for r in path_rows if b in r["activity"]]))
                                  for b in buckets}})
    return rows


def activity_markdown(rows: list[dict]) -> str:
    """RMSE per user-activity bucket (training ratings per user), one column per bucket present."""
    order = [activity_bucket(lo) for lo in (0, *ACTIVITY_EDGES)]
    present = [b for b in order if any(b in r["activity"] for r in rows)]
    names = [b.removeprefix("ratings_").replace("_plus", "+").replace("_", "-") for b in present]
    lines = ["| method | " + " | ".join(f"{n} ratings" for n in names) + " |", "|---|" + "---:|" * len(present)]
    lines += ["| " + r["method"] + " | " + " | ".join(f"{r['activity'][b]:.4f}" if b in r["activity"] else "-"
                                                     for b in present) + " |" for r in rows]
    if any(", w=" in r["method"] for r in rows):
        # the federation reports each bucket's blend at a weight fitted on that bucket's own validation sums
        lines.append("\nBlend rows (w=...): each bucket's figure is the blend at a weight fitted on that bucket's own "
                     "validation ratings, not at the run's w, which is what is served.")
    if any("per-persona weights" in r["method"] for r in rows):
        lines.append("\nRows of what several personas serve (per-persona weights): no figure per bucket, whose "
                     "evaluation sums pool users across personas.")
    return "\n".join(lines)


def timing_markdown(histories: dict[str, list[dict]]) -> str:
    """Where each federation's wall went (mean over its repeats): seconds and share per phase, and the share that
    was model forward/backward work (the `model:` phases)."""
    names = [n for n, runs in histories.items() if all("timing" in h for h in runs)]
    if not names:
        return ""
    phases = sorted({p for n in names for h in histories[n] for p in h["timing"]["seconds"]},
                    key=lambda p: -np.mean([h["timing"]["seconds"].get(p, 0.0) for n in names for h in histories[n]]))
    mean = {n: {p: float(np.mean([h["timing"]["seconds"].get(p, 0.0) for h in histories[n]])) for p in phases}
            for n in names}
    wall = {n: float(np.mean([h["timing"]["wall_s"] for h in histories[n]])) for n in names}
    lines = ["| phase | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    lines += [f"| {p} | " + " | ".join(f"{mean[n][p]:.0f} s ({100 * mean[n][p] / wall[n]:.0f}%)" for n in names) + " |"
              for p in phases]
    lines.append("| **wall** | " + " | ".join(f"{wall[n]:.0f} s" for n in names) + " |")
    model = {n: sum(v for p, v in mean[n].items() if p.startswith("model:")) for n in names}
    lines.append("| **model forward/backward (all `model:` phases)** | "
                 + " | ".join(f"{100 * model[n] / wall[n]:.0f}%" for n in names) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="under 10 minutes: 2 rounds, 6 evaluation users")
    p.add_argument("--personas", default="4",
                   help="K for the persona runs, comma-separated, e.g. 2,4,8 (K=1, the single adapter, runs first "
                        "unless --no-single-adapter); "
                        "'elbow' lets federated discovery pick K from persona-candidates (default 1,2,4,8)")
    p.add_argument("--no-slm-baseline", action="store_true", help="skip the vanilla-prompting row")
    p.add_argument("--no-single-adapter", action="store_true",
                   help="skip the K=1 federations (e.g. when an earlier command's K=1 runs, same settings, are to be "
                        "paired with these by simulations.rescore)")
    p.add_argument("--epsilons", default="",
                   help="also run K=--dp-personas under user-level DP at each of these epsilons, e.g. 1,4,8 "
                        "(with DP-SGD on the devices at --device-noise)")
    p.add_argument("--dp-personas", type=int, default=4, help="K of the DP runs")
    p.add_argument("--device-noise", type=float, default=1.0, help="DP-SGD noise multiplier on devices in DP runs")
    p.add_argument("--repeats", type=int, default=1,
                   help="run each federation this many times, with training seeds seed, seed+1, ... (same "
                        "evaluation users); the table shows the mean and the RMSE's sd")
    p.add_argument("--out", default="results/federated")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="run-config override, e.g. --set num-rounds=3 --set base-model=tiny (repeatable)")
    args = p.parse_args(argv)
    with console.session(Path(args.out) / "federated.log"):
        overrides = {**MAIN_JOB, **(QUICK if args.quick else {})}
        for item in args.set:
            key, _, value = item.partition("=")
            overrides[key] = value
        cfg = FederationConfig.from_run_config(overrides)
        data = load_movielens(cfg.dataset)
        split = temporal_split(data.ratings, split_preset(cfg.split))
        nodes = len(split.users)
        eval_users = sample_users(split.users, cfg.eval_users, cfg.eval_seed)
        print(f"{data.name} / split '{cfg.split}': {nodes} devices, {len(eval_users)} evaluation users, "
              f"{cfg.num_rounds} rounds, base {cfg.base_model}")

        if args.repeats < 1:
            raise SystemExit(f"--repeats must be >= 1, got {args.repeats}")
        runs = persona_runs(args.personas, overrides, args.epsilons, args.dp_personas, args.device_noise,
                            single=not args.no_single_adapter)
        if not runs:
            raise SystemExit("nothing to run: --no-single-adapter without --personas > 1 or --epsilons")
        out = Path(args.out)
        rows = baseline_rows(cfg, eval_users, with_slm=not args.no_slm_baseline)
        histories: dict[str, list[dict]] = {}
        for name, k, slug, extra in runs:
            repeats = []
            for r in range(args.repeats):
                seed = cfg.seed + r
                run_dir = slug if args.repeats == 1 else f"{slug}-seed{seed}"
                repeat = f", seed {seed} ({r + 1}/{args.repeats})" if args.repeats > 1 else ""
                print(f"\n=== federation: {name}{repeat} ===", flush=True)
                history = run_federation({**overrides, **extra, "seed": seed,
                                          "num-personas": k if k != "elbow" else 1, "out-dir": str(out / run_dir),
                                          "device-dir": str(out / "devices" / run_dir)}, nodes)
                histories.setdefault(name, []).append(history)
                if (short := missing_evaluations(history, len(eval_users))):
                    print(f"WARNING: {short}", flush=True)
                run_cfg = FederationConfig.from_run_config({**overrides, **extra})  # the DP rows' base differs
                repeats.append(federated_rows(name + _memory(run_cfg) + _target(run_cfg), history["personas"]["k"],
                                              history, _base(run_cfg)))
            rows += summarise(repeats)

        table = markdown(rows) + "\n\nRMSE by user activity (training ratings per user):\n\n" + activity_markdown(rows)
        if breakdown := timing_markdown(histories):
            table += "\n\nWhere each federation's wall went (exclusive phases, mean over repeats):\n\n" + breakdown
        print("\n" + table)
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.md").write_text(table + "\n")
        pd.DataFrame([{k: v for k, v in r.items() if k not in ("activity", "rmse_runs")} for r in rows]).to_csv(
            out / "results.csv", index=False)
        (out / "results.json").write_text(json.dumps({"overrides": overrides, "rows": rows, "histories": histories},
                                                     indent=2, default=str))
        plot(histories, [r for r in rows if r["K"] == "-"], out / "rmse_per_round.png")
        print(f"\nwrote {out}/results.{{md,csv,json}} and {out}/rmse_per_round.png")


if __name__ == "__main__":
    main()
