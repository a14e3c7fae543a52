"""Simulated misbehaving devices, as Flower client mods wrapped around the real ClientApp.

`poisoning(fraction, kind, scale)` turns a fixed, seeded fraction of devices malicious: after honest local
training each one replaces its persona delta by `scale x delta` ("scale", a boosted update) or `-scale x delta`
("sign-flip"). `dropout(rate)` makes a device fail a training round with probability `rate`, as if it went
offline mid-round (the coordinator gets an error reply instead of an update). Both are simulation harnesses for
the robustness experiment; the product's ClientApp never contains them.
"""

from __future__ import annotations

import hashlib

from flwr.app import Array, ArrayRecord, Context, Message, MessageType
from flwr.clientapp.typing import ClientAppCallable, Mod

KINDS = ("scale", "sign-flip")


def uniform(*parts) -> float:
    """A deterministic draw in [0, 1) from the parts (seed, device, round)."""
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def device_id(context: Context) -> int:
    return int(context.node_config.get("partition-id", context.node_id))


def is_malicious(context: Context, fraction: float, seed: int) -> bool:
    return uniform("malicious", seed, device_id(context)) < fraction


def poisoning(fraction: float, kind: str = "sign-flip", scale: float = 10.0, seed: int = 0) -> Mod:
    if kind not in KINDS:
        raise ValueError(f"poisoning kind must be one of {KINDS}, got {kind!r}")
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"poisoning fraction must be in [0, 1], got {fraction}")
    factor = scale if kind == "scale" else -scale

    def mod(message: Message, context: Context, call_next: ClientAppCallable) -> Message:
        reply = call_next(message, context)
        if (message.metadata.message_type != MessageType.TRAIN or reply.has_error()
                or "arrays" not in reply.content or not is_malicious(context, fraction, seed)):
            return reply
        honest = reply.content["arrays"]
        reply.content["arrays"] = ArrayRecord({k: Array(factor * a.numpy()) for k, a in honest.items()})
        return reply

    return mod


def dropout(rate: float, seed: int = 0) -> Mod:
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"dropout rate must be in [0, 1), got {rate}")

    def mod(message: Message, context: Context, call_next: ClientAppCallable) -> Message:
        if message.metadata.message_type == MessageType.TRAIN:
            round_ = int(message.content["config"].get("server-round", 0))
            if uniform("dropout", seed, device_id(context), round_) < rate:
                raise ConnectionError(f"simulated dropout of device {device_id(context)} in round {round_}")
        return call_next(message, context)

    return mod
