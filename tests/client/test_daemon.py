"""The device daemon: enrolment, status, forget, node config, and the local inference API on a live server."""

import contextlib
import json
import math
import shutil
import stat
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_ssh_private_key
from flwr.app import Context, RecordDict
from flwr.common.config import parse_config_args
from hypothesis import HealthCheck, given, settings as hsettings, strategies as st

from client.client_app import LEDGER, PERSONAL, STATE, _device
from client.daemon import enrol, forget, load_settings, node_config, open_store, status, supernode_command
from client.keys import KeySourceError, RawKey
from client.local_api import create_local_app
from client.local_data import split_own
from client.store import EncryptedStore
from common.envelope import EnvelopeError
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
    assert parsed["user-id"] == 7 and parsed["max-steps"] == 3
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
    assert s["serving_blend_weight"] is None  # no serving context stored beside the adapter yet
    import io
    buf = io.BytesIO()
    np.savez(buf, residual=np.array([False]), blend_weight=np.array([0.4]))
    store.put_bytes("7", "serving-context", buf.getvalue())
    assert status(settings)["serving_blend_weight"] == pytest.approx(0.4)
    report = forget(settings)
    assert report["store"]["user_key_destroyed"] and report["store"]["files_deleted"] >= 4
    assert not Path(settings["store_path"]).exists() and report["home_removed"]


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


def _local_api(settings, store, **headers) -> tuple[LiveServer, httpx.Client]:
    """The owner's local API served for real on loopback, and a client holding the owner's token."""
    server = LiveServer(create_local_app(settings, store, lambda: status(settings, store)))
    token = Path(settings["home"], "api.token").read_text()
    return server, httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {token}", **headers},
                                timeout=60)


def test_local_api_scores_ranks_and_records_with_the_personal_adapter(device_home):
    settings, _ = device_home
    store = _store_with_personal_adapter(settings)
    server, client = _local_api(settings, store)
    try:
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


@contextlib.contextmanager
def _both_engines(settings, store):
    """The local API served by torch and by ONNX Runtime on loopback; yields (clients, scores of movies 1-4)."""
    token = Path(settings["home"], "api.token").read_text()
    servers = {engine: LiveServer(create_local_app(settings, store, lambda: status(settings, store), engine=engine))
               for engine in ("torch", "onnx")}
    try:
        clients = {e: httpx.Client(base_url=s.url, headers={"Authorization": f"Bearer {token}"}, timeout=60)
                   for e, s in servers.items()}

        def scores() -> dict[str, list[float]]:
            return {e: [r["rating"] for r in c.post("/score", json={"movies": [1, 2, 3, 4]}).json()["ratings"]]
                    for e, c in clients.items()}

        yield clients, scores
    finally:
        for server in servers.values():
            server.stop()


def test_local_api_onnx_engine_agrees_with_torch_and_follows_new_ratings(device_home):
    settings, _ = device_home
    store = _store_with_personal_adapter(settings)
    with _both_engines(settings, store) as (clients, scores):
        before = scores()
        assert np.allclose(before["torch"], before["onnx"], atol=1e-3)
        assert len(set(before["onnx"])) > 1  # a real adapter gives different ratings per movie
        rated = {json.loads(line)["item"] for line in Path(settings["data_path"]).read_text().splitlines()}
        new = sorted(set(range(1, 31)) - rated)[0]
        clients["onnx"].post("/ratings", json={"item": new, "rating": 1, "ts": 1})  # oldest: a training rating
        after = scores()  # the profile changed: the ONNX engine must not serve its cached prefix
        assert np.allclose(after["torch"], after["onnx"], atol=1e-3)
        assert not np.allclose(after["onnx"], before["onnx"], atol=1e-6)
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


# --- issue #15: the device daemon ------------------------------------------------------------------------------------

def _keys_in(root: Path, skip: Path) -> list[RawKey]:
    """Every file under `root` (but `skip`) read as a store key, as `store.key` is read (hex/base64 text or raw)."""
    found = []
    for p in root.rglob("*"):
        if not p.is_file() or skip in p.parents:
            continue
        data = p.read_bytes()
        candidates = [data] if len(data) == 32 else []
        try:
            candidates.append(RawKey.parse(data.decode()).raw)
        except (UnicodeDecodeError, KeySourceError):
            pass
        found += [RawKey(c) for c in candidates]
    return found


