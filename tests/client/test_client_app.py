"""The ClientApp's key and store wiring (the Flower messages themselves run in tests/simulations)."""

from types import SimpleNamespace

import pytest
import torch
from flwr.app import Context, RecordDict

from client.client_app import LEDGER, _device_dp, _ledger, _store
from client.keys import KEY_ENV, KeySourceError, RawKey
from client.store import EncryptedStore
from common.config import FederationConfig
from common.envelope import WrongKeyError
from common.privacy import BudgetExhausted, epsilon


def _context(node_config: dict) -> Context:
    return Context(run_id=1, node_id=1, node_config=node_config, state=RecordDict(), run_config={})


def test_simulated_device_key_lives_in_node_memory_and_shreds_leftovers(tmp_path, monkeypatch):
    monkeypatch.delenv(KEY_ENV, raising=False)
    cfg = FederationConfig(device_dir=str(tmp_path))
    device = SimpleNamespace(user=7)
    previous_run = _store(device, cfg, _context({"partition-id": 3}))
    previous_run.put_adapter("7", "personal", {"w": torch.ones(4)})

    context = _context({"partition-id": 3})
    store = _store(device, cfg, context)
    assert store.root == tmp_path / "node-0003"
    assert store.users() == []  # the earlier run's files were unreadable under this run's key: shredded
    store.put_adapter("7", "personal", {"w": torch.zeros(4)})
    again = _store(device, cfg, context)  # same node, later message: same key
    assert torch.equal(again.get_adapter("7", "personal")["w"], torch.zeros(4))
    with pytest.raises(WrongKeyError):
        EncryptedStore(store.root, RawKey.generate()).get_adapter("7", "personal")


def test_deployed_device_uses_its_store_path_and_key_file(tmp_path, monkeypatch):
    monkeypatch.delenv(KEY_ENV, raising=False)
    key = RawKey.generate()
    (tmp_path / "kek").write_text(key.raw.hex())
    node = {"store-path": str(tmp_path / "vault"), "store-key-file": str(tmp_path / "kek")}
    store = _store(SimpleNamespace(user=1), FederationConfig(), _context(node))
    assert store.root == tmp_path / "vault" and store.keys.key() == key.raw
    node["store-key-file"] = str(tmp_path / "missing")
    with pytest.raises(KeySourceError, match="not found"):
        _store(SimpleNamespace(user=1), FederationConfig(), _context(node))


def test_privacy_ledger_survives_a_restart_and_keeps_enforcing_the_budget(tmp_path, monkeypatch):
    monkeypatch.delenv(KEY_ENV, raising=False)
    key = RawKey.generate()
    (tmp_path / "kek").write_text(key.raw.hex())
    node = {"store-path": str(tmp_path / "vault"), "store-key-file": str(tmp_path / "kek")}
    cfg = FederationConfig(dp_device_noise=1.0, dp_device_budget=3.0)
    device = SimpleNamespace(user=5)

    ledger = _ledger(device, cfg, _context(node))
    assert ledger.history == [] and ledger.budget == 3.0
    ledger.record([(1.0, 0.25, 20)])
    _store(device, cfg, _context(node)).put_bytes("5", LEDGER, ledger.to_bytes())

    restarted = _ledger(device, cfg, _context(node))  # a new process: fresh context, same store and key
    assert restarted.history == [(1.0, 0.25, 20)] and restarted.spent == pytest.approx(ledger.spent)
    with pytest.raises(BudgetExhausted):
        restarted.check(1.0, 0.25, 400)
    assert b"0.25" not in next((tmp_path / "vault").rglob("v*.pfl")).read_bytes()  # stored encrypted


