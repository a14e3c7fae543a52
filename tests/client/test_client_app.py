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
