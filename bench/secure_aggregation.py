"""What secure aggregation adds to a training round, per device and per round, for K = 1, 4, 8 personas, measured
on the real adapter shape through the real code path: PersonaStrategy's messages go to the devices' protocol
handlers (`client.secure_aggregation`) in this process, and every message is sized as Flower's protobuf.

    python -m bench.secure_aggregation [--base-model smollm2-135m] [--devices 13] [--ks 1,4,8] [--drop 0.3]

Training is left out (each device's delta is random: the protocol's cost does not depend on its values), and so
is the network: the table gives bytes, and compute seconds per device (each device's four stages, which devices
run in parallel) and at the coordinator (relaying and unmasking; with `--drop` of the devices leaving after
sharing keys, the coordinator also rebuilds their pairwise masks with every survivor).
"""

from __future__ import annotations

import argparse
import os
import time
from collections import defaultdict

import numpy as np
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.common.serde import message_to_proto
from flwr.supercore.task_identity import TaskIdentity

from client import secure_aggregation as device
from client.client_app import to_record
from common.adapters import adapter_arrays, add_lora
from common.config import FederationConfig, SecureAggregation
from common.model import load_base_model
from server.strategy import PersonaStrategy, join_personas

HANDLERS = {"query.secagg_share": device.share, "query.secagg_mask": device.mask,
            "query.secagg_unmask": device.unmask}


def size(message) -> int:
    return message_to_proto(message).ByteSize()


class TimedGrid:
    """Delivers messages to in-process devices, timing each device's handler and sizing every message."""

    def __init__(self, nodes, drop=()):
        self.nodes, self.drop = list(nodes), set(drop)
        self.contexts = {n: Context(run_id=1, node_id=n, node_config={}, state=RecordDict(), run_config={})
                         for n in self.nodes}
        self.seconds = defaultdict(float)  # node -> protocol compute
        self.down = defaultdict(int)
        self.up = defaultdict(int)

    def get_node_ids(self):
        return self.nodes

    def send_and_receive(self, messages, timeout=None):
        replies = []
        for m in messages:
            node = m.metadata.dst_node_id
            self.down[node] += size(m)
            if node in self.drop and m.metadata.message_type != "query.secagg_share":
                continue  # shared its keys, then left
            start = time.perf_counter()
            reply = HANDLERS[m.metadata.message_type](m, self.contexts[node])
            self.seconds[node] += time.perf_counter() - start
            self.up[node] += size(reply)
            replies.append(reply)
        return replies


def secure_round(shape: dict, k: int, devices: int, drop: float, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    node_persona = {n: n % k for n in range(1, devices + 1)}
    gone = set(range(1, round(drop * devices) + 1))
    grid = TimedGrid(node_persona, gone)
    strategy = PersonaStrategy(node_persona, fraction_train=1.0, secure=SecureAggregation(0.6, 0.1, 100.0))
    zeros = {p: {n: np.zeros(s, np.float32) for n, s in shape.items()} for p in range(k)}
    messages = list(strategy.configure_train(1, join_personas(zeros), ConfigRecord(), grid))
    replies = []
    for m in messages:
        node = m.metadata.dst_node_id
        delta = {n: rng.normal(0, 1e-3, s).astype(np.float32) for n, s in shape.items()}
        start = time.perf_counter()
        reply = device.start(m, grid.contexts[node], delta)  # K-slot encoding and the key pairs
        grid.seconds[node] += time.perf_counter() - start
        grid.down[node] += size(m)
        grid.up[node] += size(reply)
        replies.append(reply)
    before, start = sum(grid.seconds.values()), time.perf_counter()
    new, metrics = strategy.aggregate_train(1, replies)
    # aggregate_train runs the three exchanges, so the devices' handlers ran inside it: take their time out.
    coordinator = time.perf_counter() - start - (sum(grid.seconds.values()) - before)
    assert new is not None and "secagg_aborted" not in metrics, metrics
    survivors = [n for n in node_persona if n not in gone]
    return {"up": np.mean([grid.up[n] for n in survivors]), "down": np.mean([grid.down[n] for n in survivors]),
            "device_s": np.median([grid.seconds[n] for n in survivors]), "coordinator_s": coordinator,
            "round_up": sum(grid.up.values()), "round_down": sum(grid.down.values())}


def plain_round(shape: dict, k: int, devices: int, seed: int) -> dict:
    """The same round without secure aggregation: each device's train request and float32 delta reply."""
    rng = np.random.default_rng(seed)
    node_persona = {n: n % k for n in range(1, devices + 1)}
    grid = TimedGrid(node_persona)
    strategy = PersonaStrategy(node_persona, fraction_train=1.0)
    zeros = {p: {n: np.zeros(s, np.float32) for n, s in shape.items()} for p in range(k)}
    messages = list(strategy.configure_train(1, join_personas(zeros), ConfigRecord(), grid))
    replies = [Message(content=RecordDict({
        "arrays": to_record({n: rng.normal(0, 1e-3, s).astype(np.float32) for n, s in shape.items()}),
        "metrics": MetricRecord({"num-examples": 100, "persona": node_persona[m.metadata.dst_node_id]})}),
        reply_to=m) for m in messages]
    start = time.perf_counter()
    strategy.aggregate_train(1, replies)
    return {"up": np.mean([size(r) for r in replies]), "down": np.mean([size(m) for m in messages]),
            "coordinator_s": time.perf_counter() - start}


def median(runs: list[dict]) -> dict:
    return {key: float(np.median([r[key] for r in runs])) for key in runs[0]}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base-model", default=FederationConfig().base_model)
    p.add_argument("--devices", type=int, default=13, help="13 = 6%% of the 216 paper-split devices")
    p.add_argument("--ks", default="1,4,8")
    p.add_argument("--drop", type=float, default=0.3, help="fraction of devices leaving after sharing keys")
    p.add_argument("--repeat", type=int, default=3, help="rounds per cell; the table has the medians")
    args = p.parse_args(argv)
    for attr in ("_task_id", "_run_id", "_node_id"):  # what a Flower run would set for its messages
        setattr(TaskIdentity, attr, 1 if attr != "_node_id" else 0)

    cfg = FederationConfig(base_model=args.base_model)
    shape = {n: v.shape for n, v in adapter_arrays(add_lora(load_base_model(cfg.base_model)[0], cfg.lora)).items()}
    params = sum(int(np.prod(s)) for s in shape.values())
    print(f"base {cfg.base_model}, {params:,} LoRA parameters, {args.devices} devices a round, "
          f"{os.cpu_count()} cores, load {os.getloadavg()[0]:.1f} (1-minute average at the start)")
    print("| K | plain up / device (MB) | secure up / device (MB) | secure down / device (MB) | "
          "secure up / round (MB) | device protocol (s) | coordinator (s) | coordinator, "
          f"{args.drop:.0%} dropped (s) | plain coordinator (s) |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for k in (int(x) for x in args.ks.split(",")):
        plain = median([plain_round(shape, k, args.devices, r) for r in range(args.repeat)])
        full = median([secure_round(shape, k, args.devices, 0.0, r) for r in range(args.repeat)])
        dropped = median([secure_round(shape, k, args.devices, args.drop, r) for r in range(args.repeat)])
        print(f"| {k} | {plain['up'] / 1e6:.2f} | {full['up'] / 1e6:.2f} | {full['down'] / 1e6:.2f} | "
              f"{full['round_up'] / 1e6:.1f} | {full['device_s']:.2f} | {full['coordinator_s']:.2f} | "
              f"{dropped['coordinator_s']:.2f} | {plain['coordinator_s']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
