"""Upload cost of K-slot persona updates (the secure-aggregation design in docs/privacy.md), measured with Flower's
own ArrayRecord serialisation on the real adapter shape.

    python -m bench.kslot_bytes [--base-model smollm2-135m] [--devices-per-round 13]

A plain update carries one persona's delta; a K-slot update carries K slots (only the device's own is non-zero)
so that a secure sum yields every persona's sum without revealing anyone's persona. SecAgg+ masks 32-bit
quantised values, so the masked upload has the same size as the float32 vector measured here.
"""

from __future__ import annotations

import argparse

import numpy as np

from common.adapters import adapter_arrays, add_lora
from common.config import FederationConfig
from common.model import load_base_model
from server.strategy import join_personas


def kslot(delta: dict[str, np.ndarray], persona: int, k: int) -> dict[int, dict[str, np.ndarray]]:
    return {p: (delta if p == persona else {n: np.zeros_like(v) for n, v in delta.items()}) for p in range(k)}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base-model", default=FederationConfig().base_model)
    p.add_argument("--devices-per-round", type=int, default=13, help="13 = 6%% of the 216 paper-split devices")
    args = p.parse_args(argv)

    cfg = FederationConfig(base_model=args.base_model)
    delta = adapter_arrays(add_lora(load_base_model(cfg.base_model)[0], cfg.lora))
    params = sum(v.size for v in delta.values())
    plain = sum(len(a.data) for a in join_personas({0: delta}).values())
    print(f"base {cfg.base_model}, LoRA rank {cfg.lora.rank} on {','.join(cfg.lora.targets)}: {params:,} parameters, "
          f"plain update {plain / 1e6:.2f} MB")
    print("| K | upload per device (MB) | upload per round (MB) | x plain |")
    print("|---:|---:|---:|---:|")
    for k in (1, 2, 4, 8, 16):
        size = sum(len(a.data) for a in join_personas(kslot(delta, 0, k)).values())
        print(f"| {k} | {size / 1e6:.2f} | {size * args.devices_per_round / 1e6:.1f} | {size / plain:.2f} |")


if __name__ == "__main__":
    main()