def test_device_target_epsilon_is_spread_over_a_participation_in_every_round():
    cfg = FederationConfig(dp_device_target_epsilon=3.0, num_rounds=5, local_steps=2, dp_device_budget=10.0)
    cfg = FederationConfig(dp_device_target_epsilon=3.0, num_rounds=5, local_steps=2, dp_device_budget=10.0,
                           dp_device_records=4)  # 4 records, 1 row per step: sample rate 0.25
    device = SimpleNamespace(user=1)
    dp = _device_dp(device, cfg)
    assert dp.budget == 10.0 and dp.max_grad_norm == cfg.dp_device_clip
    spent = epsilon([(dp.noise_multiplier, 0.25, 5 * 2)], cfg.dp_delta)
    assert 2.9 < spent <= 3.0
    assert _device_dp(device, FederationConfig(dp_device_noise=1.5)).budget == float("inf")  # 0 = no limit


def test_simulated_device_takes_the_long_term_memory_setting_from_the_run_config(ml100k_dir):
    from client.client_app import _device

    overrides = {"base-model": "tiny", "dataset": str(ml100k_dir), "split": "default", "memory-items": 2}
    device, cfg = _device(_context({"partition-id": 0}), overrides)
    assert cfg.memory_items == device.memory_items == 2
    assert "Similar movies they rated" in device.rt.tokenizer.decode(device.test_examples[0][0])


def test_a_simulated_device_is_rebuilt_per_message_from_its_own_rows_cut_once(ml100k_dir):
    """Every message rebuilds the device; its ratings are the user's own rows of the split (validation hold-out
    included) and are cut out of the whole split once per process, not per message."""
    import pandas as pd

    from client.client_app import _device
    from common.config import split_preset
    from common.data import load_movielens
    from common.split import temporal_split, validation_split

    overrides = {"base-model": "tiny", "dataset": str(ml100k_dir), "split": "default", "validation-fraction": 0.2}
    first, cfg = _device(_context({"partition-id": 3}), overrides)
    again, _ = _device(_context({"partition-id": 3}), overrides)
    other, _ = _device(_context({"partition-id": 4}), overrides)
    whole = temporal_split(load_movielens(cfg.dataset).ratings, split_preset(cfg.split))
    train, val = validation_split(whole.train[whole.train["user"] == first.user], 0.2)
    pd.testing.assert_frame_equal(first.train, train)
    pd.testing.assert_frame_equal(first.val, val)
    pd.testing.assert_frame_equal(first.test, whole.test[whole.test["user"] == first.user])
    assert len(val) > 0 and first is not again and first.train is again.train  # a new device over the same cut
    assert other.user != first.user and set(other.train["user"]) == {other.user}


# --- The ClientApp's handlers on real messages: what leaves the device, and what a refusal says --------------

import re

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message
from flwr.supercore.task_identity import TaskIdentity

import client.client_app as client_app
from client.client_app import build_app, owner_budget, to_record


@pytest.fixture
def handlers(ml100k_dir, tmp_path, monkeypatch):
    """A simulated device (tiny model, partition 0) and a function sending it one message as the coordinator would."""
    monkeypatch.delenv(KEY_ENV, raising=False)
    for attr, value in (("_task_id", 1), ("_run_id", 1), ("_node_id", 0)):
        monkeypatch.setattr(TaskIdentity, attr, value)
    base = {"base-model": "tiny", "dataset": str(ml100k_dir), "split": "default", "local-steps": 1,
            "personal-steps": 0, "device-dir": str(tmp_path / "devices")}
    context = _context({"partition-id": 0})

    def send(kind: str, settings: dict, content: dict | None = None, node: dict | None = None) -> Message:
        context.node_config.update(node or {})
        if kind == "train" and content is None:
            from client.device import runtime
            from common.adapters import adapter_arrays
            cfg = FederationConfig.from_run_config({**base, **settings})
            persona = adapter_arrays(runtime(cfg.base_model, cfg.lora).model)
            content = {"arrays": to_record(persona), "config": ConfigRecord({"persona": 0, "server-round": 1})}
        message = Message(content=RecordDict(content or {}), dst_node_id=1, message_type=kind)
        return build_app({**base, **settings})(message, context)
    send.dataset, send.base, send.context = str(ml100k_dir), base, context
    return send


