"""Flower ClientApp: one node is one user's device.

Message types it answers:
- query.embed   one Lloyd step of persona discovery: returns only this device's K-slot (sum, count) contribution
- query.assign  final persona from the centroids (warm users) plus onboarding answers in that persona's slot
- query.cold    cold-start users pick their persona locally from the aggregated onboarding counts
- train         persona adapter in -> persona delta out; the personal adapter is updated and stays here
- train.secagg  the same training under secure aggregation: the delta goes into this persona's slot of a
                K-slot vector held in memory, and only public keys go out; query.secagg_share, _mask and
                _unmask then run the protocol (`client.secure_aggregation`), so the delta leaves only masked
- evaluate      held-out error sums for the persona adapter and for the personal adapter

Only sums, deltas and error sums leave the device. The personal adapter lives in the device's encrypted store
(`client.store`): `store-path` in the node config, else `<device-dir>/node-<partition>` in a simulation. The store's
key comes from the node config's `store-key-file`, else the `PERSONAFL_STORE_KEY` environment variable, else a
random key that exists only in this node's memory for the run (a simulated device's secure element): then
whatever an earlier run left in that directory is unreadable, so it is crypto-shredded before first use.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
from collections.abc import Iterable
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.common.constant import ErrorCode
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import Mod

from client.device import SERVING, Device, runtime
from client.keys import KEY_ENV, RawKey
from client.local_data import Owner, device_data, split_own
from client import secure_aggregation
from client.policy import TrainingPolicy
from client.store import EncryptedStore
from common.adapters import adapter_digest
from common.config import DeviceDP, FederationConfig, ScoringConfig, TrainConfig, split_preset
from common.data import load_movielens
from common import item_factors
from common.item_stats import ItemStats, contribution
from common.personas import (cold_start_persona, discovery_dim, embed_profiles, embedding_sse, genre_deviation,
                             initial_slot, nearest, onboarding_space, slot_sums)
from common.privacy import BudgetExhausted, PrivacyLedger, noise_for_target
from common.split import sample_users, temporal_split, validation_split
from common.timing import phase
from common.training import dp_sample_rate

PERSONAL = "personal"  # the store name of the on-device personal adapter
LEDGER = "privacy-ledger"  # the store name of the device's example-level privacy ledger
STATE = "device-state"  # persona, rounds contributed, the owner's budget, the ledger's version (JSON)
LOG = logging.getLogger(__name__)  # the device's own log: details that must not leave it go here

# What a skipped or failed reply says about why: a category, never a number or the owner's data.
BUDGET, POLICY, LEDGER_MISSING, ERROR = "budget", "policy", "ledger", "error"


class LedgerRolledBack(Exception):
    """The device state says a newer privacy ledger was written than the store holds (deleted or rolled back)."""

@lru_cache(maxsize=2)
def _dataset(name: str, split: str):
    data = load_movielens(name)
    return data, temporal_split(data.ratings, split_preset(split))


@lru_cache(maxsize=4)
def _eval_sample(name: str, split: str, n: int, seed: int) -> frozenset:
    """The seeded evaluation sample; the simulation's baseline rows are scored on the same users."""
    return frozenset(int(u) for u in sample_users(_dataset(name, split)[1].users, n, seed))


def _sent_factors(message: Message) -> tuple[item_factors.ItemFactors, float, float]:
    """The item half an MF query sends and the penalty to fit the user half with (an absent prior count is 0:
    older coordinators); a malformed release raises (the handler's error category)."""
    record, penalty = message.content["item-factors"], message.content["config"]
    return item_factors.read_release({**{k: record[k].numpy() for k in record}, "reg": penalty["item-factors-reg"],
                                      "prior": penalty.get("item-factors-prior", 0.0)})


