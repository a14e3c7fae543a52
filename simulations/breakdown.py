"""Where an adapter adds to its private base: the per-rating predictions `simulations.rescore --predictions` writes,
broken down by how many training ratings the rating's user and movie had (issue #17).

    python -m simulations.rescore RUN [RUN ...] --eval-users 150 --predictions pred.csv
    python -m simulations.breakdown pred.csv

For each bucket: the ratings in it (per run), the RMSE of the run's prediction, of the private base and of MF (each
averaged over the runs), the paired per-user MSE difference prediction minus private base over the runs (each
user's squared error on the bucket's ratings averaged over the runs) with its 95% interval, the same difference per
run, and the least-squares blend weight the bucket's *test* ratings would pick. That weight is a diagnostic of where
the adapter's departures from its base point the right way, never a setting: weights are fitted on validation
ratings only (`common.blend`).
"""

from __future__ import annotations

import argparse

import numpy as np
import pandas as pd

from common import blend
from common.metrics import rmse
from simulations.centralised import paired_vs
from simulations.rescore import PRIVATE_BASE

USER_BUCKETS = (0, 20, 40, 80, 160, 10_000)
ITEM_BUCKETS = (0, 10, 25, 50, 100, 200, 10_000)


def bucket_table(frame: pd.DataFrame, column: str, edges: tuple[int, ...]) -> list[dict]:
    """One row per non-empty bucket of `column` (left-closed intervals between `edges`)."""
    runs = frame["run"].nunique()
    frame = frame.assign(bucket=pd.cut(frame[column], list(edges), right=False),
                         err=(frame["prediction"] - frame["rating"]) ** 2,
                         base_err=(frame[PRIVATE_BASE] - frame["rating"]) ** 2)
    rows = []
    for bucket, part in frame.groupby("bucket", observed=True):
        per_user = part.groupby("user")[["err", "base_err"]].mean()  # over the runs' ratings of each user
        d = paired_vs(per_user["err"].to_numpy(), per_user["base_err"].to_numpy(), per_user.index.to_numpy())
        sums = blend.residual_sums(part["prediction"], part[PRIVATE_BASE], part["rating"])
        rows.append({"bucket": f"{int(bucket.left)}-{int(bucket.right) - 1}" if bucket.right < 10_000
                     else f"{int(bucket.left)}+", "ratings": len(part) // runs, "users": len(per_user),
                     "rmse": _mean_rmse(part, "prediction"), "base_rmse": _mean_rmse(part, PRIVATE_BASE),
                     "mf_rmse": _mean_rmse(part, "matrix factorisation") if "matrix factorisation" in part else None,
                     "vs_base": d,
                     "per_run": [float((g["err"] - g["base_err"]).mean()) for _, g in part.groupby("run")],
                     "test_weight": sums["rd"] / sums["dd"] if sums["dd"] > 0 else float("nan")})
    return rows


def _mean_rmse(part: pd.DataFrame, column: str) -> float:
    return float(np.mean([rmse(g[column], g["rating"]) for _, g in part.groupby("run")]))


def markdown(rows: list[dict], what: str) -> str:
    lines = [f"| {what} | ratings | users | prediction RMSE | private base | MF | prediction vs private base, per-user "
             "MSE [95% CI] | per run (per-rating MSE) | weight test would pick |",
             "|---|---:|---:|---:|---:|---:|---|---|---:|"]
    for r in rows:
        d = r["vs_base"]
        mf = f"{r['mf_rmse']:.4f}" if r["mf_rmse"] is not None else "-"
        lines.append(f"| {r['bucket']} | {r['ratings']} | {r['users']} | {r['rmse']:.4f} | {r['base_rmse']:.4f} | {mf} "
                     f"| {d[0]:+.4f} [{d[1]:+.4f}, {d[2]:+.4f}] | {', '.join(f'{v:+.4f}' for v in r['per_run'])} "
                     f"| {r['test_weight']:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("predictions", help="a CSV from simulations.rescore --predictions")
    args = ap.parse_args(argv)
    frame = pd.read_csv(args.predictions)
    if PRIVATE_BASE not in frame:
        raise SystemExit(f"{args.predictions}: no '{PRIVATE_BASE}' column (the runs released no item statistics)")
    print(f"{frame['run'].nunique()} runs, {len(frame) // frame['run'].nunique()} ratings of "
          f"{frame['user'].nunique()} users each\n")
    print(markdown(bucket_table(frame, "user_ratings", USER_BUCKETS), "user's training ratings") + "\n")
    print(markdown(bucket_table(frame, "item_ratings", ITEM_BUCKETS), "movie's training ratings"))


if __name__ == "__main__":
    main()
