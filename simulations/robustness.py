"""Robustness of the federation: poisoned updates with plain vs robust aggregation, and devices dropping out.

    python -m simulations.robustness            # real SmolLM2-135M, K=1, 3 rounds: ~6 runs of ~8 minutes
    python -m simulations.robustness --quick    # the federated simulation's --quick settings

Scenarios, each a real Flower simulation on the same split, evaluation users and seed:
  clean, plain mean                                       (the reference)
  --poison-fraction of devices send -scale x their delta  (sign-flip; or --poison-kind scale: +scale x delta)
      with plain mean, trimmed mean, coordinate-wise median, and plain mean behind an L2 norm bound
  --dropout of the sampled devices fail each round        (plain mean; the round goes on with the rest)
K defaults to 1 so each round has enough updates per persona for trimming to mean something (13 devices per round
by default; a trimmed mean over 3 updates at trim 0.2 cuts none).

The norm bound is set from the clean run: `--norm-factor` x the largest honest update norm the coordinator saw.
Writes results/robustness/robustness.{md,csv,json} and robustness.png; library logging and warnings go to
results/robustness/robustness.log (the console shows progress and the tables).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd

from common.config import FederationConfig, split_preset
from common.data import load_movielens
from common.split import temporal_split
from server.registry import PersonaRegistry
from simulations.adversaries import dropout, poisoning
from simulations import console
from simulations.federated import QUICK, run_federation


def adapter_drift(out: Path) -> float:
    """Mean over personas of the L2 distance between the final persona adapter and its initial version."""
    registry = PersonaRegistry(out)
    drifts = []
    for persona in registry.personas():
        versions, _ = registry.versions(persona, limit=10_000)
        first, last = registry.arrays(versions[0]["id"]), registry.arrays(versions[-1]["id"])
        drifts.append(np.sqrt(sum(float(((last[k] - first[k]) ** 2).sum()) for k in first)))
    return float(np.mean(drifts))


def max_update_norm(history: dict) -> float:
    return max(float(m.get("max_update_norm", 0.0)) for m in history["train"].values())


def row(name: str, history: dict, out: Path, wall: float) -> dict:
    last = history["evaluate"][max(history["evaluate"], key=int)]
    updates = sum(int(v) for m in history["train"].values() for k, v in m.items() if k.endswith("_devices"))
    return {"scenario": name, **{k: last[k] for k in ("persona_rmse", "persona_mae", "personal_rmse", "personal_mae")},
            "updates_aggregated": updates, "rejected": sum(int(m.get("rejected", 0)) for m in history["train"].values()),
            "adapter_drift": adapter_drift(out), "eval_users": round(last["users"]), "wall_s": wall}


def markdown(rows: list[dict]) -> str:
    lines = ["| scenario | persona RMSE | persona MAE | personal RMSE | personal MAE | updates aggregated | rejected "
             "| adapter drift | wall (s) |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['scenario']} | {r['persona_rmse']:.4f} | {r['persona_mae']:.4f} | {r['personal_rmse']:.4f} "
              f"| {r['personal_mae']:.4f} | {r['updates_aggregated']} | {r['rejected']} | {r['adapter_drift']:.3f} "
              f"| {r['wall_s']:.0f} |" for r in rows]
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4.5))
    x = np.arange(len(rows))
    ax.bar(x - 0.2, [r["persona_rmse"] for r in rows], 0.4, label="persona adapter")
    ax.bar(x + 0.2, [r["personal_rmse"] for r in rows], 0.4, label="personal adapter")
    ax.axhline(rows[0]["persona_rmse"], color="black", linestyle=":", linewidth=0.8, label="clean, persona")
    ax.set_xticks(x, [r["scenario"] for r in rows], rotation=20, ha="right", fontsize=8)
    ax.set_ylabel("held-out RMSE")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="the federated simulation's --quick settings")
    p.add_argument("--personas", type=int, default=1)
    p.add_argument("--poison-fraction", type=float, default=0.2)
    p.add_argument("--poison-kind", default="sign-flip", choices=("sign-flip", "scale"))
    p.add_argument("--poison-scale", type=float, default=10.0)
    p.add_argument("--dropout", type=float, default=0.3)
    p.add_argument("--norm-factor", type=float, default=2.0, help="norm bound = this x the clean run's largest update")
    p.add_argument("--scenarios", default="clean,mean,trimmed-mean,median,norm-bound,dropout",
                   help="comma-separated subset of the scenarios above, in this order")
    p.add_argument("--out", default="results/robustness")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="run-config override")
    args = p.parse_args(argv)
    with console.session(Path(args.out) / "robustness.log"):

        overrides = dict(QUICK) if args.quick else {"num-rounds": 3, "eval-every": 3, "eval-users": 12}
        overrides.update(item.partition("=")[::2] for item in args.set)
        # Each scenario measures its aggregation alone: the default sanity bound on update norms (which a boosted
        # attack can exceed) is off unless set; the norm-bound scenario sets its own.
        overrides.setdefault("max-update-norm", 0.0)
        overrides["num-personas"] = args.personas
        cfg = FederationConfig.from_run_config(overrides)
        nodes = len(temporal_split(load_movielens(cfg.dataset).ratings, split_preset(cfg.split)).users)
        attack = poisoning(args.poison_fraction, args.poison_kind, args.poison_scale, seed=cfg.seed)
        label = f"{args.poison_fraction:.0%} {args.poison_kind} x{args.poison_scale:g}"
        wanted = [s.strip() for s in args.scenarios.split(",") if s.strip()]
        if "norm-bound" in wanted and "clean" not in wanted:
            raise SystemExit("the norm-bound scenario takes its bound from the clean run: include 'clean'")

        out = Path(args.out)
        rows, bound = [], 0.0
        for slug in wanted:
            settings, mods = {}, [attack]
            if slug == "clean":
                name, mods = "clean, mean", []
            elif slug in ("mean", "trimmed-mean", "median"):
                name, settings = f"{label}, {slug}", {"aggregation": slug}
            elif slug == "norm-bound":
                name, settings = f"{label}, mean + norm bound {bound:.3g}", {"max-update-norm": bound}
            elif slug == "dropout":
                name, mods = f"dropout {args.dropout:.0%}, mean", [dropout(args.dropout, seed=cfg.seed)]
            else:
                raise SystemExit(f"unknown scenario {slug!r}")
            print(f"\n=== scenario: {name} ===")
            run = {**overrides, **settings, "out-dir": str(out / slug), "device-dir": str(out / "devices" / slug)}
            start = time.perf_counter()
            history = run_federation(run, nodes, mods=mods)
            rows.append(row(name, history, out / slug, time.perf_counter() - start))
            if slug == "clean":
                bound = args.norm_factor * max_update_norm(history)
            print(markdown(rows[-1:]))

        table = markdown(rows)
        print("\n" + table)
        out.mkdir(parents=True, exist_ok=True)
        (out / "robustness.md").write_text(table + "\n")
        pd.DataFrame(rows).to_csv(out / "robustness.csv", index=False)
        (out / "robustness.json").write_text(json.dumps({"overrides": overrides, "args": vars(args), "rows": rows},
                                                        indent=2, default=str))
        plot(rows, out / "robustness.png")
        print(f"\nwrote {out}/robustness.{{md,csv,json}} and {out}/robustness.png")


if __name__ == "__main__":
    main()
