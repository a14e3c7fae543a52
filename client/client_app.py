"""Flower ClientApp: one node is one user's device.

Message types it answers:
- query.embed   one Lloyd step of persona discovery: returns only this device's K-slot (sum, count) contribution
- query.assign  final persona from the centroids (warm users) plus onboarding answers in that persona's slot
- query.cold    cold-start users pick their persona locally from the aggregated onboarding counts
- train         persona adapter in -> persona delta out; the personal adapter is updated and stays here
- evaluate      held-out error sums for the persona adapter and for the personal adapter

Only sums, deltas and error sums leave the device. The personal adapter lives in the device's encrypted store
(`client.store`): `store-path` in the node config, else `<device-dir>/node-<partition>` in a simulation. The store's
key comes from the node config's `store-key-file`, else the `PERSONAFL_STORE_KEY` environment variable, else a
random key that exists only in this node's memory for the run (a simulated device's secure element): then
whatever an earlier run left in that directory is unreadable, so it is crypto-shredded before first use.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client.device import Device, feature_space, runtime
from client.keys import KEY_ENV, RawKey
from client.store import EncryptedStore
from common.config import FederationConfig, ScoringConfig, split_preset
from common.data import load_movielens
from common.personas import cold_start_persona, embed_profiles, initial_slot, nearest, slot_sums
from common.split import sample_users, temporal_split
from server.strategy import from_record, to_record

PERSONAL = "personal"  # the store name of the on-device personal adapter

@lru_cache(maxsize=2)
def _dataset(name: str, split: str):
    data = load_movielens(name)
    return data, temporal_split(data.ratings, split_preset(split))


@lru_cache(maxsize=4)
def _eval_sample(name: str, split: str, n: int, seed: int) -> frozenset:
    """The seeded evaluation sample; the simulation's baseline rows are scored on the same users."""
    return frozenset(int(u) for u in sample_users(_dataset(name, split)[1].users, n, seed))


def _device(context: Context, overrides: dict) -> tuple[Device, FederationConfig]:
    cfg = FederationConfig.from_run_config({**dict(context.run_config), **overrides})
    data, split = _dataset(cfg.dataset, cfg.split)
    users = split.users
    partition = int(context.node_config["partition-id"])
    if partition >= len(users):
        raise ValueError(f"partition-id {partition} but the '{cfg.split}' split has only {len(users)} users")
    user = int(users[partition])
    train = split.train[split.train["user"] == user]
    test = split.test[split.test["user"] == user]
    return Device(user, data, train, test, runtime(cfg.base_model, cfg.lora), ScoringConfig()), cfg


def _state(context: Context) -> ConfigRecord:
    if "device" not in context.state:
        context.state["device"] = ConfigRecord()
    return context.state["device"]


def _embedding(device: Device, context: Context) -> np.ndarray:
    state = context.state
    if "embedding" not in state:
        state["embedding"] = ArrayRecord({"e": _array(embed_profiles([device.profile])[0])})
    return state["embedding"]["e"].numpy()


def _array(x: np.ndarray) -> Array:
    return Array(np.ascontiguousarray(x))


def _reply(message: Message, metrics: dict, arrays: dict | None = None) -> Message:
    content = RecordDict({"metrics": MetricRecord(metrics)})
    if arrays is not None:
        content["arrays"] = arrays if isinstance(arrays, ArrayRecord) else ArrayRecord(arrays)
    return Message(content=content, reply_to=message)


def _store(device: Device, cfg: FederationConfig, context: Context) -> EncryptedStore:
    node = context.node_config
    root = Path(str(node["store-path"])) if "store-path" in node else \
        Path(cfg.device_dir) / f"node-{int(node['partition-id']):04d}"
    if "store-key-file" in node:
        keys = RawKey.from_file(Path(str(node["store-key-file"])))
    elif os.environ.get(KEY_ENV):
        keys = RawKey.from_env()
    else:
        vault = context.state["vault"] if "vault" in context.state else None
        if vault is None:
            vault = context.state["vault"] = ConfigRecord({"kek": RawKey.generate().raw})
            EncryptedStore(root, RawKey(vault["kek"])).forget(str(device.user))
        keys = RawKey(vault["kek"])
    return EncryptedStore(root, keys, keep_versions=cfg.device_keep_versions)


def _load_personal(device: Device, cfg: FederationConfig, context: Context) -> dict | None:
    store = _store(device, cfg, context)
    if not store.versions(str(device.user), PERSONAL):
        return None
    return {k: v.numpy() for k, v in store.get_adapter(str(device.user), PERSONAL).items()}