def _reason(reply: Message) -> str:
    assert reply.content["metrics"]["skipped"] == 1
    return reply.content["status"]["reason"]


def test_skipped_replies_carry_a_category_never_numbers_or_the_owners_data(handlers):
    # out of budget: the old reason quoted the device's epsilon ("from 0.000 to 41.2")
    reason = _reason(handlers("train", {"dp-device-noise": 0.5, "dp-device-budget": 0.01}))
    assert reason == "budget"
    # the owner's policy: the old reason quoted how many ratings the owner has
    reason = _reason(handlers("train", {}, node={"min-ratings": 10_000}))
    assert reason == "policy" and not re.search(r"\d", reason)


def test_an_exception_leaves_the_device_as_a_category_not_its_text(handlers, monkeypatch):
    from client.local_data import LocalDataError

    def broken(context, overrides):
        raise LocalDataError("ratings.jsonl:4: cannot read '{\"item\": 50, \"rating\": \"my secret note\"}'")
    monkeypatch.setattr(client_app, "_device", broken)
    for kind in ("train", "evaluate", "query.embed", "query.assign", "query.cold"):
        reply = handlers(kind, {}, content={})
        assert reply.has_error() and reply.error.reason == "error", kind


def test_a_coordinator_cannot_train_a_budgeted_device_without_device_dp(handlers):
    """Device DP off (the coordinator's choice) would train non-privately: infinite epsilon, over any budget."""
    reply = handlers("train", {"dp-device-budget": 5.0})
    assert _reason(reply) == "budget" and "arrays" not in reply.content
    assert "num-examples" in reply.content["metrics"] and reply.content["metrics"]["num-examples"] == 1


def test_the_owner_sets_the_budget_and_the_coordinator_can_only_lower_it(tmp_path):
    deployed = _context({"data-path": str(tmp_path / "ratings.jsonl")})
    owner = {"dp_budget": 2.0}
    assert owner_budget(FederationConfig(), deployed, owner) == 2.0  # dp-device-budget = 0 lifts nothing
    assert owner_budget(FederationConfig(dp_device_budget=50.0), deployed, owner) == 2.0
    assert owner_budget(FederationConfig(dp_device_budget=1.0), deployed, owner) == 1.0
    assert owner_budget(FederationConfig(dp_device_budget=1.0), deployed, {}) == 1.0  # no owner limit set
    simulated = _context({"partition-id": 0})  # no owner: the run config stands in for one
    assert owner_budget(FederationConfig(dp_device_budget=3.0), simulated, owner) == 3.0


def test_deployed_ledger_is_held_to_the_owners_budget(tmp_path, monkeypatch):
    monkeypatch.delenv(KEY_ENV, raising=False)
    (tmp_path / "kek").write_text(RawKey.generate().raw.hex())
    node = {"data-path": str(tmp_path / "r.jsonl"), "store-path": str(tmp_path / "vault"),
            "store-key-file": str(tmp_path / "kek")}
    device, cfg = SimpleNamespace(user=4), FederationConfig(dp_device_noise=1.0)  # coordinator: budget 0
    _store(device, cfg, _context(node)).put_bytes("4", client_app.STATE, b'{"dp_budget": 2.5}')  # enrol
    assert _ledger(device, cfg, _context(node)).budget == 2.5


def test_a_deleted_or_rolled_back_ledger_stops_training(handlers, tmp_path):
    dp = {"dp-device-noise": 1.0, "dp-device-budget": 100.0}
    for _ in range(2):
        assert "arrays" in handlers("train", dp).content  # trained under DP, ledger versions 1 and 2
    ledgers = next((tmp_path / "devices").rglob(LEDGER))
    newest = sorted(ledgers.glob("v*.pfl"))[-1]
    newest.unlink()  # roll back to version 1: a lower spend, the budget handed out again
    assert _reason(handlers("train", dp)) == "ledger"
    for f in ledgers.glob("v*.pfl"):
        f.unlink()  # the whole ledger gone: a fresh ledger would start at epsilon 0
    assert _reason(handlers("train", dp)) == "ledger"