@phase("device: loading data and model")
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
        val = None
        if cfg.validation_fraction > 0 and len(test) and int(node.get("evaluate", 1)):
            # An owner who opted into evaluation also holds the latest training ratings out as validation when the
            # run asks for it: the blend weight the device will serve at is fitted on them (`serve-blend`), as in
            # the simulation. An owner who did not keeps every rating for training.
            train, val = validation_split(train.assign(user=owner.user), cfg.validation_fraction)
        return Device(owner.user, data, train, test, runtime(cfg.base_model, cfg.lora), ScoringConfig(),
                      cfg.memory_items, val=val, residual=cfg.residual_to_bias), cfg
    data, split = _dataset(cfg.dataset, cfg.split)
    users = split.users
    partition = int(context.node_config["partition-id"])
    if partition >= len(users):
        raise ValueError(f"partition-id {partition} but the '{cfg.split}' split has only {len(users)} users")
    user = int(users[partition])
    train, val, test = _user_frames(cfg.dataset, cfg.split, cfg.validation_fraction)(user)
    return Device(user, data, train, test, runtime(cfg.base_model, cfg.lora), ScoringConfig(),
                  cfg.memory_items, val=val, residual=cfg.residual_to_bias), cfg


@lru_cache(maxsize=4)
def _user_frames(name: str, split: str, validation_fraction: float):
    """`frames(user)` -> that simulated user's (train, validation, test) ratings, cut once per process: a device is
    rebuilt for every message, and 30 rounds of item factors send every device 30 of them, where cutting its rows
    out of the whole split each time was half of a device's work. Devices never modify the frames."""
    _, whole = _dataset(name, split)
    cut: dict = {}

    def frames(user: int):
        if user not in cut:
            # With `validation-fraction`, the user's latest training ratings are held out of every training
            # (persona, personal, item statistics, discovery): blend weights are fitted on them (`common.blend`).
            train, val = validation_split(whole.train[whole.train["user"] == user], validation_fraction)
            cut[user] = train, val, whole.test[whole.test["user"] == user]
        return cut[user]
    return frames


def _with_item_stats(device: Device, message: Message) -> Device:
    """Quote the coordinator's released per-movie statistics in the prompts, when the round carries them; with
    released item factors too, MF becomes the device's private base (`Device.use_item_factors`)."""
    if "item-stats" in message.content:
        record = message.content["item-stats"]
        device.use_item_stats(ItemStats.from_arrays({k: record[k].numpy() for k in ("mean", "count", "mu")}))
    if "item-factors" in message.content:
        record = message.content["item-factors"]
        device.use_item_factors(*item_factors.read_release({k: record[k].numpy() for k in record}))
    return device


def _k(message: Message, cfg: FederationConfig) -> int:
    """The number of personas a discovery query is about (the coordinator may be trying several)."""
    config = message.content["config"] if "config" in message.content else {}
    return int(config.get("k", cfg.num_personas))


def _state(context: Context) -> ConfigRecord:
    if "device" not in context.state:
        context.state["device"] = ConfigRecord()
    return context.state["device"]


@phase("device: discovery features")
def _embedding(device: Device, context: Context, cfg: FederationConfig) -> np.ndarray:
    """This device's discovery vector (`discovery-features`), computed once per run."""
    state = context.state
    if "embedding" not in state:
        if cfg.discovery_features == "genre-deviation":
            e = genre_deviation(device.train, device.data.items, onboarding_space(cfg.dataset).genres)
        else:
            e = embed_profiles([device.profile])[0]
        state["embedding"] = ArrayRecord({"e": _array(e)})
    return state["embedding"]["e"].numpy()


def _array(x: np.ndarray) -> Array:
    return Array(np.ascontiguousarray(x))


# The coordinator's record layout (one Array per PEFT key), rebuilt here: the client never imports server code.
def to_record(arrays: dict) -> ArrayRecord:
    return ArrayRecord({k: _array(v) for k, v in arrays.items()})


def from_record(record: ArrayRecord) -> dict:
    return {k: a.numpy() for k, a in record.items()}


def _reply(message: Message, metrics: dict, arrays: dict | None = None) -> Message:
    content = RecordDict({"metrics": MetricRecord(metrics)})
    if arrays is not None:
        content["arrays"] = arrays if isinstance(arrays, ArrayRecord) else ArrayRecord(arrays)
    return Message(content=content, reply_to=message)


def _store(device: Device, cfg: FederationConfig, context: Context) -> EncryptedStore:
    node = context.node_config
    root = Path(str(node["store-path"])) if "store-path" in node else \
        Path(cfg.device_dir) / f"node-{int(node['partition-id']):04d}"
    root.parent.mkdir(parents=True, exist_ok=True)  # the store makes its own directory (owner-only), not its parents
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