def test_forget_leaves_nothing_that_opens_an_earlier_copy_of_the_store_or_names_the_owner(device_home):
    settings, tmp = device_home
    home = Path(settings["home"])
    _store_with_personal_adapter(settings)
    copy = tmp / "backup-of-store"
    shutil.copytree(settings["store_path"], copy)  # a backup / snapshot taken before forget
    original = open_store(settings).get_bytes("7", PERSONAL)
    assert EncryptedStore(copy, RawKey.from_file(home / "store.key")).get_bytes("7", PERSONAL) == original

    report = forget(settings)
    for key in _keys_in(tmp, skip=copy):  # no file left anywhere opens the earlier copy
        with pytest.raises(EnvelopeError):
            EncryptedStore(copy, key).get_bytes("7", PERSONAL)
    assert report["store"]["user_key_destroyed"]
    assert any("interactions file" in n for n in report["not_erased"])  # says what it could not erase
    # Nothing identifying the owner (answers, device identity, API token) is left in the home.
    for name in ("store.key", "device.json", "api.token", "supernode.key", "supernode.key.pub"):
        assert not (home / name).exists(), name
    assert not home.exists() or not any(b"writer" in p.read_bytes() for p in home.rglob("*") if p.is_file())


def test_enrol_into_an_existing_directory_makes_it_and_every_file_owner_only(tmp_path):
    home = tmp_path / "existing"
    home.mkdir(mode=0o755)
    home.chmod(0o755)
    data = tmp_path / "r.jsonl"
    data.write_text('{"item": 1, "rating": 4, "ts": 1}\n')
    enrol(home, data, 1, 40, "M", "engineer", base_model="tiny")
    assert stat.S_IMODE(home.stat().st_mode) == 0o700
    for p in home.iterdir():
        assert stat.S_IMODE(p.stat().st_mode) == 0o600, p.name


def test_sign_up_answers_are_not_on_the_supernode_command_line_and_the_client_app_reads_them(device_home):
    settings, _ = device_home
    answers = {"age": 31, "gender": "F", "occupation": "writer"}
    cmd = supernode_command(settings, "127.0.0.1:9092", "/ca.pem", {"max-steps": 2})
    node = parse_config_args([cmd[cmd.index("--node-config") + 1]])
    assert not any(k.startswith("owner-") and k != "owner-file" for k in node), node
    assert not set(map(str, answers.values())) & {str(v) for v in node.values()}
    assert "writer" not in " ".join(cmd)
    owner_file = Path(node["owner-file"])
    assert stat.S_IMODE(owner_file.stat().st_mode) == 0o600
    context = Context(run_id=1, node_id=1, node_config=node, state=RecordDict(),
                      run_config={"base-model": "tiny", "dataset": settings["catalogue"]})
    device, _ = _device(context, {})
    onboarding = device.data.users.loc[7]
    assert (int(onboarding["age"]), onboarding["gender"], onboarding["occupation"]) == (31, "F", "writer")
    # The owner's newest rating trains (no paper split on a device) unless a hold-out is asked for.
    newest = device.data.ratings.sort_values("ts").iloc[-1]["item"]
    assert len(device.test) == 0 and newest in set(device.train["item"])
    held = _device(Context(run_id=1, node_id=1, node_config={**node, "eval-holdout": 0.25}, state=RecordDict(),
                           run_config=context.run_config), {})[0]
    assert newest in set(held.test["item"]) and len(held.train) + len(held.test) == len(device.train)
    # With the run's validation-fraction an owner who opted into evaluation also holds their latest training ratings
    # out as validation (the blend weight they will be served at is fitted on them); one who opted out keeps all
    def deployed(**extra):
        config = {**node, "eval-holdout": 0.25, **extra}
        return _device(Context(run_id=1, node_id=1, node_config=config, state=RecordDict(),
                               run_config={**context.run_config, "validation-fraction": 0.2}), {})[0]
    validated = deployed()
    assert len(validated.val) >= 1 and validated.can_blend is False  # no released statistics yet
    assert len(validated.train) + len(validated.val) == len(held.train)
    assert validated.val["ts"].min() >= validated.train["ts"].max() and validated.test.equals(held.test)
    assert deployed(evaluate=0).val is None and len(deployed(evaluate=0).train) == len(held.train)


@hsettings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 50), st.integers(0, 5)), min_size=0, max_size=30),
       st.sampled_from([0.0, 0.0, 0.1, 0.4, 0.9]))
def test_split_own_trains_on_every_rating_unless_a_holdout_is_asked(rows, holdout):
    import pandas as pd

    ratings = pd.DataFrame([(0, i, 3.0, ts) for i, ts in rows], columns=["user", "item", "rating", "ts"])
    train, test = split_own(ratings, holdout)
    assert len(train) + len(test) == len(ratings)
    if holdout == 0 or len(ratings) < 2:
        assert len(test) == 0
    else:
        assert len(train) >= 1 and len(test) >= 1 and train["ts"].max() <= test["ts"].min()