def test_under_dp_discovery_training_and_evaluation_replies_carry_no_unnoised_data_figures(handlers):
    private = {"dp-user-noise": 1.0, "cold-start-threshold": 10_000}  # partition 0 is a cold-start device
    k = ConfigRecord({"k": 2})
    embed = handlers("query.embed", private, {"config": k})
    assert "cold" not in embed.content["metrics"]
    from common.personas import onboarding_space
    size = onboarding_space(handlers.dataset).size
    assign = handlers("query.assign", private, {"config": k})
    assert "cold" not in assign.content["metrics"] and "persona" not in assign.content["metrics"]
    tables = ArrayRecord({"features": Array(np.ones((2, size), np.float32)), "counts": Array(np.full(2, 3.0, np.float32))})
    cold = handlers("query.cold", private, {"config": k, "tables": tables})
    assert "cold" not in cold.content["metrics"] and cold.content["metrics"]["persona"] in (0, 1)
    trained = handlers("train", {**private, "dp-device-noise": 1.0})
    assert set(trained.content["metrics"].keys()) == {"num-examples", "persona"}
    assert trained.content["metrics"]["num-examples"] == 1
    evaluated = handlers("evaluate", private, {"arrays": trained.content["arrays"],
                                                "config": ConfigRecord({"server-round": 1})})
    assert "personal_distance" not in evaluated.content["metrics"]


def test_the_personal_adapter_is_derived_afresh_from_each_new_persona_version(handlers, tmp_path):
    """FedAvg + local fine-tuning: a personal adapter continued from an old persona version would keep that version's
    weights and miss what the federation learnt since, so a new version is fine-tuned again; the same version is not."""
    from client.device import runtime
    from common.adapters import adapter_arrays

    settings = {"personal-steps": 2, "personal-lr": 1e-4}  # Adam moves each weight about 1e-4 a step
    cfg = FederationConfig.from_run_config({"base-model": "tiny"})
    first = adapter_arrays(runtime(cfg.base_model, cfg.lora).model)
    second = {k: v + np.float32(0.5) for k, v in first.items()}  # the next persona version, far from the first

    def send(kind: str, persona: dict) -> Message:
        return handlers(kind, settings, {"arrays": to_record(persona),
                                         "config": ConfigRecord({"persona": 0, "server-round": 1})})

    def personal_versions() -> list:
        return sorted(next((tmp_path / "devices").rglob(client_app.PERSONAL)).glob("v*"))

    def stored() -> dict:
        device, cfg_ = client_app._device(handlers.context, {**handlers.base, **settings})
        return client_app._load_personal(device, cfg_, handlers.context)

    assert "arrays" in send("train", first).content
    assert len(personal_versions()) == 1
    from_first = stored()
    assert any(np.abs(from_first[k] - first[k]).max() > 1e-5 for k in first)  # fine-tuned, not a copy
    send("evaluate", first)  # the version it was derived from: served as stored, not fine-tuned again
    assert len(personal_versions()) == 1
    send("evaluate", second)  # a new version: derived afresh from it
    assert len(personal_versions()) == 2
    from_second = stored()
    moved = sum(float(((from_second[k] - second[k]) ** 2).sum()) for k in first)
    stale = sum(float(((from_second[k] - from_first[k]) ** 2).sum()) for k in first)
    assert moved < stale  # closer to the new version than to the adapter derived from the old one
    send("evaluate", second)
    assert len(personal_versions()) == 2


