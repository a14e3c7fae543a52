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

import json
import os
from collections.abc import Iterable
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import Mod

from client.device import Device, runtime
from client.keys import KEY_ENV, RawKey
from client.local_data import Owner, device_data, split_own
from client.policy import TrainingPolicy
from client.store import EncryptedStore
from common.config import DeviceDP, FederationConfig, ScoringConfig, split_preset
from common.data import load_movielens
from common.personas import (EMBED_DIM, cold_start_persona, embed_profiles, embedding_sse, initial_slot, nearest,
                             onboarding_space, slot_sums)
from common.privacy import BudgetExhausted, PrivacyLedger, noise_for_target
from common.split import sample_users, temporal_split
from common.training import dp_sample_rate
from server.strategy import from_record, to_record

PERSONAL = "personal"  # the store name of the on-device personal adapter
LEDGER = "privacy-ledger"  # the store name of the device's example-level privacy ledger
STATE = "device-state"  # persona and the rounds this device contributed to (JSON)

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
    node = context.node_config
    if "data-path" in node:  # a deployed device: its owner's own file over the public catalogue
        # The sign-up answers come from the owner-only file the daemon names (never the SuperNode's command line).
        answers = json.loads(Path(str(node["owner-file"])).read_text())
        owner = Owner(int(node.get("user-id", 0)), int(answers["age"]), str(answers["gender"]),
                      str(answers["occupation"]))
        data = device_data(Path(str(node["data-path"])), cfg.dataset, owner)
        # Every rating trains unless the owner asked for an evaluation hold-out (not the simulation's 60/40 split).
        train, test = split_own(data.ratings, float(node.get("eval-holdout", 0)))
        return Device(owner.user, data, train, test, runtime(cfg.base_model, cfg.lora), ScoringConfig(),
                      cfg.memory_items), cfg
    data, split = _dataset(cfg.dataset, cfg.split)
    users = split.users
    partition = int(context.node_config["partition-id"])
    if partition >= len(users):
        raise ValueError(f"partition-id {partition} but the '{cfg.split}' split has only {len(users)} users")
    user = int(users[partition])
    train = split.train[split.train["user"] == user]
    test = split.test[split.test["user"] == user]
    return Device(user, data, train, test, runtime(cfg.base_model, cfg.lora), ScoringConfig(),
                  cfg.memory_items), cfg


def _k(message: Message, cfg: FederationConfig) -> int:
    """The number of personas a discovery query is about (the coordinator may be trying several)."""
    config = message.content["config"] if "config" in message.content else {}
    return int(config.get("k", cfg.num_personas))


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


def load_state(store: EncryptedStore, user: str) -> dict:
    return json.loads(store.get_bytes(user, STATE)) if store.versions(user, STATE) else {}


def _save_state(device: Device, cfg: FederationConfig, context: Context, **changes) -> None:
    store = _store(device, cfg, context)
    state = load_state(store, str(device.user))
    if "contributed" in changes:
        changes["contributed"] = state.get("contributed", []) + [changes["contributed"]]
    store.put_bytes(str(device.user), STATE, json.dumps({**state, **changes}).encode())


def _device_dp(device: Device, cfg: FederationConfig) -> DeviceDP:
    noise = cfg.dp_device_noise
    if cfg.dp_device_target_epsilon > 0:  # spread the target over a participation in every round
        rate = dp_sample_rate(cfg.dp_device_records, cfg.train(cfg.local_steps))
        noise = noise_for_target(cfg.dp_device_target_epsilon, cfg.dp_delta, rate, cfg.num_rounds * cfg.local_steps)
    return DeviceDP(noise, cfg.dp_device_clip, cfg.dp_delta, cfg.dp_device_budget or float("inf"),
                    records=cfg.dp_device_records, secure_mode=cfg.dp_secure_mode,
                    seed=cfg.seed if cfg.reproducible else None)


def _ledger(device: Device, cfg: FederationConfig, context: Context) -> PrivacyLedger:
    """The device's persisted ledger; its budget is the configured one (an owner may raise or lower it)."""
    store, dp = _store(device, cfg, context), _device_dp(device, cfg)
    if store.versions(str(device.user), LEDGER):
        ledger = PrivacyLedger.from_bytes(store.get_bytes(str(device.user), LEDGER))
        ledger.budget, ledger.delta = dp.budget, dp.delta
        return ledger
    return PrivacyLedger(dp.budget, dp.delta)


def _train(device: Device, cfg: FederationConfig, context: Context, start: dict, steps: int,
           private: bool) -> tuple[dict, dict]:
    """Local training, through DP-SGD and the persisted ledger when `private`."""
    if not private:
        return device.train_adapter(start, cfg.train(steps))
    ledger = _ledger(device, cfg, context)
    trained, metrics = device.train_adapter(start, cfg.train(steps), _device_dp(device, cfg), ledger)
    _store(device, cfg, context).put_bytes(str(device.user), LEDGER, ledger.to_bytes())
    return trained, metrics