def _personal(device: Device, cfg: FederationConfig, context: Context, persona: dict) -> tuple[dict, dict]:
    """The on-device adapter: created from the persona adapter on first use, fine-tuned locally each time."""
    start = _load_personal(device, cfg, context)
    personal, metrics = device.train_adapter(persona if start is None else start, cfg.train(cfg.personal_steps))
    _store(device, cfg, context).put_adapter(str(device.user), PERSONAL,
                                             {k: torch.from_numpy(v) for k, v in personal.items()})
    return personal, metrics


def build_app(overrides: dict | None = None) -> ClientApp:
    """The ClientApp; `overrides` (run-config keys) take precedence over the run's config (used by simulations)."""
    overrides = dict(overrides or {})
    app = ClientApp()

    @app.query("embed")
    def embed(message: Message, context: Context) -> Message:
        device, cfg = _device(context, overrides)
        k = cfg.num_personas
        if device.n_train < cfg.cold_start_threshold:  # too little history to embed: sits out discovery
            return _reply(message, {"cold": 1}, {"sums": _array(np.zeros((k, 384), np.float32)),
                                                 "counts": _array(np.zeros(k, np.float32))})
        e = _embedding(device, context)
        if "centroids" in message.content:
            slot = nearest(e, message.content["centroids"]["c"].numpy())
        else:
            slot = initial_slot(device.user, k, cfg.seed)
        sums, counts = slot_sums(e, slot, k)
        return _reply(message, {"cold": 0}, {"sums": _array(sums), "counts": _array(counts)})

    @app.query("assign")
    def assign(message: Message, context: Context) -> Message:
        device, cfg = _device(context, overrides)
        k = cfg.num_personas
        space = feature_space(device.data)
        onboarding = np.zeros((k, space.size), np.float32)
        if device.n_train < cfg.cold_start_threshold:
            return _reply(message, {"cold": 1}, {"features": _array(onboarding), "counts": _array(np.zeros(k, np.float32))})
        persona = nearest(_embedding(device, context), message.content["centroids"]["c"].numpy()) if k > 1 else 0
        _state(context)["persona"] = persona
        onboarding[persona] = space.encode(device.onboarding())
        counts = np.zeros(k, np.float32)
        counts[persona] = 1
        return _reply(message, {"cold": 0, "persona": persona}, {"features": _array(onboarding), "counts": _array(counts)})

    @app.query("cold")
    def cold(message: Message, context: Context) -> Message:
        device, cfg = _device(context, overrides)
        state = _state(context)
        in_eval = int(device.user in _eval_sample(cfg.dataset, cfg.split, cfg.eval_users, cfg.seed))
        if device.n_train >= cfg.cold_start_threshold:
            return _reply(message, {"cold": 0, "persona": int(state["persona"]), "eval": in_eval})
        space = feature_space(device.data)
        tables = message.content["tables"]
        persona = cold_start_persona(space.encode(device.onboarding()), tables["features"].numpy(),
                                     tables["counts"].numpy(), space)
        state["persona"] = persona
        return _reply(message, {"cold": 1, "persona": persona, "eval": in_eval})

    @app.train()
    def train(message: Message, context: Context) -> Message:
        device, cfg = _device(context, overrides)
        persona = from_record(message.content["arrays"])
        trained, metrics = device.train_adapter(persona, cfg.train(cfg.local_steps))
        delta = {k: trained[k] - persona[k] for k in persona}
        if cfg.personal_steps > 0:
            _personal(device, cfg, context, persona)
        return _reply(message, {"num-examples": device.n_train, "persona": int(message.content["config"]["persona"]),
                                **metrics}, to_record(delta))

    @app.evaluate()
    def evaluate(message: Message, context: Context) -> Message:
        device, cfg = _device(context, overrides)
        persona = from_record(message.content["arrays"])
        personal = _load_personal(device, cfg, context)
        if personal is None:
            personal = _personal(device, cfg, context, persona)[0] if cfg.personal_steps > 0 else persona
        on_persona, on_personal = device.errors(persona), device.errors(personal)
        distance = float(np.sqrt(sum(((personal[k] - persona[k]) ** 2).sum() for k in persona)))
        return _reply(message, {
            "num-examples": device.n_train, "cold": int(device.n_train < cfg.cold_start_threshold),
            "persona_sse": on_persona["sse"], "persona_sae": on_persona["sae"],
            "personal_sse": on_personal["sse"], "personal_sae": on_personal["sae"], "n": on_persona["n"],
            "personal_distance": distance,
        })

    return app


app = build_app()