def test_with_no_personal_steps_the_device_keeps_and_serves_the_persona_adapter_as_received(handlers, tmp_path):
    """personal-steps 0 (no fine-tuning): the device still stores the persona adapter it received as the one it
    serves (before, it stored nothing and its local API served the bare base model), and evaluation reports the
    same errors for both names."""
    from client.device import runtime
    from common.adapters import adapter_arrays

    cfg = FederationConfig.from_run_config({"base-model": "tiny"})
    persona = {k: v + np.float32(0.25) for k, v in adapter_arrays(runtime(cfg.base_model, cfg.lora).model).items()}
    content = {"arrays": to_record(persona), "config": ConfigRecord({"persona": 0, "server-round": 1})}
    assert "arrays" in handlers("train", {}, content).content
    device, cfg_ = client_app._device(handlers.context, handlers.base)
    stored = client_app._load_personal(device, cfg_, handlers.context)
    assert stored is not None and stored.keys() == persona.keys()
    for k in persona:
        np.testing.assert_array_equal(stored[k], persona[k])
    metrics = handlers("evaluate", {}, content).content["metrics"]
    assert metrics["persona_sse"] == metrics["personal_sse"] and metrics["persona_sse"] > 0


def test_enrol_budget_is_kept_in_the_encrypted_device_state_and_bounds_the_ledger(tmp_path, monkeypatch):
    from client.daemon import enrol, open_store, status

    monkeypatch.delenv(KEY_ENV, raising=False)
    (tmp_path / "r.jsonl").write_text('{"item": 1, "rating": 4}\n')
    settings = enrol(tmp_path / "home", tmp_path / "r.jsonl", user_id=3, age=30, gender="F", occupation="writer",
                     dp_budget=2.0)
    assert client_app.load_state(open_store(settings), "3") == {"dp_budget": 2.0}
    assert status(settings)["owner_budget"] == 2.0
    node = {"data-path": settings["data_path"], "store-path": settings["store_path"],
            "store-key-file": settings["key"]["path"]}
    ledger = _ledger(SimpleNamespace(user=3), FederationConfig(dp_device_noise=1.0, dp_device_budget=0.0),
                     _context(node))
    assert ledger.budget == 2.0  # the coordinator's 0 ("no limit") does not lift the owner's budget


def test_a_coordinator_cannot_make_a_deployed_device_replayable_or_weaken_its_delta(tmp_path, monkeypatch):
    monkeypatch.delenv(KEY_ENV, raising=False)
    (tmp_path / "kek").write_text(RawKey.generate().raw.hex())
    node = {"data-path": str(tmp_path / "r.jsonl"), "store-path": str(tmp_path / "vault"),
            "store-key-file": str(tmp_path / "kek")}
    cfg = FederationConfig(dp_device_noise=1.0, reproducible=True, seed=7, dp_delta=0.1)
    dp = client_app._device_dp(SimpleNamespace(user=4), cfg, _context(node))
    assert dp.seed is None and dp.secure_mode  # secret draws, secure-mode noise, whatever the run config says
    assert _ledger(SimpleNamespace(user=4), cfg, _context(node)).delta == 1e-5
    simulated = client_app._device_dp(SimpleNamespace(user=4), cfg, _context({"partition-id": 0}))
    assert simulated.seed == 7 and not simulated.secure_mode  # the simulations' labelled reproducible mode


def test_only_a_replayable_simulated_device_tells_its_partition(handlers, tmp_path):
    # The partition is a simulation artefact that orders seeded draws; nothing else, and never a deployed device's.
    assert dict(handlers("query.order", {"reproducible": True}, {}).content["metrics"]) == {"order": 0}
    assert dict(handlers("query.order", {"reproducible": False}, {}).content["metrics"]) == {}
    deployed = handlers("query.order", {"reproducible": True}, {}, node={"data-path": str(tmp_path / "r.jsonl")})
    assert dict(deployed.content["metrics"]) == {}


