"""On-device serving: ONNX Runtime vs torch eager (peft), per single rating and per 100-candidate ranking.

    python -m bench.device_serving [--base-model smollm2-135m] [--repeats 5]

All paths score a real MovieLens user's profile prefix with a random personal adapter: the prefix encoded once,
its keys/values reused by batches of 32 candidates. Three columns: the torch + peft reference path
(`common.scoring.predict_with_prefix`, transformers' standard attention over the prefix copied per candidate);
torch eager running the ONNX export's own two graphs (`client.onnx_serving.EagerGraphs`: the shared-prefix
attention, LoRA from one flat input), so the same computation as ORT; and ONNX Runtime. The speed-ups are ORT's
over each. The first call of each is a warm-up and not timed. Also printed: the achieved GFLOP/s (2 x non-embedding
parameters per token), since on a compute-bound CPU the paths can only differ by how close they run to the matmul
peak and by the work they skip. Last, the single rating again with the prefix's keys/values already in memory, as
the daemon's local API serves repeated requests (either engine).
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch

from bench.training import matmul_peak
from client.device import Device, runtime
from client.onnx_serving import EagerGraphs, OnnxScorer, export
from common.adapters import adapter_arrays, load_adapter_arrays
from common.config import FederationConfig, ScoringConfig, split_preset
from common.data import load_movielens
from common.scoring import encode_prefix, predict_with_prefix
from common.split import temporal_split
from common.training import flops_per_token


def _time(fn, repeats: int) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats * 1e3


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base-model", default=FederationConfig().base_model)
    p.add_argument("--dataset", default="ml-100k")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--candidates", type=int, default=100)
    args = p.parse_args(argv)

    cfg = FederationConfig(base_model=args.base_model, dataset=args.dataset)
    data = load_movielens(cfg.dataset)
    split = temporal_split(data.ratings, split_preset("default"))
    user = int(split.train["user"].iloc[0])
    rt = runtime(cfg.base_model, cfg.lora)
    device = Device(user, data, split.train[split.train["user"] == user], split.test[split.test["user"] == user], rt,
                    ScoringConfig())
    rng = np.random.default_rng(0)
    arrays = {k: (rng.normal(0, 0.02, v.shape) if "lora_B" in k else v).astype(np.float32)
              for k, v in adapter_arrays(rt.model).items()}
    load_adapter_arrays(rt.model, arrays)
    start = time.perf_counter()
    scorer = OnnxScorer(export(cfg.base_model, cfg.lora))
    setup = time.perf_counter() - start
    candidates = device._suffixes(data.items.index[: args.candidates])
    one = candidates[:1]

    def torch_path(suffixes):
        with torch.no_grad():
            return predict_with_prefix(rt.model, rt.head, device.prefix, suffixes, pad_id=rt.pad_id)

    flat = scorer.flatten(arrays)
    agree = np.abs(torch_path(candidates) - scorer.predict(device.prefix, candidates, arrays, flat)).max()
    eager = EagerGraphs(rt.model, rt.tokenizer)
    rows = []
    for name, suffixes in (("1 rating", one), (f"{args.candidates}-candidate ranking", candidates)):
        tokens = len(device.prefix) + sum(map(len, suffixes))
        t_torch = _time(lambda: torch_path(suffixes), args.repeats)
        t_eager = _time(lambda: eager.predict(device.prefix, suffixes, arrays, flat), args.repeats)
        t_ort = _time(lambda: scorer.predict(device.prefix, suffixes, arrays, flat), args.repeats)
        rows.append((name, tokens, t_torch, t_eager, t_ort))
    # What the daemon's local API keeps between requests: the prefix's keys/values, per engine.
    past, cache = scorer.encode_prefix(device.prefix, flat), encode_prefix(rt.model, device.prefix)
    t_cached = _time(lambda: scorer.score(past, one, flat), args.repeats)
    with torch.no_grad():
        t_cached_torch = _time(lambda: predict_with_prefix(rt.model, rt.head, device.prefix, one, pad_id=rt.pad_id,
                                                           cache=cache), args.repeats)
    per_token = flops_per_token(rt.model, training=False)
    print(f"base {cfg.base_model}, prefix {len(device.prefix)} tokens, {os.cpu_count()} CPU cores; "
          f"export/load {setup:.1f} s; max |ORT - torch| = {agree:.2e}; matmul peak {matmul_peak():.0f} GFLOP/s")
    print("| request | tokens | torch + peft reference (ms) | torch eager, export's graphs (ms) | ONNX Runtime (ms) "
          "| ORT speed-up vs reference | vs same graphs in torch | reference GFLOP/s | ORT GFLOP/s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, tokens, t_torch, t_eager, t_ort in rows:
        print(f"| {name} | {tokens:,} | {t_torch:.1f} | {t_eager:.1f} | {t_ort:.1f} | {t_torch / t_ort:.2f}x "
              f"| {t_eager / t_ort:.2f}x | {tokens * per_token / t_torch / 1e6:.0f} "
              f"| {tokens * per_token / t_ort / 1e6:.0f} |")
    print(f"1 rating with the prefix kept in memory (the daemon's local API between requests; {len(one[0])} "
          f"tokens): torch {t_cached_torch:.1f} ms, ORT {t_cached:.1f} ms, {t_cached_torch / t_cached:.2f}x")


if __name__ == "__main__":
    main()
