"""The device daemon: enrolment, status, forget, node config, and the local inference API on a live server."""

import json
import stat
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_ssh_private_key
from flwr.common.config import parse_config_args

from client.client_app import LEDGER, PERSONAL, STATE
from client.daemon import enrol, forget, load_settings, node_config, open_store, status, supernode_command
from client.local_api import create_local_app
from client.policy import TrainingPolicy
from common.adapters import adapter_arrays, add_lora
from common.config import LoraSettings
from common.model import load_base_model
from common.privacy import PrivacyLedger
from tests.conftest import make_data, write_grouplens_100k
from tests.server.test_admin_api import LiveServer


@pytest.fixture
def device_home(tmp_path):
    ratings, items, users = make_data(n_users=2, n_items=30, per_user=20, seed=6)
    catalogue = write_grouplens_100k(tmp_path / "catalogue", ratings, items, users)
    data = tmp_path / "my-ratings.jsonl"
    own = ratings[ratings["user"] == 1]
    data.write_text("".join(json.dumps({"item": int(r.item), "rating": int(r.rating), "ts": int(r.ts)}) + "\n"
                            for r in own.itertuples()))
    settings = enrol(tmp_path / "home", data, user_id=7, age=31, gender="F", occupation="writer",
                     base_model="tiny", catalogue=str(catalogue))
    return settings, tmp_path