_NON_FINITE = st.sampled_from([math.nan, math.inf, -math.inf])
# Every field of every local API request, and where a non-finite number can go in it.
_REQUESTS = {
    "/score": ({"movies": [1, 2]}, {"movies": "item"}),
    "/rank": ({"movies": [1, 2], "top_k": 2}, {"movies": "item", "top_k": "value"}),
    "/ratings": ({"item": 3, "rating": 4, "ts": 5}, {"item": "value", "rating": "value", "ts": "value"}),
}


def test_local_api_answers_422_to_non_finite_numbers_in_any_field(device_home):
    settings, _ = device_home
    store = open_store(settings)
    server, client = _local_api(settings, store, **{"Content-Type": "application/json"})
    before = Path(settings["data_path"]).read_bytes()

    @hsettings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
    @given(st.sampled_from(sorted(_REQUESTS)), st.data(), _NON_FINITE)
    def check(path, data, bad):
        body, fields = _REQUESTS[path]
        field = data.draw(st.sampled_from(sorted(fields)))
        body = dict(body)
        if fields[field] == "item":
            movies = list(body[field])
            movies[data.draw(st.integers(0, len(movies) - 1))] = bad
            body[field] = movies
        else:
            body[field] = bad
        response = client.post(path, content=json.dumps(body))  # json.dumps writes NaN / Infinity, as JS may
        assert response.status_code == 422, (path, body, response.text)
        detail = response.json()["detail"]
        assert detail and all(field in map(str, d["loc"]) for d in detail)
        assert "NaN" not in response.text and "Infinity" not in response.text

    try:
        check()
        assert Path(settings["data_path"]).read_bytes() == before  # nothing recorded
    finally:
        server.stop()


def test_a_rating_posted_now_reaches_the_serving_profile(device_home):
    settings, _ = device_home
    store = _store_with_personal_adapter(settings)
    server, client = _local_api(settings, store)
    try:
        before = [r["rating"] for r in client.post("/score", json={"movies": [1, 2, 3]}).json()["ratings"]]
        rated = {json.loads(line)["item"] for line in Path(settings["data_path"]).read_text().splitlines()}
        new = sorted(set(range(1, 31)) - rated)[0]
        assert client.post("/ratings", json={"item": new, "rating": 1}).status_code == 200  # stamped now: the newest
        after = [r["rating"] for r in client.post("/score", json={"movies": [1, 2, 3]}).json()["ratings"]]
        assert not np.allclose(before, after, atol=1e-6)
    finally:
        server.stop()


def test_local_api_serves_a_residual_adapter_against_the_context_it_was_trained_with(device_home):
    """The client app stores the released statistics and the residual flag beside the personal adapter; both
    engines then score as the device's own evaluation does: statistics in the prompts, the bias model's prior."""
    from client.device import SERVING, Device, runtime
    from client.local_data import Owner, device_data
    from common.config import FederationConfig
    from common.item_stats import ItemStats

    settings, _ = device_home
    store = _store_with_personal_adapter(settings)
    with _both_engines(settings, store) as (_, scores):
        plain = scores()
        # the device the local API builds from the enrolment, and everything it scores with but the adapter
        owner = Owner(settings["user_id"], settings["age"], settings["gender"], settings["occupation"])
        data = device_data(Path(settings["data_path"]), settings["catalogue"], owner)
        context = Device(owner.user, data, *split_own(data.ratings),
                         runtime(settings["base_model"], FederationConfig().lora))
        rng = np.random.default_rng(3)
        context.use_item_stats(ItemStats(rng.uniform(1.5, 4.8, 30), rng.integers(1, 40, 30).astype(float), 3.3))
        context.residual = True
        store.put_bytes("7", SERVING, context.serving_context())
        served = scores()
        arrays = {k: v.numpy() for k, v in store.get_adapter("7", PERSONAL).items()}
        context.test = context.data.ratings.iloc[:0].assign(item=[1, 2, 3, 4])  # the four movies, as "held out"
        want = context.predict(arrays)
        for engine in ("torch", "onnx"):
            np.testing.assert_allclose(served[engine], want, atol=2e-3)
            assert not np.allclose(served[engine], plain[engine], atol=1e-3)
        # the blend weight the coordinator fitted for this adapter: both engines serve b + w (adapter - b)
        base = context.bias_of(np.array([1, 2, 3, 4]))
        for w in (0.0, 0.25):
            context.blend_weight = w
            store.put_bytes("7", SERVING, context.serving_context())
            blended = scores()
            for engine in ("torch", "onnx"):
                np.testing.assert_allclose(blended[engine], base + w * (want - base), atol=2e-3)
