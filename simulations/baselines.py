"""Baseline table: classical predictors and the SLM with vanilla prompting on the temporal test split.

    python -m simulations.baselines                      # ML-100K, 80/20 split, SmolLM2-135M on 100 users
    python -m simulations.baselines --split paper        # the paper's 216 users, 60/40
    python -m simulations.baselines --slm-users all      # SLM on every test rating (~30 min on 2 CPU cores)

Classical rows are scored on every test rating and, for a like-for-like comparison, also on the fixed
user sample the SLM is scored on (the SLM costs ~2.5 ms per token on this CPU).
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from common.config import PromptConfig, ScoringConfig, split_preset
from common.data import load_movielens
from common.evaluation import predict_users
from common.metrics import mae, rmse
from common.model import load_base_model
from common.split import sample_users, temporal_split
from simulations.classical import Biases, GlobalMean, tune_mf


@dataclass
class Row:
    method: str
    scope: str
    users: int
    test_ratings: int
    rmse: float
    mae: float
    wall_s: float


def _row(method: str, scope: str, test: pd.DataFrame, pred: np.ndarray, wall: float) -> Row:
    return Row(method, scope, test["user"].nunique(), len(test), rmse(pred, test["rating"]),
               mae(pred, test["rating"]), round(wall, 2))


def run(args: argparse.Namespace) -> list[Row]:
    data = load_movielens(args.dataset)
    split = temporal_split(data.ratings, split_preset(args.split))
    test = split.test
    sample = sample_users(split.users, None if args.slm_users == "all" else int(args.slm_users), args.seed)
    sample_test = test[test["user"].isin(sample)]
    sample_scope = "all users" if len(sample) == len(split.users) else f"{len(sample)}-user sample"
    print(f"{data.name}: {len(split.train):,} train / {len(test):,} test ratings, "
          f"{len(split.users)} users (split '{args.split}')")

    rows: list[Row] = []
    fitters = [("global mean", lambda: GlobalMean().fit(split.train)),
               ("user+item bias", lambda: Biases().fit(split.train)),
               ("matrix factorisation", lambda: tune_mf(split.train, seed=args.seed))]
    for name, fit in fitters:
        start = time.perf_counter()
        model = fit()
        fit_s = time.perf_counter() - start
        full = _row(name, "all users", test, model.predict(test["user"], test["item"]), time.perf_counter() - start)
        rows.append(full)
        if sample_scope != "all users":
            start = time.perf_counter()
            pred = model.predict(sample_test["user"], sample_test["item"])
            rows.append(_row(name, sample_scope, sample_test, pred, fit_s + time.perf_counter() - start))
        print(f"  {name}: RMSE {full.rmse:.4f} (all users)")

    if not args.no_slm:
        start = time.perf_counter()
        model, tokenizer = load_base_model(args.base_model, device=args.device)
        preds = predict_users(model, tokenizer, data.items, split.train, sample_test, sample,
                              PromptConfig(), ScoringConfig(batch_size=args.batch_size))
        rows.append(_row(f"SLM vanilla prompting ({args.base_model})", sample_scope, preds,
                         preds["pred"].to_numpy(), time.perf_counter() - start))
    return rows


def markdown(rows: list[Row]) -> str:
    lines = ["| method | scope | users | test ratings | RMSE | MAE | wall (s) |", "|---|---|---:|---:|---:|---:|---:|"]
    lines += [f"| {r.method} | {r.scope} | {r.users} | {r.test_ratings:,} | {r.rmse:.4f} | {r.mae:.4f} | {r.wall_s:.1f} |"
              for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="ml-100k", help="'ml-100k' or a MovieLens directory (100K or 1M format)")
    p.add_argument("--split", default="default", help="split preset: default (80/20) or paper (216 users, 60/40)")
    p.add_argument("--base-model", default="smollm2-135m", help="smollm2-135m, tiny, a model directory or hub id")
    p.add_argument("--slm-users", default="100", help="users the SLM is scored on (a number or 'all')")
    p.add_argument("--no-slm", action="store_true", help="classical baselines only")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", default=None, help="torch device; default CUDA when present, else CPU")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="results/baselines", help="directory for baselines.{md,csv,json}")
    args = p.parse_args(argv)

    rows = run(args)
    table = markdown(rows)
    print("\n" + table)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "baselines.md").write_text(table + "\n")
    pd.DataFrame([asdict(r) for r in rows]).to_csv(out / "baselines.csv", index=False)
    (out / "baselines.json").write_text(json.dumps({"config": vars(args), "rows": [asdict(r) for r in rows]}, indent=2))
    print(f"\nwrote {out}/baselines.{{md,csv,json}}")


if __name__ == "__main__":
    main()