def test_enrol_creates_identity_store_key_and_token_owner_only(device_home):
    settings, tmp = device_home
    home = Path(settings["home"])
    key = load_ssh_private_key((home / "supernode.key").read_bytes(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp384r1"
    assert (home / "supernode.key.pub").read_text().startswith("ecdsa-sha2-nistp384 ")
    for name in ("supernode.key", "store.key", "api.token"):
        assert stat.S_IMODE((home / name).stat().st_mode) == 0o600, name
    assert stat.S_IMODE(home.stat().st_mode) == 0o700
    with pytest.raises(SystemExit, match="already enrolled"):
        enrol(home, tmp / "my-ratings.jsonl", 7, 31, "F", "writer")
    assert load_settings(home)["user_id"] == 7


def test_node_config_round_trips_through_flowers_parser(device_home):
    settings, _ = device_home
    policy = {"train-window": "22:00-06:00", "max-steps": 3}
    parsed = parse_config_args([node_config(settings, policy)])
    assert parsed["data-path"] == settings["data_path"] and parsed["store-key-file"] == settings["key"]["path"]
    assert parsed["user-id"] == 7 and parsed["owner-gender"] == "F" and parsed["max-steps"] == 3
    assert TrainingPolicy.from_node_config(parsed).max_steps == 3
    cmd = supernode_command(settings, "127.0.0.1:9092", "/ca.pem", policy)
    assert cmd[cmd.index("--root-certificates") + 1] == "/ca.pem" and "--insecure" not in cmd


def test_status_reports_persona_versions_budget_and_last_round_then_forget_shreds(device_home):
    settings, _ = device_home
    store = open_store(settings)
    assert status(settings)["persona"] is None
    store.put_bytes("7", STATE, json.dumps({"persona": 2, "contributed": [3, 5]}).encode())
    ledger = PrivacyLedger(budget=8.0, delta=1e-5)
    ledger.record([(1.0, 0.1, 20)])
    store.put_bytes("7", LEDGER, ledger.to_bytes())
    store.put_adapter("7", PERSONAL, {"w": torch.ones(3)})
    s = status(settings)
    assert s["persona"] == 2 and s["last_round"] == 5 and s["personal_adapter_versions"] == [1]
    assert s["privacy"]["left"] == pytest.approx(8.0 - ledger.spent)
    report = forget(settings)
    assert report["user_key_destroyed"] and report["files_deleted"] >= 4
    assert status(settings)["persona"] is None and status(settings)["personal_adapter_versions"] == []


def _store_with_personal_adapter(settings: dict):
    """The device's store holding a personal adapter that moves ratings (random, non-zero LoRA B)."""
    store = open_store(settings)
    model = add_lora(load_base_model("tiny")[0], LoraSettings())
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    store.put_adapter("7", PERSONAL, {k: torch.from_numpy(v) for k, v in adapter_arrays(model).items()})
    return store


def test_local_api_scores_ranks_and_records_with_the_personal_adapter(device_home):
    settings, _ = device_home
    store = _store_with_personal_adapter(settings)
    server = LiveServer(create_local_app(settings, store, lambda: status(settings, store)))
    try:
        token = Path(settings["home"], "api.token").read_text()
        client = httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {token}"}, timeout=60)
        assert httpx.post(server.url + "/score", json={"movies": [1]}).status_code == 401
        scored = client.post("/score", json={"movies": [1, 2, 3, 4]}).json()["ratings"]
        assert len(scored) == 4 and all(1 <= r["rating"] <= 5 for r in scored)
        ranking = client.post("/rank", json={"movies": [1, 2, 3, 4], "top_k": 3}).json()["ranking"]
        assert [r["rating"] for r in ranking] == sorted((r["rating"] for r in scored), reverse=True)[:3]
        before = client.get("/status").json()
        assert before["personal_adapter_versions"] == [1]
        rated = {json.loads(line)["item"] for line in Path(settings["data_path"]).read_text().splitlines()}
        new_a, new_b = sorted(set(range(1, 31)) - rated)[:2]
        assert client.post("/ratings", json={"item": new_a, "rating": 5}).json()["ratings"] == len(rated) + 1
        assert client.post("/ratings", json={"item": new_b, "rating": 1}).json()["ratings"] == len(rated) + 2
        assert client.post("/ratings", json={"item": new_b, "rating": 2}).json()["ratings"] == len(rated) + 2  # re-rated
        assert client.post("/score", json={"movies": [999]}).status_code == 404
        assert client.post("/ratings", json={"item": 5, "rating": 9}).status_code == 422
    finally:
        server.stop()


def test_local_api_onnx_engine_agrees_with_torch_and_follows_new_ratings(device_home):
    settings, _ = device_home
    store = _store_with_personal_adapter(settings)
    token = Path(settings["home"], "api.token").read_text()
    servers = {engine: LiveServer(create_local_app(settings, store, lambda: status(settings, store), engine=engine))
               for engine in ("torch", "onnx")}
    try:
        clients = {e: httpx.Client(base_url=s.url, headers={"Authorization": f"Bearer {token}"}, timeout=60)
                   for e, s in servers.items()}

        def scores() -> dict[str, list[float]]:
            return {e: [r["rating"] for r in c.post("/score", json={"movies": [1, 2, 3, 4]}).json()["ratings"]]
                    for e, c in clients.items()}

        before = scores()
        assert np.allclose(before["torch"], before["onnx"], atol=1e-3)
        assert len(set(before["onnx"])) > 1  # a real adapter gives different ratings per movie
        rated = {json.loads(line)["item"] for line in Path(settings["data_path"]).read_text().splitlines()}
        new = sorted(set(range(1, 31)) - rated)[0]
        clients["onnx"].post("/ratings", json={"item": new, "rating": 1, "ts": 1})  # oldest: a training rating
        after = scores()  # the profile changed: the ONNX engine must not serve its cached prefix
        assert np.allclose(after["torch"], after["onnx"], atol=1e-3)
        assert not np.allclose(after["onnx"], before["onnx"], atol=1e-6)
    finally:
        for server in servers.values():
            server.stop()
    with pytest.raises(ValueError, match="engine"):
        create_local_app(settings, store, lambda: {}, engine="tflite")


def test_training_policy_refusals():
    from datetime import datetime

    policy = TrainingPolicy.from_node_config({"train-window": "22:00-06:00", "max-load": 0.5, "min-ratings": 5})
    assert "window" in policy.refusal(10, now=datetime(2026, 1, 1, 12, 0), load=0.0)
    assert policy.refusal(10, now=datetime(2026, 1, 1, 23, 0), load=0.0) is None
    assert policy.refusal(10, now=datetime(2026, 1, 1, 3, 0), load=0.0) is None  # wraps midnight
    assert "busy" in policy.refusal(10, now=datetime(2026, 1, 1, 23, 0), load=100.0)
    assert "training ratings" in policy.refusal(2, now=datetime(2026, 1, 1, 23, 0), load=0.0)
    with pytest.raises(ValueError, match="train-window"):
        TrainingPolicy.from_node_config({"train-window": "late"})
