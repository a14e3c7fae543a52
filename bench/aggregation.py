"""Coordinator aggregation: time and peak memory to fold N synthetic LoRA updates into K personas.

    python -m bench.aggregation [--updates 1000,10000] [--personas 4] [--base-model smollm2-135m]

Updates are Flower reply messages with the real adapter's shapes (SmolLM2-135M, rank 8 on q_proj/v_proj:
460,800 parameters, 1.8 MB each), produced by a generator and consumed by `PersonaStrategy.aggregate_train`
one at a time; peak memory is Python's tracemalloc peak during aggregation (numpy reports to it), so it shows
whether all updates are held at once (N x 1.8 MB) or only K running sums.
"""

from __future__ import annotations

import argparse
import time
import tracemalloc

import numpy as np
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from common.adapters import adapter_arrays, add_lora
from common.config import FederationConfig
from common.model import load_base_model
from server.strategy import PersonaStrategy, join_personas, to_record


class _Grid:
    def __init__(self, nodes):
        self.nodes = nodes

    def get_node_ids(self):
        return self.nodes


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--updates", default="1000,10000")
    p.add_argument("--personas", type=int, default=4)
    p.add_argument("--base-model", default=FederationConfig().base_model)
    args = p.parse_args(argv)
    for attr, value in (("_task_id", 1), ("_run_id", 1), ("_node_id", 0)):  # stamps a real run would set
        setattr(TaskIdentity, attr, value)

    cfg = FederationConfig(base_model=args.base_model)
    adapter = adapter_arrays(add_lora(load_base_model(cfg.base_model)[0], cfg.lora))
    size_mb = sum(v.nbytes for v in adapter.values()) / 1e6
    rng = np.random.default_rng(0)
    pool = [{k: rng.normal(0, 1e-3, v.shape).astype(np.float32) for k, v in adapter.items()} for _ in range(4)]
    print(f"{cfg.base_model}: {sum(v.size for v in adapter.values()):,} parameters, {size_mb:.2f} MB per update, "
          f"K={args.personas}")
    print("| updates | aggregation (s) | updates/s | peak memory (MB) | all updates would be (MB) |")
    print("|---:|---:|---:|---:|---:|")
    for n in (int(x) for x in args.updates.split(",")):
        node_persona = {node: node % args.personas for node in range(1, n + 1)}
        strategy = PersonaStrategy(node_persona, fraction_train=1.0)
        state = join_personas({k: adapter for k in range(args.personas)})
        strategy.configure_train(1, state, ConfigRecord(), _Grid(list(node_persona)))

        def replies():
            for node in node_persona:
                request = Message(content=RecordDict(), message_type="train", dst_node_id=node)
                content = RecordDict({"arrays": to_record(pool[node % len(pool)]),
                                      "metrics": MetricRecord({"num-examples": 50, "train_loss": 1.0})})
                yield Message(content=content, reply_to=request)

        tracemalloc.start()
        start = time.perf_counter()
        new, _ = strategy.aggregate_train(1, replies())
        seconds = time.perf_counter() - start
        peak = tracemalloc.get_traced_memory()[1] / 1e6
        tracemalloc.stop()
        assert new is not None
        print(f"| {n:,} | {seconds:.1f} | {n / seconds:.0f} | {peak:.0f} | {n * size_mb:,.0f} |")


if __name__ == "__main__":
    main()
