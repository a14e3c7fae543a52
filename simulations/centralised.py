"""Centralised upper bound (issue #17, first lever): one LoRA, the federation's prompt and optimiser, trained in one
process on every training rating of the split, then scored on a fixed sample of evaluation users next to the
classical baselines on the same users.

If even this cannot beat user+item bias at a budget this machine allows, the prompt or the task set-up is the
problem, not the federation. `--item-stats` adds the collaborative signal to each movie's prompt (the movie's mean
training rating and count over the split's users, "Other users rated it 3.9/5 on average (212 ratings).") to
measure what that signal is worth before building its private federated release.

Per user: the profile prefix (short-term memory, as on a device), then packed movie suffixes, exactly the
federation's training rows (`common.training.pack`); movies quoted in the profile are not training targets. Each
step draws `rows-per-step` users uniformly and `items-per-row` of their training ratings. Hyper-parameters are the
federation's defaults and were not tuned. With `--val-fraction` each user's latest training ratings are held out of
everything as validation, and only the weight of the adapter's blend with user+item bias is fitted on them
(`common.blend`'s least squares, as the federation pools it); nothing is ever chosen on test ratings.

`--residual` trains the adapter as a correction to user+item bias (as `residual-to-bias` does in the federation);
`--residual-base mf` to matrix factorisation instead: an upper bound for a private collaborative base, measured
before building its release.

`python -m simulations.centralised [--item-stats] [--steps 100] [--eval-at 50] [--seeds 0] [--eval-users 40]
[--val-fraction 0.1] [--residual [--residual-base mf]] [--with-runs earlier.json ...]`
prints progress (and, with `--eval-at`, the evaluation users' RMSE at those steps),
the table (RMSE, MAE, and the paired per-user difference of MSE against user+item bias with a 95% interval), and
writes `results/centralised/<tag>.{md,json}`.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from common import blend
from common.adapters import add_lora
from common.config import LoraSettings, PromptConfig, split_preset
from common.data import load_movielens
from common.metrics import mae, rmse
from common.model import load_base_model
from common.prompt import PromptBuilder, item_stats, item_stats_text, movie_text, user_profile
from common.scoring import RatingHead, predict_with_prefix, rating_loss
from common.split import sample_users, temporal_split, validation_split
from common.training import PackedRow, pack, packed_rating_logits
from simulations.classical import Biases, GlobalMean, out_of_fold, tune_mf


def movie_prompts(items: pd.DataFrame, builder: PromptBuilder, stats: pd.DataFrame | None) -> dict[int, list[int]]:
    """Suffix token ids per movie (one per movie: nothing in them depends on the user)."""
    def text(i):
        m = movie_text(items.loc[i])
        return m if stats is None else f"{m}\n{item_stats_text(i, stats)}"

    return {int(i): builder.suffix_ids(text(i)) for i in items.index}


def user_rows(train: pd.DataFrame, items: pd.DataFrame, builder: PromptBuilder,
              base: np.ndarray | None = None) -> dict[int, tuple]:
    """Per user: (prefix ids, training item ids, ratings, base predictions or None), without the movies the
    profile quotes. `base` (one per row of `train`, in its order) is each rating's base for `--residual`."""
    base = None if base is None else pd.Series(base, index=train.index)
    out = {}
    recent = PromptConfig().recent_items
    for user, rows in train.groupby("user"):
        quoted = set(rows.sort_values(["ts", "item"]).tail(recent)["item"])
        targets = rows[~rows["item"].isin(quoted)]
        targets = rows if targets.empty else targets
        out[int(user)] = (builder.prefix_ids(user_profile(rows, items)), targets["item"].to_numpy(),
                          targets["rating"].to_numpy(np.float64),
                          None if base is None else base.loc[targets.index].to_numpy(np.float64))
    return out