def _personal(device: Device, cfg: FederationConfig, context: Context, persona: dict) -> tuple[dict, dict]:
    """The on-device adapter: created from the persona adapter on first use, fine-tuned locally each time.

    It never leaves the device, so it trains without noise unless `dp-personal` is set."""
    start = _load_personal(device, cfg, context)
    start = persona if start is None else start
    try:
        personal, metrics = _train(device, cfg, context, start, cfg.personal_steps,
                                   cfg.device_dp_enabled and cfg.dp_personal)
    except BudgetExhausted:  # out of budget: keep serving with the adapter as it is
        personal, metrics = start, {}
    _store(device, cfg, context).put_adapter(str(device.user), PERSONAL,
                                             {k: torch.from_numpy(v) for k, v in personal.items()})
    return personal, metrics


def build_app(overrides: dict | None = None, mods: Iterable[Mod] = ()) -> ClientApp:
    """The ClientApp; `overrides` (run-config keys) take precedence over the run's config, `mods` wrap it (both
    used by simulations)."""
    overrides = dict(overrides or {})
    app = ClientApp(mods=list(mods))

    @app.query("embed")
    def embed(message: Message, context: Context) -> Message:
        device, cfg = _device(context, overrides)
        k = _k(message, cfg)
        if device.n_train < cfg.cold_start_threshold:  # too little history to embed: sits out discovery
            return _reply(message, {"cold": 1}, {"sums": _array(np.zeros((k, EMBED_DIM), np.float32)),
                                                 "counts": _array(np.zeros(k, np.float32)),
                                                 "sse": _array(np.zeros(k, np.float32))})
        e = _embedding(device, context)
        sse = np.zeros(k, np.float32)
        if "centroids" in message.content:
            centroids = message.content["centroids"]["c"].numpy()
            slot = nearest(e, centroids)
            sse = embedding_sse(e, centroids, slot)
        else:
            slot = initial_slot(device.user, k, cfg.seed)
        sums, counts = slot_sums(e, slot, k)
        return _reply(message, {"cold": 0}, {"sums": _array(sums), "counts": _array(counts), "sse": _array(sse)})

    @app.query("assign")
    def assign(message: Message, context: Context) -> Message:
        device, cfg = _device(context, overrides)
        k = _k(message, cfg)
        space = onboarding_space(cfg.dataset)
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
        if "data-path" in context.node_config:  # deployed: the owner opts in or out of evaluation
            in_eval = int(context.node_config.get("evaluate", 1)) * int(len(device.test) > 0)  # needs a hold-out
        else:
            in_eval = int(device.user in _eval_sample(cfg.dataset, cfg.split, cfg.eval_users, cfg.eval_seed))
        if device.n_train >= cfg.cold_start_threshold:
            _save_state(device, cfg, context, persona=int(state["persona"]))
            return _reply(message, {"cold": 0, "persona": int(state["persona"]), "eval": in_eval})
        space = onboarding_space(cfg.dataset)
        tables = message.content["tables"]
        persona = cold_start_persona(space.encode(device.onboarding()), tables["features"].numpy(),
                                     tables["counts"].numpy(), space)
        state["persona"] = persona
        _save_state(device, cfg, context, persona=persona)
        return _reply(message, {"cold": 1, "persona": persona, "eval": in_eval})

    @app.train()
    def train(message: Message, context: Context) -> Message:
        device, cfg = _device(context, overrides)
        persona = from_record(message.content["arrays"])
        persona_id = int(message.content["config"]["persona"])
        policy = TrainingPolicy.from_node_config(context.node_config)
        reason = policy.refusal(len(device.train_examples[1]))
        if reason is None:
            try:
                trained, metrics = _train(device, cfg, context, persona, policy.steps(cfg.local_steps),
                                          cfg.device_dp_enabled)
            except BudgetExhausted as e:  # the device keeps serving; it just stops contributing
                reason = str(e)
        if reason is not None:
            reply = _reply(message, {"skipped": 1, "persona": persona_id, "num-examples": 1})
            reply.content["status"] = ConfigRecord({"reason": f"skipped: {reason}"})
            return reply
        delta = {k: trained[k] - persona[k] for k in persona}
        _save_state(device, cfg, context, contributed=int(message.content["config"]["server-round"]))
        if cfg.personal_steps > 0:
            _personal(device, cfg, context, persona)
        if cfg.device_dp_enabled or cfg.user_dp_enabled:
            # Under DP only the update and speed figures leave: no example count (uniform weights), no loss, and no
            # epsilon either (its sample rate would reveal how many ratings the device holds).
            metrics = {k: metrics[k] for k in ("tokens_per_s", "gflops_per_s")}
            return _reply(message, {"num-examples": 1, "persona": persona_id, **metrics}, to_record(delta))
        return _reply(message, {"num-examples": device.n_train, "persona": persona_id, **metrics}, to_record(delta))

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
            # the version the coordinator served, echoed so its metrics are pooled per version (canaries)
            **({"version": int(message.content["config"]["version"])} if "version" in message.content["config"]
               else {}),
        })

    return app


app = build_app()