def _deployed(context: Context) -> bool:
    return "data-path" in context.node_config


def owner_budget(cfg: FederationConfig, context: Context, state: dict) -> float:
    """The lifetime epsilon this device may spend. The owner sets it at enrol (`--dp-budget`, kept in the device
    state; none = no limit); the coordinator's `dp-device-budget` can only lower it. A simulated device has no
    owner: the run config's `dp-device-budget` stands in for the owner's choice (0 = no limit)."""
    asked = cfg.dp_device_budget if cfg.dp_device_budget > 0 else math.inf
    if not _deployed(context):
        return asked
    owner = state.get("dp_budget")
    return min(math.inf if owner is None else float(owner), asked)


def _device_dp(device: Device, cfg: FederationConfig, context: Context | None = None) -> DeviceDP:
    """DP-SGD settings. A deployed device ignores the run config's `reproducible` (a coordinator that chose the
    seed would know which records were sampled) and always uses secure-mode noise (about 0.5% of a step)."""
    deployed = context is not None and _deployed(context)
    noise = cfg.dp_device_noise
    if cfg.dp_device_target_epsilon > 0:  # spread the target over a participation in every round
        rate = dp_sample_rate(cfg.dp_device_records, cfg.train(cfg.local_steps))
        noise = noise_for_target(cfg.dp_device_target_epsilon, cfg.dp_delta, rate, cfg.num_rounds * cfg.local_steps)
    return DeviceDP(noise, cfg.dp_device_clip, cfg.dp_delta, cfg.dp_device_budget or float("inf"),
                    records=cfg.dp_device_records, secure_mode=cfg.dp_secure_mode or deployed,
                    seed=cfg.seed if cfg.reproducible and not deployed else None)


def _ledger(device: Device, cfg: FederationConfig, context: Context) -> PrivacyLedger:
    """The device's persisted ledger, under the owner's budget (`owner_budget`).

    Every ledger write bumps the store version, and the device state records it: a ledger that is missing, or older
    than the state says, was deleted or rolled back, and trusting it would hand out the budget again. Then this
    raises `LedgerRolledBack` and the device trains nothing. (Rolling back the state and the ledger together is
    not detectable from files alone: that would take a hardware monotonic counter.)"""
    store, user = _store(device, cfg, context), str(device.user)
    state = load_state(store, user)
    versions = store.versions(user, LEDGER)
    expected = int(state.get("ledger_version", 0))
    if (versions[-1] if versions else 0) < expected:
        raise LedgerRolledBack(f"privacy ledger version {versions[-1] if versions else 'none'} found, device state "
                               f"says {expected} was written")
    budget = owner_budget(cfg, context, state)
    # A deployed device's delta is at most the default (1e-5): a coordinator asking for a larger one would buy a
    # smaller epsilon with a weaker guarantee.
    delta = min(cfg.dp_delta, FederationConfig.dp_delta) if _deployed(context) else cfg.dp_delta
    if versions:
        ledger = PrivacyLedger.from_bytes(store.get_bytes(user, LEDGER))
        # the smaller delta is the stricter statement: a coordinator cannot shrink epsilon by asking for a larger one
        ledger.budget, ledger.delta = budget, min(ledger.delta, delta)
        return ledger
    return PrivacyLedger(budget, delta)


def _train(device: Device, cfg: FederationConfig, context: Context, start: dict, train: TrainConfig,
           private: bool, leaves: bool = True) -> tuple[dict, dict]:
    """Local training, through DP-SGD and the persisted ledger when `private`.

    Non-private training of something that `leaves` the device has no finite epsilon: a device under a finite
    budget refuses it (`BudgetExhausted`), so a coordinator cannot switch device DP off to train an exhausted
    device. The personal adapter never leaves, so it may train without noise."""
    if not private:
        if leaves and math.isfinite(_ledger(device, cfg, context).budget):
            raise BudgetExhausted("non-private training would exceed the device's finite lifetime budget")
        return device.train_adapter(start, train)
    ledger = _ledger(device, cfg, context)
    trained, metrics = device.train_adapter(start, train, _device_dp(device, cfg, context), ledger)
    version = _store(device, cfg, context).put_bytes(str(device.user), LEDGER, ledger.to_bytes())
    _save_state(device, cfg, context, ledger_version=version)  # after the ledger: a crash between leaves it ahead
    return trained, metrics


