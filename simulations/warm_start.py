"""A public warm start (issue #17): one task adapter trained centrally on MovieLens users *outside* the federation's
split, so that the federation's rounds refine an adapter that already knows the task instead of starting from a
fresh LoRA (B = 0, the base model).

Which users: every ML-100K user the federation's split (`--split`, the paper protocol's 216 users by default) does
not keep. Their ratings stand in for a public dataset: none of them belongs to a federation device, so the adapter
is public, not personal data, and is written in plain PEFT format. It is labelled as what it is wherever it is used:
the coordinator records its path and digest in version 0's manifest (`warm-start`).

What it learns is what the federation's devices train on (`residual-to-bias` over a private MF base, item statistics
in the prompt): each public rating's prompt quotes the movie's mean and count over the public ratings, and the
adapter learns a correction to MF, scored out of fold (`simulations.classical.out_of_fold`, as the devices score
their training targets with out-of-fold user factors). Each public user's latest `--val-fraction` of ratings is held
out of everything; the adapter and MF are scored on a sample of those at the end, so the artefact says whether it
corrects MF on users it never saw, before any federation uses it.

    python -m simulations.warm_start [--steps 300] [--out results/warm_start/paper]
    python -m simulations.federated --set warm-start=results/warm_start/paper/adapter

The LoRA shape and the prompt are the federation's defaults; a federation with other LoRA settings refuses the
adapter (its keys or shapes differ).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import numpy as np

from common.adapters import adapter_arrays, adapter_digest, add_lora, save_adapter
from common.config import LoraSettings, PromptConfig, split_preset
from common.data import load_movielens
from common.metrics import rmse
from common.model import load_base_model
from common.prompt import PromptBuilder, item_stats
from common.scoring import RatingHead
from common.split import sample_users, temporal_split, validation_split
from simulations.centralised import movie_prompts, paired_vs, score, train_centralised, user_rows
from simulations.classical import out_of_fold, tune_mf

ADAPTER_DIR = "adapter"  # inside --out: the PEFT adapter directory a federation's `warm-start` points at
REPORT = "warm_start.json"


def public_ratings(ratings, split: str):
    """The ratings of every user the federation's split does not keep (none of them is a federation device)."""
    try:
        inside = temporal_split(ratings, split_preset(split)).users
    except ValueError:  # the split keeps nobody: every user is outside it
        return ratings.reset_index(drop=True)
    return ratings[~ratings["user"].isin(inside)].reset_index(drop=True)


def run(args: argparse.Namespace) -> dict:
    data = load_movielens(args.dataset)
    public = public_ratings(data.ratings, args.split)
    if public.empty:
        raise SystemExit(f"split {args.split!r} keeps every user: there is no public user to warm-start from")
    train, val = validation_split(public, args.val_fraction)
    print(f"public warm start: {public['user'].nunique()} users outside split {args.split!r}, {len(train):,} "
          f"training ratings, {len(val):,} held out", flush=True)
    start = time.perf_counter()
    base = out_of_fold(train, lambda part: tune_mf(part, seed=0))  # each training rating's MF, fitted without it
    mf = tune_mf(train, seed=0)
    print(f"  MF base, out of fold: {time.perf_counter() - start:.0f} s", flush=True)
    model, tokenizer = load_base_model(args.base_model, device=args.device)
    lora = LoraSettings()  # the federation's: the adapter must be interchangeable with its personas'
    model = add_lora(model, lora, seed=args.seed)
    builder, head = PromptBuilder(tokenizer, PromptConfig()), RatingHead(tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    suffix = movie_prompts(data.items, builder, item_stats(train))
    rows = user_rows(train, data.items, builder, base)
    start = time.perf_counter()
    losses = train_centralised(model, head, rows, suffix, args.steps, args.rows_per_step, args.items_per_row,
                               args.lr, args.seed, pad)
    train_s = time.perf_counter() - start
    out = Path(args.out)
    arrays = adapter_arrays(model)
    save_adapter(model, arrays, out / ADAPTER_DIR)
    # a check on public users' held-out ratings: does the adapter correct MF on ratings it never trained on?
    check_users = sample_users(np.sort(val["user"].unique()), args.check_users, seed=0)
    held = val[val["user"].isin(check_users)].reset_index(drop=True)
    who, y = held["user"].to_numpy(), held["rating"].to_numpy()
    mf_held = mf.predict(who, held["item"])
    pred = score(model, head, {u: r[0] for u, r in rows.items()}, held, suffix, pad, mf_held)
    report = {"split": args.split, "public_users": int(public["user"].nunique()), "train_ratings": len(train),
              "steps": args.steps, "rows_per_step": args.rows_per_step, "items_per_row": args.items_per_row,
              "lr": args.lr, "seed": args.seed, "base_model": args.base_model, "lora": dataclasses.asdict(lora),
              "train_seconds": train_s,
              "final_loss": float(np.mean(losses[-10:])), "digest": adapter_digest(arrays),
              "check": {"users": len(check_users), "ratings": len(held), "adapter_rmse": rmse(pred, y),
                        "mf_rmse": rmse(mf_held, y),
                        "adapter_vs_mf": paired_vs((pred - y) ** 2, (mf_held - y) ** 2, who)}}
    (out / REPORT).write_text(json.dumps(report, indent=1))
    c = report["check"]
    d = c["adapter_vs_mf"]
    print(f"warm start: {out / ADAPTER_DIR} ({train_s:.0f} s training); on {c['ratings']} held-out ratings of "
          f"{c['users']} public users: adapter {c['adapter_rmse']:.4f}, MF {c['mf_rmse']:.4f}, per-user MSE "
          f"difference {d[0]:+.4f} [{d[1]:+.4f}, {d[2]:+.4f}]", flush=True)
    return report


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dataset", default="ml-100k")
    ap.add_argument("--split", default="paper", help="the federation's split: its users are left out")
    ap.add_argument("--base-model", default="smollm2-135m")
    ap.add_argument("--device", default=None)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--rows-per-step", type=int, default=2)
    ap.add_argument("--items-per-row", type=int, default=8)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--val-fraction", type=float, default=0.1)
    ap.add_argument("--check-users", type=int, default=100, help="public users whose held-out ratings are scored")
    ap.add_argument("--out", default="results/warm_start/paper")
    run(ap.parse_args(argv))


if __name__ == "__main__":
    main()
