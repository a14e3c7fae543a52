"""How many users does user-level DP at a given epsilon need before a persona release is more signal than noise?

Issue #17, goal 3. A persona release under user-level DP is the sum of its sampled devices' deltas, each clipped to
L2 norm C, divided by the expected cohort m (sample rate q x persona size), plus Gaussian noise of std sigma C / m
per coordinate (docs/privacy.md). sigma is what the accountant needs for the target epsilon over the
discovery releases and R rounds at sample rate q. Over an adapter of d parameters:

- noise norm  ~ sigma C sqrt(d) / m
- signal norm <= C (the mean of clipped deltas; equal to C only if every device's update points the same way)

so noise / signal >= sigma sqrt(d) / m: this is a lower bound, the best case for the signal. The table gives it
for populations from MovieLens-100K's 943 users upwards, with the federation's defaults otherwise (K personas of
equal size, kmeans-iters discovery releases, clip 1), and the population at which it reaches 1 (as much signal as
noise, still a very noisy step) and 0.1.

`python -m simulations.dp_scaling [--epsilon 8] [--rounds 100] [--personas 4]` prints the table (seconds; it
only runs the accountant) and writes `results/dp_scaling/results.{md,json}`.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from common.privacy import user_level_noise

# LoRA parameters of SmolLM2-135M (30 layers, hidden 576, 3 kv heads of 64): rank r on q_proj and v_proj is
# 30 x r x ((576 + 576) + (576 + 192)); the default rank 8 is 460,800. Rank 1 on v_proj alone is the smallest
# adapter that still touches every layer.
ADAPTERS = {"rank 8, q+v (default)": 30 * 8 * (1152 + 768), "rank 1, v only": 30 * 1 * 768}


def ratio(sigma: float, d: int, expected_cohort: float) -> float:
    """Lower bound of noise norm / signal norm of one persona release (clip cancels)."""
    return sigma * math.sqrt(d) / expected_cohort


def row(population: int, personas: int, sample_rate: float, epsilon: float, delta: float, rounds: int,
        discovery: int) -> dict:
    persona_size = population / personas
    m = sample_rate * persona_size
    sigma = user_level_noise(epsilon, delta, discovery, sample_rate, rounds)
    out = {"population": population, "personas": personas, "sample_rate": sample_rate,
           "expected_cohort": m, "sigma": sigma, "noise_std_per_coordinate": sigma / m}
    for name, d in ADAPTERS.items():
        out[f"ratio[{name}]"] = ratio(sigma, d, m)
        out[f"signal_rms_per_coordinate[{name}]"] = 1 / math.sqrt(d)
    return out


def population_for(target_ratio: float, personas: int, sample_rate: float, epsilon: float, delta: float,
                   rounds: int, discovery: int, d: int) -> int:
    """Smallest population whose release reaches `target_ratio` at this sample rate (sigma does not depend on
    the population once q is fixed, so this is closed-form)."""
    sigma = user_level_noise(epsilon, delta, discovery, sample_rate, rounds)
    return math.ceil(personas * sigma * math.sqrt(d) / (target_ratio * sample_rate))


def table(epsilon: float = 8.0, delta: float = 1e-5, rounds: int = 100, personas: int = 4, kmeans_iters: int = 4,
          populations=(943, 10_000, 100_000, 1_000_000, 10_000_000), rates=(0.01, 0.06, 0.25)) -> dict:
    discovery = (kmeans_iters if personas > 1 else 0) + 1
    rows = [row(n, personas, q, epsilon, delta, rounds, discovery) for n in populations for q in rates]
    needed = [{"sample_rate": q, "adapter": name, "target_ratio": t,
               "population": population_for(t, personas, q, epsilon, delta, rounds, discovery, d)}
              for q in rates for name, d in ADAPTERS.items() for t in (1.0, 0.1)]
    return {"epsilon": epsilon, "delta": delta, "rounds": rounds, "personas": personas,
            "discovery_releases": discovery, "rows": rows, "needed": needed}


def markdown(t: dict) -> str:
    names = list(ADAPTERS)
    out = [f"user-level eps={t['epsilon']}, delta={t['delta']}, {t['discovery_releases']} discovery releases + "
           f"{t['rounds']} rounds, K={t['personas']} equal personas, clip 1",
           "", "| population | sample rate q | expected cohort per persona | sigma | noise std per coordinate | "
           + " | ".join(f"noise/signal >= ({n})" for n in names) + " |",
           "|---:|---:|---:|---:|---:|" + "---:|" * len(names)]
    for r in t["rows"]:
        out.append(f"| {r['population']:,} | {r['sample_rate']} | {r['expected_cohort']:,.1f} | {r['sigma']:.2f} | "
                   f"{r['noise_std_per_coordinate']:.2e} | "
                   + " | ".join(f"{r[f'ratio[{n}]']:.3g}" for n in names) + " |")
    out += ["", "signal rms per coordinate <= " + ", ".join(f"{1 / math.sqrt(d):.2e} ({n})" for n, d in ADAPTERS.items()),
            "", "| sample rate q | adapter | population for noise/signal = 1 | for 0.1 |", "|---:|---|---:|---:|"]
    for q in sorted({n["sample_rate"] for n in t["needed"]}):
        for name in names:
            pops = {n["target_ratio"]: n["population"] for n in t["needed"]
                    if n["sample_rate"] == q and n["adapter"] == name}
            out.append(f"| {q} | {name} | {pops[1.0]:,} | {pops[0.1]:,} |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--epsilon", type=float, default=8.0)
    ap.add_argument("--delta", type=float, default=1e-5)
    ap.add_argument("--rounds", type=int, default=100)
    ap.add_argument("--personas", type=int, default=4)
    ap.add_argument("--out", default="results/dp_scaling")
    args = ap.parse_args(argv)
    t = table(args.epsilon, args.delta, args.rounds, args.personas)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(t, indent=1))
    (out / "results.md").write_text(markdown(t) + "\n")
    print(markdown(t))


if __name__ == "__main__":
    main()