def _personal(device: Device, cfg: FederationConfig, context: Context, persona: dict) -> tuple[dict, dict]:
    """The on-device adapter: the persona adapter just received, fine-tuned on the user's own ratings.

    Derived afresh from each new persona version (FedAvg + local fine-tuning): continuing an adapter derived from an
    older version would keep that version's weights and miss what the federation learnt since. It never leaves the
    device, so it trains without noise unless `dp-personal` is set. With `personal-steps` 0 it is the persona adapter
    as received: still stored, so the device serves what the federation learnt rather than the bare base model."""
    personal, metrics = persona, {}
    if cfg.personal_steps > 0:
        try:
            with phase("model: personal training"):
                personal, metrics = _train(device, cfg, context, persona, cfg.personal_train(),
                                           cfg.device_dp_enabled and cfg.dp_personal, leaves=False)
        except (BudgetExhausted, LedgerRolledBack):  # serve the persona adapter as it is
            pass
    store = _store(device, cfg, context)
    # The context first: it is the same for every adapter of a run, so a crash between the two writes leaves the
    # previous adapter beside a context it was trained with.
    store.put_bytes(str(device.user), SERVING, device.serving_context())
    store.put_adapter(str(device.user), PERSONAL, {k: torch.from_numpy(v) for k, v in personal.items()})
    _save_state(device, cfg, context, personal_from=adapter_digest(persona))  # after the adapter: a crash retrains
    return personal, metrics


def _sent_blend(message: Message) -> dict[str, float]:
    """The "blend" query's {version digest: weight}; ValueError unless they are equally long lists of sha256 hex
    digests and numbers in [0, 1] (a bad weight would corrupt every prediction served after it)."""
    config = message.content["config"] if "config" in message.content else {}
    digests, weights = config.get("digests"), config.get("weights")
    if not isinstance(digests, list) or not isinstance(weights, list) or len(digests) != len(weights):
        raise ValueError("blend: 'digests' and 'weights' must be lists of the same length")
    out = {}
    for digest, weight in zip(digests, weights):
        if not (isinstance(digest, str) and len(digest) == 64 and all(c in "0123456789abcdef" for c in digest)):
            raise ValueError("blend: every digest must be a sha256 hex digest")
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not 0.0 <= weight <= 1.0:
            raise ValueError("blend: every weight must be a number in [0, 1]")
        out[digest] = float(weight)
    return out


def _guarded(handler):
    """Any exception becomes an error reply whose reason is a category only. Flower would otherwise forward the
    exception text, which can quote the owner's data (a line of their interactions file); the details go to the
    device's own log."""
    @functools.wraps(handler)
    def wrapper(message: Message, context: Context) -> Message:
        try:
            with phase("device: message handling (other)"):
                return handler(message, context)
        except Exception:
            LOG.exception("%s failed on this device", message.metadata.message_type)
            return Message(error=Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=ERROR), reply_to=message)
    return wrapper


def _skipped(message: Message, persona_id: int | None, category: str) -> Message:
    """A declined round's reply; under secure aggregation (`persona_id` None) it names no persona."""
    persona = {} if persona_id is None else {"persona": persona_id}
    reply = _reply(message, {"skipped": 1, **persona, "num-examples": 1})
    reply.content["status"] = ConfigRecord({"reason": category})
    return reply


def _private_run(cfg: FederationConfig) -> bool:
    return cfg.device_dp_enabled or cfg.user_dp_enabled