def test_item_statistics_answer_is_bounded_and_released_statistics_reach_every_prompt(handlers):
    from common.item_stats import ItemStats, sensitivity

    answer = handlers("query.itemstats", {}, {}).content["arrays"]
    sums, weights, volume = (answer[k].numpy().astype(np.float64) for k in ("sums", "weights", "volume"))
    assert np.count_nonzero(weights) > 0 and sums.shape == weights.shape and volume.shape == (1,)
    assert np.sqrt((sums ** 2).sum() + (weights ** 2).sum() + (volume ** 2).sum()) <= sensitivity(1.0) + 1e-6
    trained = handlers("train", {})
    n = len(weights)
    stats = ItemStats(np.linspace(1.5, 4.5, n), np.full(n, 30.0), 3.2)
    record = ArrayRecord({k: Array(v) for k, v in stats.to_arrays().items()})
    plain = {"arrays": trained.content["arrays"], "config": ConfigRecord({"server-round": 1})}
    without = handlers("evaluate", {}, plain).content["metrics"]
    quoted = handlers("evaluate", {}, {**plain, "item-stats": record}).content["metrics"]
    # the same adapter scores other prompts: the statistics are in them
    assert quoted["persona_sse"] != without["persona_sse"] and quoted["n"] == without["n"]
    from client.device import Device, runtime
    from client.client_app import _with_item_stats
    from common.data import load_movielens
    from common.config import LoraSettings
    data = load_movielens(handlers.dataset)
    device = Device(1, data, data.ratings[data.ratings["user"] == 1], data.ratings.iloc[:0], runtime("tiny", LoraSettings()))
    message = Message(content=RecordDict({"item-stats": record}), dst_node_id=1, message_type="train")
    text = device.rt.tokenizer.decode(_with_item_stats(device, message)._suffixes([2])[0])
    assert f"Other users rated it {stats.mean[1]:.1f}/5 on average (30 ratings)." in text


def _secagg_content() -> dict:
    from client.device import runtime
    from common.adapters import adapter_arrays
    from common.kslot import levels_for
    cfg = FederationConfig.from_run_config({"base-model": "tiny"})
    persona = adapter_arrays(runtime(cfg.base_model, cfg.lora).model)
    config = {"persona": 1, "server-round": 1, "secagg-round": 7, "secagg-threshold": 2,
              "secagg-levels": levels_for(3), "secagg-k": 2, "secagg-range": 0.1, "secagg-clip": 1.0,
              "secagg-scopes": ["all", "p0", "p1", "cold", "warm", "ratings_0_19", "ratings_20_49"]}
    return {"arrays": to_record(persona), "config": ConfigRecord(config)}


def test_under_secure_aggregation_training_and_evaluation_replies_carry_public_keys_only(handlers):
    reply = handlers("train.secagg", {}, _secagg_content())
    assert not reply.has_error()
    assert set(reply.content) == {"metrics", "secagg"} and len(reply.content["metrics"]) == 0  # no persona, no count
    keys = reply.content["secagg"]
    assert set(keys) == {"c", "s"} and all(isinstance(v, bytes) for v in keys.values())
    evaluated = handlers("evaluate.secagg", {}, _secagg_content())
    assert set(evaluated.content) == {"metrics", "secagg"} and len(evaluated.content["metrics"]) == 0
    # A skipped device names no persona either.
    skipped = handlers("train.secagg", {}, _secagg_content(), node={"min-ratings": 10_000})
    assert _reason(skipped) == "policy" and "persona" not in skipped.content["metrics"]
    # Protocol messages out of order or malformed are error replies with a category, not crashes or secrets.
    for kind, content in (("query.secagg_unmask", {"config": ConfigRecord({"round": 7})}),
                          ("query.secagg_share", {"config": ConfigRecord({"round": 7}),
                                                  "keys": ConfigRecord({"c/x": b"1"})})):
        out = handlers(kind, {}, content)
        assert out.has_error() and out.error.reason == "error", kind


