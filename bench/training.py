"""Local training speed on one device: tokens/s and achieved GFLOP/s against the machine's measured fp32 matmul
peak, plain AdamW and with Opacus DP-SGD.

    python -m bench.training [--base-model smollm2-135m] [--steps 6] [--rows-per-step 2]

The peak is measured here (2048 x 2048 fp32 matmuls in torch, best of 3 s). Training runs a real
MovieLens user's packed rows (prefix + 8 movies per row, as the federation does) on a LoRA adapter over the frozen
base; FLOPs are counted as 4 x non-embedding parameters per token (forward + input gradients; the LoRA weight
gradients and attention scores are ignored, so the figure slightly understates the work done).
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from client.device import Device, runtime
from common.adapters import adapter_arrays
from common.config import DeviceDP, FederationConfig, ScoringConfig, TrainConfig, split_preset
from common.data import load_movielens
from common.privacy import PrivacyLedger
from common.split import temporal_split


def matmul_peak(n: int = 2048, seconds: float = 3.0) -> float:
    """Achieved fp32 GFLOP/s of torch's matmul on n x n matrices, best of repeated timings."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best, deadline = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        start = time.perf_counter()
        a @ b
        best = max(best, 2 * n**3 / (time.perf_counter() - start) / 1e9)
    return best


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base-model", default=FederationConfig().base_model)
    p.add_argument("--dataset", default="ml-100k")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--rows-per-step", type=int, default=2)
    args = p.parse_args(argv)

    cfg = FederationConfig(base_model=args.base_model, dataset=args.dataset)
    data = load_movielens(cfg.dataset)
    split = temporal_split(data.ratings, split_preset(cfg.split))
    user = int(split.users[0])
    rt = runtime(cfg.base_model, cfg.lora)
    device = Device(user, data, split.train[split.train["user"] == user], split.test[split.test["user"] == user], rt,
                    ScoringConfig())
    start_arrays = adapter_arrays(rt.model)
    train = TrainConfig(steps=args.steps, rows_per_step=args.rows_per_step, items_per_row=cfg.items_per_row,
                        lr=cfg.lr)
    peak = matmul_peak()
    device.train_adapter(start_arrays, TrainConfig(steps=1, rows_per_step=1))  # warm-up, not reported
    rows = []
    for name, dp in (("AdamW", None), ("DP-SGD (Opacus, hooks)", DeviceDP(1.0, 1.0, 1e-5, 0.0))):
        _, m = device.train_adapter(start_arrays, train, dp=dp, ledger=PrivacyLedger(float("inf"), 1e-5) if dp else None)
        rows.append((name, m["train_tokens"], m["train_seconds"], m["tokens_per_s"], m["gflops_per_s"]))
    print(f"base {cfg.base_model}, user {user} ({len(device.prefix)}-token prefix), {args.steps} steps x "
          f"{args.rows_per_step} rows x {cfg.items_per_row} movies, {os.cpu_count()} CPU cores, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"measured fp32 matmul peak: {peak:.0f} GFLOP/s")
    print("| training | tokens | seconds | tokens/s | GFLOP/s | % of peak |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, tokens, seconds, tps, gflops in rows:
        print(f"| {name} | {tokens:,.0f} | {seconds:.1f} | {tps:,.0f} | {gflops:.1f} | {100 * gflops / peak:.0f}% |")


if __name__ == "__main__":
    main()
