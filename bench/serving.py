"""Cold-start serving: adapter-switch latency and ratings/s against the number of resident persona adapters.

    python -m bench.serving [--base-model smollm2-135m] [--resident 1,8,64] [--movies 20]

Builds a throw-away registry of random persona adapters (the serving cost does not depend on their values),
then for each count: loads that many adapters, times `activate` between resident ones (peft `set_adapter`),
and scores jobs of `--movies` movies for a cold-start user, each job on a randomly chosen resident adapter.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np

from common.adapters import adapter_arrays, add_lora
from common.config import FederationConfig
from common.data import load_movielens
from common.model import load_base_model
from common.personas import FeatureSpace, Onboarding
from server.registry import PersonaRegistry
from server.rollouts import Rollouts
from server.serving import ONBOARDING_FILE, ColdStartService, onboarding_profile, save_onboarding


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base-model", default=FederationConfig().base_model)
    p.add_argument("--dataset", default="ml-100k")
    p.add_argument("--resident", default="1,8,64")
    p.add_argument("--movies", type=int, default=20, help="movies per scoring job")
    p.add_argument("--jobs", type=int, default=16)
    args = p.parse_args(argv)

    cfg = FederationConfig(base_model=args.base_model)
    counts = [int(c) for c in args.resident.split(",")]
    data = load_movielens(args.dataset)
    template = adapter_arrays(add_lora(load_base_model(cfg.base_model)[0], cfg.lora))
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        registry = PersonaRegistry(tmp, lora=cfg.lora, base_model=cfg.base_model)
        space = FeatureSpace.of(data)
        save_onboarding(registry.root / ONBOARDING_FILE, space, np.ones((max(counts), space.size)),
                        np.ones(max(counts)))
        versions = []
        for persona in range(max(counts)):
            arrays = {k: (rng.normal(0, 0.02, v.shape) if "lora_B" in k else v).astype(np.float32)
                      for k, v in template.items()}
            versions.append(registry.add_version(persona, 1, arrays, 1))
            Rollouts(registry).make_stable(persona, versions[-1], "bench")
        profile = onboarding_profile(Onboarding(30, "F", "writer", ("Drama", "Comedy")))
        movies = list(data.items.index[: args.movies])
        print(f"base {cfg.base_model}; {args.movies} movies per job; {os.cpu_count()} CPU cores")
        print("| resident adapters | switch latency (ms, mean / p95) | ratings/s (random adapter per job) |")
        print("|---:|---:|---:|")
        for n in counts:
            service = ColdStartService(registry, cfg.base_model, data.items, max_resident=n)
            for v in versions[:n]:
                service.activate(v)
            times = []
            for i in range(300):
                v = versions[int(rng.integers(n))]
                start = time.perf_counter()
                service.activate(v)
                times.append((time.perf_counter() - start) * 1e3)
            service.score([(versions[0], profile, movies)])  # warm-up
            jobs = [(versions[int(rng.integers(n))], profile, movies) for _ in range(args.jobs)]
            start = time.perf_counter()
            for job in jobs:
                service.score([job])
            rate = args.jobs * len(movies) / (time.perf_counter() - start)
            print(f"| {n} | {np.mean(times):.3f} / {np.percentile(times, 95):.3f} | {rate:.1f} |")


if __name__ == "__main__":
    main()