def build_app(overrides: dict | None = None, mods: Iterable[Mod] = ()) -> ClientApp:
    """The ClientApp; `overrides` (run-config keys) take precedence over the run's config, `mods` wrap it (both
    used by simulations)."""
    overrides = dict(overrides or {})
    app = ClientApp(mods=list(mods))

    @app.query("embed")
    @_guarded
    def embed(message: Message, context: Context) -> Message:
        device, cfg = _device(context, overrides)
        k = _k(message, cfg)
        if device.n_train < cfg.cold_start_threshold:  # too little history to embed: sits out discovery
            # No "cold" flag: it would tell the coordinator, un-noised, that this user has few ratings; the zero
            # contribution is clipped and noised inside the sum like any other.
            dim = discovery_dim(cfg.discovery_features, onboarding_space(cfg.dataset))
            return _embed_reply(message, context, np.zeros((k, dim), np.float32), np.zeros(k, np.float32),
                                np.zeros(k, np.float32))
        e = _embedding(device, context, cfg)
        sse = np.zeros(k, np.float32)
        if "centroids" in message.content:
            centroids = message.content["centroids"]["c"].numpy()
            slot = nearest(e, centroids)
            sse = embedding_sse(e, centroids, slot)
        else:
            slot = initial_slot(device.user, k, cfg.seed)
        sums, counts = slot_sums(e, slot, k)
        return _embed_reply(message, context, sums, counts, sse)

    def _embed_reply(message: Message, context: Context, sums, counts, sse) -> Message:
        config = message.content["config"] if "config" in message.content else {}
        if "secagg-round" in config:  # only the sums over every device reach the coordinator
            inertia = [sse] if bool(config.get("inertia", False)) else []
            return secure_aggregation.start_sums(message, context, [sums, counts, *inertia])
        return _reply(message, {}, {"sums": _array(sums), "counts": _array(counts), "sse": _array(sse)})

    @app.query("itemstats")
    @_guarded
    def itemstats(message: Message, context: Context) -> Message:
        # Every device answers, cold-start ones included: the contribution's bound, not its size, is what the
        # coordinator's noise covers, and an empty answer would say "few ratings" in the clear.
        device, _ = _device(context, overrides)
        sums, weights, volume = contribution(device.train["item"].to_numpy(), device.train["rating"].to_numpy(),
                                             int(device.data.items.index.max()))
        config = message.content["config"] if "config" in message.content else {}
        if "secagg-round" in config:  # the coordinator sees only the sum over every device
            return secure_aggregation.start_sums(message, context, [sums, weights, np.array([volume])])
        return _reply(message, {}, {"sums": _array(sums.astype(np.float32)),
                                    "weights": _array(weights.astype(np.float32)),
                                    "volume": _array(np.array([volume], np.float32))})

    @app.query("itemfactors")
    @_guarded
    def itemfactors(message: Message, context: Context) -> Message:
        # One round of federated MF (`common.item_factors`): this device's user factors are fitted here and stay
        # here; only the gradient for the item half leaves, clipped to the bound the coordinator's noise covers.
        # Every device answers (an empty answer is all zeros, as for the item statistics).
        device, cfg = _device(context, overrides)
        model, reg, prior = _sent_factors(message)
        answer = item_factors.clip(item_factors.contribution(device.train["item"].to_numpy(),
                                                             device.train["rating"].to_numpy(), model, reg, prior),
                                   cfg.item_factors_clip)
        if "secagg-round" in message.content["config"]:  # the coordinator sees only the sum over the cohort
            order = item_factors.gradient_shapes(*model.factors.shape)
            return secure_aggregation.start_sums(message, context, [answer[k] for k in order])
        return _reply(message, {}, {k: _array(v.astype(np.float32)) for k, v in answer.items()})

    @app.query("usercentre")
    @_guarded
    def usercentre(message: Message, context: Context) -> Message:
        # The population centre after the MF rounds: this device's own user half, fitted to the final item half,
        # clipped to the bound the coordinator's noise covers; the coordinator releases only the mean over devices.
        device, _ = _device(context, overrides)
        model, reg, prior = _sent_factors(message)
        half = item_factors.user_half(device.train["item"].to_numpy(), device.train["rating"].to_numpy(), model,
                                      reg, prior)
        if "secagg-round" in message.content["config"]:  # only the sum over the cohort is unmasked
            return secure_aggregation.start_sums(message, context, [half])
        return _reply(message, {}, {"half": _array(half.astype(np.float32))})

    @app.query("order")
    @_guarded
    def order(message: Message, context: Context) -> Message:
        # A replayable simulation only: Flower draws node ids at random each run, so the coordinator orders every
        # seeded draw over devices (MF round samples, training cohorts) by this simulation artefact, the
        # partition, not by node id. A deployed device has no partition and answers nothing.
        cfg = FederationConfig.from_run_config({**dict(context.run_config), **overrides})
        simulated = "partition-id" in context.node_config and "data-path" not in context.node_config
        return _reply(message, {"order": int(context.node_config["partition-id"])}
                      if cfg.reproducible and simulated else {})

    @app.query("blend")
    @_guarded
    def blend_weights(message: Message, context: Context) -> Message:
        # The serving blend weights the coordinator fitted on pooled validation sums, one per persona version,
        # named by the version's digest (the device is not told version numbers). A device keeps the weight of the
        # version its personal adapter was derived from, in the serving context beside that adapter
        # (`Device.served`); a new personal adapter is stored with weight 1 until its own weight arrives. The reply
        # says nothing, not even whether a weight applied here (that would say which version this device holds).
        device, cfg = _device(context, overrides)
        weights = _sent_blend(message)
        store, user = _store(device, cfg, context), str(device.user)
        mine = load_state(store, user).get("personal_from")
        if mine in weights and store.versions(user, PERSONAL) and store.versions(user, SERVING):
            device.use_serving_context(store.get_bytes(user, SERVING))
            if device.blend_weight != weights[mine]:  # sent again after every evaluation: write only a change
                device.blend_weight = weights[mine]
                store.put_bytes(user, SERVING, device.serving_context())
                LOG.info("serving blend weight %.3f stored for the personal adapter", weights[mine])
        return _reply(message, {})

    @app.query("assign")
    @_guarded
    def assign(message: Message, context: Context) -> Message:
        device, cfg = _device(context, overrides)
        k = _k(message, cfg)
        space = onboarding_space(cfg.dataset)
        onboarding = np.zeros((k, space.size), np.float32)
        counts = np.zeros(k, np.float32)
        if device.n_train >= cfg.cold_start_threshold:
            persona = nearest(_embedding(device, context, cfg), message.content["centroids"]["c"].numpy()) \
                if k > 1 else 0
            _state(context)["persona"] = persona
            onboarding[persona] = space.encode(device.onboarding())
            counts[persona] = 1
        if "secagg-round" in message.content["config"]:  # only the tables summed over every device leave masked
            return secure_aggregation.start_sums(message, context, [onboarding, counts])
        return _reply(message, {}, {"features": _array(onboarding), "counts": _array(counts)})

    @app.query("cold")
    @_guarded
    def cold(message: Message, context: Context) -> Message:
        device, cfg = _device(context, overrides)
        state = _state(context)
        if "data-path" in context.node_config:  # deployed: the owner opts in or out of evaluation
            # Evaluation replies are un-noised counts and error sums (docs/privacy.md: What leaves a device): a deployed
            # device sends them only when its owner held ratings out for it (`run --eval-holdout`).
            opted_in = int(context.node_config.get("evaluate", 1))
            in_eval = opted_in * int(len(device.test) > 0)  # needs a hold-out
        else:
            in_eval = int(device.user in _eval_sample(cfg.dataset, cfg.split, cfg.eval_users, cfg.eval_seed))
        # Under DP the cold-start flag stays here: un-noised, it would say this user has few ratings.
        flag = {} if _private_run(cfg) else {"cold": int(device.n_train < cfg.cold_start_threshold)}
        if device.n_train >= cfg.cold_start_threshold:
            _save_state(device, cfg, context, persona=int(state["persona"]))
            return _reply(message, {**flag, "persona": int(state["persona"]), "eval": in_eval})
        space = onboarding_space(cfg.dataset)
        tables = message.content["tables"]
        persona = cold_start_persona(space.encode(device.onboarding()), tables["features"].numpy(),
                                     tables["counts"].numpy(), space)
        state["persona"] = persona
        _save_state(device, cfg, context, persona=persona)
        return _reply(message, {**flag, "persona": persona, "eval": in_eval})

    def persona_update(message: Message, context: Context, claim: int | None):
        """(device, cfg, delta, metrics) from this round's training, or a skipped reply naming persona `claim`
        (None under secure aggregation: the device sends no persona id)."""
        device, cfg = _device(context, overrides)
        _with_item_stats(device, message)
        persona = from_record(message.content["arrays"])
        policy = TrainingPolicy.from_node_config(context.node_config)
        # A refusal's details (how many ratings, what epsilon) stay in the device's log; the reply says only which
        # kind of refusal it is.
        if (detail := policy.refusal(len(device.train_examples[1]))) is not None:
            LOG.info("round skipped: %s", detail)
            return _skipped(message, claim, POLICY)
        try:
            with phase("model: persona training"):
                trained, metrics = _train(device, cfg, context, persona, cfg.train(policy.steps(cfg.local_steps)),
                                          cfg.device_dp_enabled)
        except BudgetExhausted as e:  # the device keeps serving; it just stops contributing
            LOG.info("round skipped: %s", e)
            return _skipped(message, claim, BUDGET)
        except LedgerRolledBack as e:
            LOG.warning("round skipped, privacy ledger missing or rolled back: %s", e)
            return _skipped(message, claim, LEDGER_MISSING)
        delta = {k: trained[k] - persona[k] for k in persona}
        _save_state(device, cfg, context, contributed=int(message.content["config"]["server-round"]))
        _personal(device, cfg, context, persona)
        return device, cfg, delta, metrics

    @app.train()
    @_guarded
    def train(message: Message, context: Context) -> Message:
        persona_id = int(message.content["config"]["persona"])
        outcome = persona_update(message, context, persona_id)
        if isinstance(outcome, Message):
            return outcome
        device, cfg, delta, metrics = outcome
        if _private_run(cfg):
            # Under DP only the update leaves: no example count (uniform weights), no loss, no epsilon, and no speed
            # figures either (tokens per second follow how many non-empty records Poisson sampling drew).
            return _reply(message, {"num-examples": 1, "persona": persona_id}, to_record(delta))
        return _reply(message, {"num-examples": device.n_train, "persona": persona_id, **metrics}, to_record(delta))

    @app.train("secagg")
    @_guarded
    def train_secagg(message: Message, context: Context) -> Message:
        outcome = persona_update(message, context, None)
        if isinstance(outcome, Message):
            return outcome
        return secure_aggregation.start(message, context, outcome[2])

    @app.query("secagg_share")
    @_guarded
    def secagg_share(message: Message, context: Context) -> Message:
        return secure_aggregation.share(message, context)

    @app.query("secagg_mask")
    @_guarded
    def secagg_mask(message: Message, context: Context) -> Message:
        return secure_aggregation.mask(message, context)

    @app.query("secagg_unmask")
    @_guarded
    def secagg_unmask(message: Message, context: Context) -> Message:
        return secure_aggregation.unmask(message, context)

    def evaluation(message: Message, context: Context) -> tuple[dict, FederationConfig, Device]:
        device, cfg = _device(context, overrides)
        _with_item_stats(device, message)
        persona = from_record(message.content["arrays"])
        state = load_state(_store(device, cfg, context), str(device.user))
        personal = None
        if state.get("personal_from") == adapter_digest(persona):  # already derived from this version
            # with no fine-tuning the stored adapter is these very weights: no need to decrypt it
            personal = persona if cfg.personal_steps == 0 else _load_personal(device, cfg, context)
        # (with no fine-tuning `_personal` returns `persona` itself, which `evaluation_sums` scores once)
        personal = _personal(device, cfg, context, persona)[0] if personal is None else personal
        with phase("model: evaluation scoring"):
            sums = device.evaluation_sums({"persona": persona, "personal": personal})
        # The personal adapter trains without noise: under DP its distance from the persona stays on the device.
        distance = {} if _private_run(cfg) else \
            {"personal_distance": float(np.sqrt(sum(((personal[k] - persona[k]) ** 2).sum() for k in persona)))}
        return {
            "num-examples": device.n_train, "cold": int(device.n_train < cfg.cold_start_threshold), **sums,
            **distance,
            # the version the coordinator served, echoed so its metrics are pooled per version (canaries)
            **({"version": int(message.content["config"]["version"])} if "version" in message.content["config"]
               else {}),
        }, cfg, device

    @app.evaluate()
    @_guarded
    def evaluate(message: Message, context: Context) -> Message:
        return _reply(message, evaluation(message, context)[0])

    @app.evaluate("secagg")
    @_guarded
    def evaluate_secagg(message: Message, context: Context) -> Message:
        values, _, _ = evaluation(message, context)
        return secure_aggregation.start_evaluation(message, context, values)

    return app


app = build_app()