def train_centralised(model, head: RatingHead, rows: dict[int, tuple], suffix: dict[int, list[int]], steps: int,
                      rows_per_step: int, items_per_row: int, lr: float, seed: int, pad_id: int,
                      log_every: int = 10, checkpoint=None, checkpoints: tuple[int, ...] = ()) -> list[float]:
    """`checkpoint(step)` is called (model in eval mode) after each step in `checkpoints`: a learning curve."""
    rng = np.random.default_rng(seed)
    users = np.array(sorted(rows))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    model.train()
    losses, start, tokens = [], time.perf_counter(), 0
    for step in range(steps):
        packed = []
        for u in rng.choice(users, size=rows_per_step, replace=False):
            prefix, its, rs, bs = rows[int(u)]
            pick = rng.choice(len(its), size=min(items_per_row, len(its)), replace=False)
            packed.append(PackedRow(prefix, [suffix[int(its[i])] for i in pick], [float(rs[i]) for i in pick],
                                    None if bs is None else [float(bs[i]) for i in pick]))
        batch = pack(packed, pad_id)
        logits = packed_rating_logits(model, head, batch)
        loss = rating_loss(logits, batch.ratings.to(logits.device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        tokens += batch.tokens
        if (step + 1) % log_every == 0 or step + 1 == steps:
            s = time.perf_counter() - start
            print(f"  step {step + 1}/{steps}: loss {np.mean(losses[-log_every:]):.3f}, {tokens / s:.0f} tokens/s, "
                  f"{s:.0f} s", flush=True)
        if checkpoint is not None and step + 1 in checkpoints and step + 1 < steps:
            model.eval()
            checkpoint(step + 1)
            model.train()
    model.eval()
    return losses


def score(model, head: RatingHead, rows_prefix: dict[int, list[int]], test: pd.DataFrame,
          suffix: dict[int, list[int]], pad_id: int, base: np.ndarray | None = None) -> np.ndarray:
    """`base`: each row's base prediction when the adapter was trained as a correction to it (`--residual`)."""
    pred = np.empty(len(test))
    for user, idx in test.groupby("user").indices.items():
        items = test["item"].to_numpy()[idx]
        pred[idx] = predict_with_prefix(model, head, rows_prefix[int(user)], [suffix[int(i)] for i in items],
                                        pad_id=pad_id, base=None if base is None else base[idx])
    return pred


def paired_vs(err_a: np.ndarray, err_b: np.ndarray, users: np.ndarray) -> tuple[float, float, float]:
    """Mean over users of per-user MSE(a) - MSE(b), with a 95% interval."""
    d = pd.Series(err_a - err_b).groupby(users).mean().to_numpy()
    half = 1.96 * d.std(ddof=1) / np.sqrt(len(d))
    return float(d.mean()), float(d.mean() - half), float(d.mean() + half)


def blend_weight(lm: np.ndarray, bias: np.ndarray, y: np.ndarray) -> float:
    """The weight w in [0, 1] of w * LM + (1 - w) * bias with the lowest squared error on `y`: the least-squares
    weight the federation pools from its devices' validation sums (`common.blend`), here over all of them at once."""
    sums = blend.residual_sums(lm, bias, y)
    return blend.weight(sums["rd"], sums["dd"])


def previous_runs(paths: list[str], args: argparse.Namespace) -> list[dict]:
    """Runs of earlier invocations with the same settings (other seeds) to pool with this one's: a long measurement
    can be taken one seed at a time. Their blends are refitted here from their saved validation predictions."""
    same = ("dataset", "split", "base_model", "eval_users", "eval_seed", "steps", "rows_per_step", "items_per_row",
            "lr", "lora_rank", "lora_targets", "item_stats", "val_fraction", "residual", "residual_base")
    before = {"residual": False, "residual_base": "bias"}  # files from before these options existed
    runs = []
    for path in paths:
        earlier = json.loads(Path(path).read_text())
        differ = [k for k in same if earlier["args"].get(k, before.get(k)) != getattr(args, k)]
        if differ:
            raise SystemExit(f"{path} was run with other settings: {differ}")
        runs += earlier["runs"]
    return runs


def run(args: argparse.Namespace) -> dict:
    data = load_movielens(args.dataset)
    split = temporal_split(data.ratings, split_preset(args.split))
    train, val = validation_split(split.train, args.val_fraction)
    users = sample_users(split.users, args.eval_users, args.eval_seed)
    test = split.test[split.test["user"].isin(users)].reset_index(drop=True)
    val = val[val["user"].isin(users)].reset_index(drop=True)  # the evaluation users' own validation ratings
    y, who = test["rating"].to_numpy(), test["user"].to_numpy()
    print(f"{len(train):,} training ratings of {train['user'].nunique()} users; evaluation: "
          f"{len(users)} users, {len(test):,} test ratings" + (f", {len(val):,} validation ratings" if len(val) else ""),
          flush=True)
    bias_model, mf_model = Biases().fit(train), tune_mf(train, seed=0)
    preds = {"global mean": GlobalMean().fit(train).predict(who, test["item"]),
             "user+item bias": bias_model.predict(who, test["item"]),
             "matrix factorisation": mf_model.predict(who, test["item"])}
    stats = item_stats(train) if args.item_stats else None
    mf_base = args.residual and args.residual_base == "mf"
    tag = ("slm-item-stats" if args.item_stats else "slm") + ("-residual" if args.residual else "") + \
        ("-mf" if mf_base else "")
    # The model the adapter corrects (`--residual`) and blends with: user+item bias, or MF (scored out of fold on
    # the training rows, `classical.out_of_fold`; the bias model's in-sample residuals are as honest as the
    # federation's device-side ones, a handful of parameters per user).
    base = mf_model if mf_base else bias_model
    base_name = "matrix factorisation" if mf_base else "user+item bias"
    train_base = None if not args.residual else (
        out_of_fold(train, lambda part: tune_mf(part, seed=0)) if mf_base
        else bias_model.predict(train["user"].to_numpy(), train["item"]))
    test_base = base.predict(who, test["item"]) if args.residual else None
    val_base = base.predict(val["user"].to_numpy(), val["item"]) if args.residual and len(val) else None
    earlier = previous_runs(args.with_runs, args)  # checked before training: a mismatch costs nothing
    runs = []
    for seed in args.seeds:
        model, tokenizer = load_base_model(args.base_model, device=args.device)
        lora = LoraSettings(rank=args.lora_rank, alpha=2 * args.lora_rank,
                            targets=tuple(args.lora_targets.split(",")))
        model = add_lora(model, lora, seed=seed)
        builder, head = PromptBuilder(tokenizer, PromptConfig()), RatingHead(tokenizer)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        suffix = movie_prompts(data.items, builder, stats)
        rows = user_rows(train, data.items, builder, train_base)
        start = time.perf_counter()
        print(f"seed {seed}: training {args.steps} steps x {args.rows_per_step} rows x {args.items_per_row} "
              f"ratings ({tag})", flush=True)
        prefixes = {u: r[0] for u, r in rows.items()}
        curve = {}

        def checkpoint(step: int) -> None:
            curve[step] = rmse(score(model, head, prefixes, test, suffix, pad, test_base), y)
            print(f"  step {step}: RMSE {curve[step]:.4f}", flush=True)

        losses = train_centralised(model, head, rows, suffix, args.steps, args.rows_per_step, args.items_per_row,
                                   args.lr, seed, pad, checkpoint=checkpoint, checkpoints=tuple(args.eval_at))
        train_s = time.perf_counter() - start
        pred = score(model, head, prefixes, test, suffix, pad, test_base)
        curve[args.steps] = rmse(pred, y)
        run_ = {"seed": seed, "pred": pred.tolist(), "train_seconds": train_s, "rmse_by_step": curve,
                "eval_seconds": time.perf_counter() - start - train_s, "final_loss": float(np.mean(losses[-10:]))}
        if len(val):
            val_pred = score(model, head, prefixes, val, suffix, pad, val_base)
            w = blend_weight(val_pred, base.predict(val["user"].to_numpy(), val["item"]), val["rating"].to_numpy())
            run_.update(val_pred=val_pred.tolist(), blend_weight=w,
                        blend_pred=(w * pred + (1 - w) * preds[base_name]).tolist())
            print(f"seed {seed}: blend weight of the adapter, tuned on validation: {w:.2f}", flush=True)
        runs.append(run_)
        print(f"seed {seed}: RMSE {rmse(pred, y):.4f} ({train_s:.0f} s training)", flush=True)
    if len(val):  # every run's blend fitted alike (earlier files may predate the least-squares weight)
        base_val = base.predict(val["user"].to_numpy(), val["item"])
        for run_ in earlier:
            w = blend_weight(np.array(run_["val_pred"]), base_val, val["rating"].to_numpy())
            run_.update(blend_weight=w, blend_pred=(w * np.array(run_["pred"])
                                                    + (1 - w) * preds[base_name]).tolist())
    runs = sorted(earlier + runs, key=lambda r: r["seed"])
    if len({r["seed"] for r in runs}) != len(runs):
        raise SystemExit(f"a seed appears twice: {[r['seed'] for r in runs]}")
    bias_err = (preds["user+item bias"] - y) ** 2
    table = []
    for name, p in preds.items():
        table.append({"method": name, "rmse": rmse(p, y), "mae": mae(p, y), "rmse_sd": 0.0,
                      "diff_vs_bias": paired_vs((p - y) ** 2, bias_err, who) if name != "user+item bias" else None})
    slm = np.array([r["pred"] for r in runs])
    name = (f"centralised SLM adapter{' + item stats' if args.item_stats else ''}"
            f"{f', residual to {base_name}' if args.residual else ''}")
    mf_err = (preds["matrix factorisation"] - y) ** 2
    for label, preds_ in ((name, slm),
                          *(((f"{name}, blended with {base_name} (weight tuned on validation)",
                              np.array([r["blend_pred"] for r in runs])),) if len(val) else ())):
        per_seed = [rmse(p, y) for p in preds_]
        table.append({"method": label, "rmse": float(np.mean(per_seed)),
                      "mae": float(np.mean([mae(p, y) for p in preds_])),
                      "rmse_sd": float(np.std(per_seed, ddof=1)) if len(per_seed) > 1 else 0.0,
                      "diff_vs_bias": [paired_vs((p - y) ** 2, bias_err, who) for p in preds_],
                      "diff_vs_mf": [paired_vs((p - y) ** 2, mf_err, who) for p in preds_],
                      # over seeds: each user's squared error averaged over the seeds, then paired across users
                      "pooled_vs_bias": paired_vs(((preds_ - y) ** 2).mean(0), bias_err, who),
                      "pooled_vs_mf": paired_vs(((preds_ - y) ** 2).mean(0), mf_err, who),
                      "rmse_of_seed_mean_prediction": rmse(preds_.mean(0), y)})
    return {"tag": tag, "args": {k: v for k, v in vars(args).items()}, "users": len(users),
            "test_ratings": len(test), "table": table, "runs": runs}


def markdown(result: dict) -> str:
    curves = [r["rmse_by_step"] for r in result["runs"] if len(r.get("rmse_by_step", {})) > 1]
    lines = [f"{result['users']} evaluation users, {result['test_ratings']:,} test ratings"]
    if curves:
        lines.append("RMSE by training step (per seed): " + "; ".join(
            ", ".join(f"{k}: {v:.4f}" for k, v in sorted(c.items(), key=lambda kv: int(kv[0]))) for c in curves))
    lines += [
             "", "| method | RMSE | RMSE sd (seeds) | MAE | paired MSE diff vs user+item bias [95% CI] "
                 "| over seeds vs bias | over seeds vs MF |",
             "|---|---:|---:|---:|---|---|---|"]

    def ci(d) -> str:
        return f"{d[0]:+.4f} [{d[1]:+.4f}, {d[2]:+.4f}]"

    for r in result["table"]:
        d = r["diff_vs_bias"]
        if d is None:
            cell = "-"
        elif isinstance(d[0], (list, tuple)):
            cell = "; ".join(ci(x) for x in d)
        else:
            cell = ci(d)
        pooled = f" {ci(r['pooled_vs_bias'])} | {ci(r['pooled_vs_mf'])} |" if "pooled_vs_bias" in r else " - | - |"
        lines.append(f"| {r['method']} | {r['rmse']:.4f} | {r['rmse_sd']:.4f} | {r['mae']:.4f} | {cell} |{pooled}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dataset", default="ml-100k")
    ap.add_argument("--split", default="paper")
    ap.add_argument("--base-model", default="smollm2-135m")
    ap.add_argument("--device", default=None)
    ap.add_argument("--eval-users", type=int, default=40)
    ap.add_argument("--eval-seed", type=int, default=0)
    ap.add_argument("--seeds", type=lambda s: [int(x) for x in s.split(",") if x.strip()], default=[0],
                    help="training seeds (\"\" with --with-runs: only pool earlier runs)")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--rows-per-step", type=int, default=2)
    ap.add_argument("--items-per-row", type=int, default=8)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--lora-rank", type=int, default=8)
    ap.add_argument("--lora-targets", default="q_proj,v_proj")
    ap.add_argument("--item-stats", action="store_true")
    ap.add_argument("--residual", action="store_true",
                    help="train the adapter as a correction to user+item bias: its five logits are added to a "
                         "prior whose expected rating is the bias model's prediction (common.scoring)")
    ap.add_argument("--residual-base", choices=("bias", "mf"), default="bias",
                    help="with --residual: the model the adapter corrects and blends with, user+item bias or "
                         "matrix factorisation (MF scored out of fold on the training rows; an upper bound for a "
                         "private collaborative base, which the federation does not release)")
    ap.add_argument("--val-fraction", type=float, default=0.0,
                    help="hold out each user's latest fraction of training ratings as validation (everything then "
                         "trains on the rest) and tune a blend of the adapter with user+item bias on it")
    ap.add_argument("--eval-at", type=lambda s: [int(x) for x in s.split(",") if x], default=[],
                    help="also score the evaluation users after these steps (a learning curve; costs one pass each)")
    ap.add_argument("--with-runs", nargs="*", default=[], metavar="JSON",
                    help="pool this run's seeds with those of earlier result files of the same settings")
    ap.add_argument("--out", default="results/centralised")
    args = ap.parse_args(argv)
    result = run(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{result['tag']}.json").write_text(json.dumps(result))
    (out / f"{result['tag']}.md").write_text(markdown(result) + "\n")
    print(markdown(result))


if __name__ == "__main__":
    main()