def test_item_factor_answers_are_clipped_gradients_and_hostile_releases_get_an_error_category(handlers):
    from common.data import load_movielens
    from common.item_factors import ItemFactors, norm

    n_items = int(load_movielens(handlers.dataset).items.index.max())
    model = ItemFactors.initial(n_items, 4, seed=1)

    def ask(arrays: dict, reg=0.2, clip=50.0, prior=None) -> Message:
        penalty = {"item-factors-reg": reg, **({} if prior is None else {"item-factors-prior": prior})}
        content = {"item-factors": ArrayRecord({k: Array(np.asarray(v)) for k, v in arrays.items()}),
                   "config": ConfigRecord(penalty)}
        return handlers("query.itemfactors", {"item-stats": True, "item-factors-rounds": 1,
                                              "item-factors-clip": clip}, content)

    answer = ask(model.to_arrays()).content["arrays"]
    grads = {k: answer[k].numpy() for k in ("mu", "bias", "factors")}
    assert grads["factors"].shape == (n_items, 4) and np.count_nonzero(grads["bias"]) > 0
    assert norm(grads) > 0.5  # so the bound below binds
    # the coordinator's prior count reaches the device's user fit (an absent one is 0: older coordinators)
    assert np.array_equal(ask(model.to_arrays(), prior=0.0).content["arrays"]["factors"].numpy(), grads["factors"])
    assert not np.allclose(ask(model.to_arrays(), prior=50.0).content["arrays"]["factors"].numpy(), grads["factors"])
    clipped = ask(model.to_arrays(), clip=0.5).content["arrays"]
    assert norm({k: clipped[k].numpy() for k in grads}) <= 0.5 + 1e-5
    good = model.to_arrays()
    for hostile, reg in (({**good, "factors": np.full((n_items, 4), np.nan, np.float32)}, 0.2),
                         ({**good, "bias": np.zeros(n_items + 3, np.float32)}, 0.2),
                         ({k: v for k, v in good.items() if k != "mu"}, 0.2),
                         (good, float("inf")), (good, -1.0)):
        reply = ask(hostile, reg)
        assert reply.has_error() and reply.error.reason == "error"
    for prior in (float("nan"), float("inf"), -1.0, "many"):
        reply = ask(good, prior=prior)
        assert reply.has_error() and reply.error.reason == "error"


def test_a_devices_centre_answer_is_its_own_clipped_user_half_and_hostile_releases_get_an_error_category(handlers):
    """query.usercentre: the device fits its user half to the sent item half (with the coordinator's penalty) and
    answers that one bounded vector, nothing else; a malformed release is refused with the error category."""
    from common.data import load_movielens
    from common.item_factors import USER_HALF_BOUND, ItemFactors, fit_user

    n_items = int(load_movielens(handlers.dataset).items.index.max())
    model = ItemFactors.initial(n_items, 4, seed=2)

    def ask(arrays: dict, reg=0.2, prior=3.0) -> Message:
        content = {"item-factors": ArrayRecord({k: Array(np.asarray(v)) for k, v in arrays.items()}),
                   "config": ConfigRecord({"item-factors-reg": reg, "item-factors-prior": prior})}
        return handlers("query.usercentre", {"item-stats": True, "item-factors-rounds": 1}, content)

    reply = ask(model.to_arrays())
    assert set(reply.content["arrays"].keys()) == {"half"}
    half = reply.content["arrays"]["half"].numpy()
    assert half.shape == (5,) and np.linalg.norm(half) <= USER_HALF_BOUND + 1e-5 and np.abs(half).sum() > 0
    # the device's own fit: recomputed from the ratings the simulated device holds (partition 0)
    from client.client_app import _device
    device, _ = _device(handlers.context, {**handlers.base, "item-stats": True, "item-factors-rounds": 1})
    b, p = fit_user(device.train["item"].to_numpy(), device.train["rating"].to_numpy(),
                    ItemFactors.from_arrays(model.to_arrays()), 0.2, 3.0)
    whole = np.concatenate([[b], p])
    np.testing.assert_allclose(half, whole * min(1.0, USER_HALF_BOUND / np.linalg.norm(whole)), rtol=1e-5, atol=1e-6)
    good = model.to_arrays()
    for hostile, reg in (({**good, "factors": np.full((n_items, 4), np.inf, np.float32)}, 0.2),
                         ({**good, "centre": np.zeros(3, np.float32)}, 0.2),
                         ({k: v for k, v in good.items() if k != "bias"}, 0.2), (good, 0.0)):
        reply = ask(hostile, reg)
        assert reply.has_error() and reply.error.reason == "error"


def test_the_device_keeps_the_blend_weight_of_the_version_its_personal_adapter_came_from(handlers):
    """query.blend: weights named by version digest; only the one matching the adapter's version is kept, in the
    serving context; anything malformed is an error reply that changes nothing. The reply says nothing."""
    from hypothesis import given, settings, strategies as st

    from client.device import SERVING, read_serving_context
    from common.adapters import adapter_digest

    trained = handlers("train", {})  # personal-steps 0: the persona adapter received is stored as the personal one
    assert "arrays" in trained.content
    cfg = FederationConfig.from_run_config(handlers.base)
    store = _store(SimpleNamespace(user=0), cfg, handlers.context)
    (user,) = store.users()

    def weight() -> float:
        return read_serving_context(store.get_bytes(user, SERVING))[3]

    def send(config) -> Message:
        return handlers("query.blend", {}, {} if config is None else {"config": ConfigRecord(config)})

    mine = client_app.load_state(store, user)["personal_from"]
    other = "0" * 64
    assert weight() == 1.0
    reply = send({"digests": [other], "weights": [0.1]})
    assert not reply.has_error() and dict(reply.content["metrics"]) == {} and weight() == 1.0  # not its version
    reply = send({"digests": [other, mine], "weights": [0.9, 0.25]})
    assert not reply.has_error() and dict(reply.content["metrics"]) == {} and weight() == pytest.approx(0.25)

    digests = st.one_of(st.just(mine), st.text(max_size=70), st.just(mine.upper()), st.just(mine[:-1]))
    numbers = st.one_of(st.floats(), st.integers(-2**70, 2**70), st.booleans())

    @settings(max_examples=40, deadline=None)
    @given(config=st.one_of(
        st.none(),
        st.fixed_dictionaries({"digests": st.lists(digests, max_size=3), "weights": st.lists(numbers, max_size=3)}),
        st.fixed_dictionaries({"digests": digests, "weights": numbers}),
        st.fixed_dictionaries({"weights": st.lists(numbers, max_size=2)})))
    def hostile(config):
        try:
            record = None if config is None else ConfigRecord(config)
        except TypeError:  # a list of mixed types cannot even be put in a message
            return
        try:
            valid = client_app._sent_blend(Message(content=RecordDict({} if record is None else {"config": record}),
                                                   dst_node_id=1, message_type="query.blend"))
        except ValueError:
            valid = None
        before = store.versions(user, SERVING), weight()
        reply = send(config)
        if valid is None:
            assert reply.has_error() and reply.error.reason == "error"
            assert (store.versions(user, SERVING), weight()) == before  # nothing written
        else:
            assert not reply.has_error() and dict(reply.content["metrics"]) == {}
            assert weight() == pytest.approx(valid.get(mine, before[1]))

    hostile()
    assert send({"digests": [mine], "weights": [float("nan")]}).has_error()
    assert send({"digests": [mine], "weights": [1.5]}).has_error()
    assert send({"digests": [mine, other], "weights": [0.5]}).has_error()
