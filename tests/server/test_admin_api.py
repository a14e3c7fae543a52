"""The admin API against a real uvicorn server on loopback, over a real SQLite registry file."""

import json
import shutil
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
import uvicorn

from common.config import LoraSettings
from server.admin_api import create_app
from server.auth import TokenConfigError, TokenStore
from server.registry import PersonaRegistry, versions
from server.rollouts import Rollouts, bucket
from tests.server.postgres import postgres_server, postgres_url  # noqa: F401 (fixtures)

TOKENS = {"reader": "r" * 24, "operator": "o" * 24, "root": "a" * 24}


class LiveServer:
    def __init__(self, app):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        deadline = time.time() + 20
        while not self.server.started and time.time() < deadline:
            time.sleep(0.02)
        assert self.server.started

    def stop(self):
        self.server.should_exit = True
        self.thread.join(10)


def _tokens() -> TokenStore:
    return TokenStore([("reader", TOKENS["reader"], ["read"]), ("operator", TOKENS["operator"], ["read", "rollout"]),
                       ("root", TOKENS["root"], ["admin"])])


def _registry(root, url: str | None = None) -> PersonaRegistry:
    return PersonaRegistry(root, url=url, lora=LoraSettings(rank=2, targets=("q_proj",)), base_model="tiny")


def _arrays(value: float) -> dict:
    return {"m.q_proj.lora_A.weight": np.full((2, 4), value, np.float32),
            "m.q_proj.lora_B.weight": np.full((4, 2), value, np.float32)}


@pytest.fixture(params=["sqlite", "postgresql"])
def live(request, tmp_path):
    """Two personas, each with a stable version 0 and two candidates; a live server over them. Every test runs on
    SQLite (the default) and on a real PostgreSQL (skipped, with the reason, where one cannot be started)."""
    url = request.getfixturevalue("postgres_url") if request.param == "postgresql" else None
    registry = _registry(tmp_path, url)
    rollouts = Rollouts(registry)
    for persona in (0, 1):
        v0 = registry.add_version(persona, 0, _arrays(0.0), 0)
        rollouts.make_stable(persona, v0, "test")
        registry.add_version(persona, 1, _arrays(1.0), 3, {"train_loss": 1.2}, parent=v0)
        registry.add_version(persona, 2, _arrays(2.0), 4, parent=v0 + 1)
    server = LiveServer(create_app(registry, _tokens()))
    yield server, registry, tmp_path
    server.stop()


def _client(server, who: str | None = None) -> httpx.Client:
    headers = {"Authorization": f"Bearer {TOKENS[who]}"} if who else {}
    return httpx.Client(base_url=server.url, headers=headers, timeout=30)


def _candidate(registry, persona) -> int:
    return next(v["id"] for v in registry.versions(persona)[0] if v["state"] == "candidate")


ENDPOINTS = [  # method, path, body, scope
    ("GET", "/personas", None, "read"),
    ("GET", "/personas/0", None, "read"),
    ("GET", "/personas/0/evaluations", None, "read"),
    ("GET", "/versions", None, "read"),
    ("GET", "/versions/1", None, "read"),
    ("GET", "/versions/1/manifest", None, "read"),
    ("GET", "/versions/1/download", None, "read"),
    ("POST", "/personas/0/canary", {"version": 2, "percent": 20}, "rollout"),
    ("POST", "/personas/0/pause", {}, "rollout"),
    ("POST", "/personas/0/resume", {}, "rollout"),
    ("POST", "/personas/0/promote", {}, "rollout"),
    ("POST", "/personas/0/rollback", {}, "rollout"),
    ("POST", "/personas/1/stable", {"version": 5}, "admin"),
    ("GET", "/events", None, "read"),
]
HOLDERS = {"read": ["reader", "operator", "root"], "rollout": ["operator", "root"], "admin": ["root"]}


def test_auth_matrix_for_every_endpoint(live):
    server, _, _ = live
    assert _client(server).get("/health").status_code == 200  # the only open endpoint
    for method, path, body, scope in ENDPOINTS:
        assert _client(server).request(method, path, json=body).status_code == 401, path
        wrong = httpx.request(method, server.url + path, json=body, headers={"Authorization": "Bearer " + "x" * 24})
        assert wrong.status_code == 401, path
        for who in set(TOKENS) - set(HOLDERS[scope]):
            assert _client(server, who).request(method, path, json=body).status_code == 403, (path, who)
        # The endpoints above run in order as a scenario: each allowed call succeeds.
        response = _client(server, HOLDERS[scope][-1]).request(method, path, json=body)
        assert response.status_code == 200, (path, response.text)


def test_canary_promote_rollback_and_audit(live):
    server, registry, _ = live
    ops, root = _client(server, "operator"), _client(server, "root")
    candidate = _candidate(registry, 0)
    r = ops.post("/personas/0/canary", json={"version": candidate, "percent": 25, "reason": "try round 1"})
    assert r.status_code == 200 and r.json()["canary"] == candidate and r.json()["percent"] == 25
    assert ops.post("/personas/0/canary", json={"version": candidate + 1, "percent": 5}).status_code == 409
    stable_before = r.json()["stable"]
    r = ops.post("/personas/0/promote", json={"reason": "looks good"})
    assert r.json()["stable"] == candidate and r.json()["canary"] is None
    assert r.json()["previous_stable"] == stable_before
    r = ops.post("/personas/0/rollback", json={"reason": "users complained"})
    assert r.json()["stable"] == stable_before
    assert ops.post("/personas/0/rollback", json={}).status_code == 409  # nothing left to roll back to
    events = root.get("/events", params={"persona": 0}).json()
    assert [e["action"] for e in events["items"]] == ["stable", "canary", "promote", "rollback"]
    assert events["items"][1]["actor"] == "operator" and events["items"][1]["reason"] == "try round 1"
    assert ops.get(f"/versions/{candidate}").json()["state"] == "retired"
    archive = ops.get(f"/versions/{candidate}/download")
    assert archive.headers["content-type"] == "application/gzip" and len(archive.content) > 100


def test_canary_buckets_are_stable_and_near_the_percentage(live):
    _, registry, _ = live
    rollouts = Rollouts(registry)
    candidate = _candidate(registry, 1)
    rollouts.start_canary(1, candidate, 30, "test")
    served = [rollouts.assign(device, 1) for device in range(3000)]
    share = np.mean([v == candidate for v in served])
    assert 0.27 < share < 0.33
    assert served == [rollouts.assign(device, 1) for device in range(3000)]  # a device stays in its bucket
    assert all(rollouts.assign(d, 1) == candidate for d in range(3000) if bucket(d, 1) < 30)
    rollouts.pause(1, "test")
    assert {rollouts.assign(d, 1) for d in range(200)} == {registry.rollout(1)["stable"]}


def test_auto_rollback_when_the_canary_is_worse(live):
    _, registry, _ = live
    rollouts = Rollouts(registry)
    candidate, stable = _candidate(registry, 0), registry.rollout(0)["stable"]
    rollouts.start_canary(0, candidate, 50, "test")
    rollouts.record_evaluation(stable, sse=1.0 * 100, sae=80, n=100, devices=6)
    rollouts.record_evaluation(candidate, sse=1.1 * 100, sae=85, n=100, devices=4)
    assert not rollouts.check_canary(0, margin=0.05, min_devices=5)  # too few canary devices yet
    rollouts.record_evaluation(candidate, sse=1.2 * 100, sae=90, n=100, devices=2)  # canary RMSE ~1.072 vs 1.0
    assert rollouts.check_canary(0, margin=0.05, min_devices=5)
    r = registry.rollout(0)
    assert r["canary"] is None and r["stable"] == stable
    event = rollouts.events(0)[0][-1]
    assert event["actor"] == "auto-rollback" and event["detail"]["canary_devices"] == 6


def test_evaluation_history_keeps_each_pooled_evaluation_with_the_state_it_was_recorded_in(live):
    server, registry, _ = live
    rollouts, reader = Rollouts(registry), _client(server, "reader")
    candidate, stable = _candidate(registry, 0), registry.rollout(0)["stable"]
    rollouts.start_canary(0, candidate, 20, "test")
    rollouts.record_evaluation(stable, sse=100.0, sae=80, n=100, devices=6)
    rollouts.record_evaluation(candidate, sse=2 * 128.0, sae=100, n=128, devices=5)
    rollouts.promote(0, "test")
    rollouts.record_evaluation(candidate, sse=0.81 * 50, sae=40, n=50, devices=7)
    page = reader.get("/personas/0/evaluations").json()
    assert page["total"] == 3
    assert [(p["version"], p["state"], p["devices"]) for p in page["items"]] == [
        (stable, "stable", 6), (candidate, "canary", 5), (candidate, "stable", 7)]
    # Each point is that evaluation's own error, not the version's running total (which /personas/0 gives).
    assert [p["rmse"] for p in page["items"]] == pytest.approx([1.0, 2 ** 0.5, 0.9])
    assert page["items"][0]["at"] <= page["items"][1]["at"] <= page["items"][2]["at"]
    assert reader.get("/personas/0").json()["stable_metrics"]["rmse"] == pytest.approx(((256 + 40.5) / 178) ** 0.5)
    newest = reader.get("/personas/0/evaluations", params={"limit": 1, "offset": 2}).json()["items"]
    assert [p["rmse"] for p in newest] == pytest.approx([0.9])
    assert reader.get("/personas/1/evaluations").json() == {"items": [], "total": 0, "limit": 50, "offset": 0}
    assert reader.get("/personas/7/evaluations").status_code == 404


def test_fifty_concurrent_rollout_requests_leave_a_consistent_state(live):
    server, registry, _ = live
    candidates = [v["id"] for v in registry.versions(0)[0] if v["state"] == "candidate"]
    actions = [("canary", {"version": candidates[i % 2], "percent": 10 + i}) if i % 3 == 0 else
               ("promote", {}) if i % 3 == 1 else ("rollback", {}) for i in range(50)]

    def call(action):
        with _client(server, "operator") as c:
            return c.post(f"/personas/0/{action[0]}", json=action[1]).status_code

    with ThreadPoolExecutor(16) as pool:
        codes = list(pool.map(call, actions))
    assert set(codes) <= {200, 409}
    r = registry.rollout(0)
    states = {v["id"]: v["state"] for v in registry.versions(0)[0]}
    assert [v for v, s in states.items() if s == "stable"] == [r["stable"]]
    assert [v for v, s in states.items() if s == "canary"] == ([r["canary"]] if r["canary"] else [])
    events = Rollouts(registry).events(0)[0]
    assert len(events) == 1 + codes.count(200)  # the initial 'stable' plus one per successful request


def test_restart_keeps_everything(live):
    server, registry, root = live
    ops = _client(server, "operator")
    candidate = _candidate(registry, 1)
    ops.post("/personas/1/canary", json={"version": candidate, "percent": 40})
    before = ops.get("/personas/1").json()
    server.stop()
    again = LiveServer(create_app(_registry(root, registry.engine.url.render_as_string(hide_password=False)),
                                  _tokens()))
    try:
        assert _client(again, "operator").get("/personas/1").json() == before
        assert _client(again, "root").get("/events").json()["total"] == 3
    finally:
        again.stop()


def test_bad_requests_get_clear_4xx(live):
    server, registry, _ = live
    ops = _client(server, "operator")
    assert ops.get("/personas/9").json() == {"detail": "unknown persona 9"}
    assert ops.get("/versions/999").status_code == 404
    r = ops.post("/personas/0/canary", json={"version": _candidate(registry, 0), "percent": 150})
    assert r.status_code == 422 and "percent" in r.text
    r = ops.post("/personas/0/canary", content=b"{not json", headers={"Content-Type": "application/json"})
    assert r.status_code == 422 and "JSON" in r.text
    r = ops.post("/personas/0/canary", json={"version": _candidate(registry, 1), "percent": 10})
    assert r.status_code == 409 and "belongs to persona 1" in r.text
    assert ops.post("/personas/0/promote", json={"reason": "x", "extra": 1}).status_code == 422
    r = ops.post("/personas/0/canary", json={"version": _candidate(registry, 0), "percent": 10, "reason": "a\x00b"})
    assert r.status_code == 422  # PostgreSQL cannot store a NUL in text: refused on every backend
    assert ops.get("/versions", params={"limit": 0}).status_code == 422
    page = ops.get("/versions", params={"limit": 2, "offset": 1}).json()
    assert page["total"] == 6 and [v["id"] for v in page["items"]] == [2, 3]
    assert registry.rollout(0)["canary"] is None  # nothing changed by the bad requests


def test_token_configuration_errors(tmp_path, monkeypatch):
    with pytest.raises(TokenConfigError, match="unknown scopes"):
        TokenStore([("x", "y" * 20, ["write"])])
    with pytest.raises(TokenConfigError, match="shorter"):
        TokenStore([("x", "short", ["read"])])
    monkeypatch.setenv("PERSONAFL_ADMIN_TOKENS", f"ops:{'t' * 20}:read+rollout")
    assert TokenStore.from_env().authenticate("t" * 20).scopes == {"read", "rollout"}
    (tmp_path / "t.json").write_text("{broken")
    with pytest.raises(TokenConfigError, match="malformed"):
        TokenStore.from_file(tmp_path / "t.json")


def test_setting_the_current_stable_again_is_refused_and_rollback_still_works(live):
    """Old: POST /stable {current stable} made it its own previous stable; rollback then answered 200 and kept it."""
    server, registry, _ = live
    ops, root = _client(server, "operator"), _client(server, "root")
    first, candidate = registry.rollout(0)["stable"], _candidate(registry, 0)
    assert ops.post("/personas/0/canary", json={"version": candidate, "percent": 10}).status_code == 200
    assert ops.post("/personas/0/promote", json={}).json()["stable"] == candidate
    r = root.post("/personas/0/stable", json={"version": candidate})
    assert r.status_code == 409 and "already" in r.json()["detail"]
    assert registry.rollout(0)["previous_stable"] == first
    r = ops.post("/personas/0/rollback", json={})
    assert r.status_code == 200 and r.json()["stable"] == first


def test_a_missing_payload_directory_is_404_on_download(live):
    server, registry, root = live
    ops = _client(server, "operator")
    shutil.rmtree(registry.root / registry.version(2)["path"])
    assert ops.get("/versions/2/manifest").status_code == 200  # the row is still there
    r = ops.get("/versions/2/download")
    assert r.status_code == 404 and "missing" in r.json()["detail"]


def test_non_finite_metrics_in_a_manifest_are_served_as_null(live):
    server, registry, _ = live
    version = registry.add_version(1, 3, _arrays(3.0), 2, {"train_loss": float("nan"), "grad": float("inf")})
    r = _client(server, "reader").get(f"/versions/{version}/manifest")
    assert r.status_code == 200 and r.json()["train_metrics"] == {"train_loss": None, "grad": None}


def test_the_token_is_checked_before_the_body_is_read(live):
    server, registry, _ = live
    path = "/personas/0/canary"
    bad = b'{"version": 1e999, "percent": NaN'  # malformed JSON, a non-finite value, cut short
    for headers, status in (({}, 401), ({"Authorization": "Bearer " + "x" * 24}, 401),
                            ({"Authorization": f"Bearer {TOKENS['reader']}"}, 403),
                            ({"Authorization": f"Bearer {TOKENS['operator']}"}, 422)):
        r = httpx.post(server.url + path, content=bad, headers={"Content-Type": "application/json", **headers})
        assert r.status_code == status, (headers, r.text)
    r = _client(server, "operator").post(path, content=b"reason", headers={"Content-Type": "text/plain"})
    assert r.status_code == 415


def _raw(server, request: bytes, timeout: float = 5) -> bytes:
    """Send raw bytes and read the status line: a server that waits for the promised body times out here."""
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=timeout) as s:
        s.sendall(request)
        return s.recv(4096).split(b"\r\n", 1)[0]


def test_a_huge_body_is_refused_before_it_is_read(live):
    server, registry, _ = live
    head = "POST /personas/0/promote HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n{}Content-Length: {}\r\n\r\n"
    # 200 MB announced, none sent: without a token 401, with one 413, both at once (old: waited for the body).
    assert b" 401 " in _raw(server, head.format("", 200_000_000).encode())
    auth = f"Authorization: Bearer {TOKENS['operator']}\r\n"
    assert b" 413 " in _raw(server, head.format(auth, 200_000_000).encode())
    # Chunked, so no length is announced: refused once the cap is passed.
    with _client(server, "operator") as ops:
        r = ops.post("/personas/0/promote", content=iter([b'{"reason": "', b"x" * (1 << 20), b'"}']),
                     headers={"Content-Type": "application/json"})
    assert r.status_code == 413
    assert registry.rollout(0)["canary"] is None and Rollouts(registry).events(0)[1] == 1


@pytest.mark.parametrize("entries", [
    [("a", "t" * 20, ["read"]), ("b", "t" * 20, ["admin"])],  # one token, two scope sets: last one used to win
    [("a", "t" * 20, ["read"]), ("a", "u" * 20, ["read"])],   # one name twice: the audit log could not tell them apart
])
def test_a_token_or_name_listed_twice_is_refused(entries):
    with pytest.raises(TokenConfigError, match="more than once|same token"):
        TokenStore(entries)


def test_serving_blend_weights_per_version_with_the_nearest_evaluated_one_for_the_rest(live):
    """`serve-blend`: a version's weights come from its own devices' validation sums; a version never evaluated
    (most, with eval-every > 1) takes those of the nearest evaluated version of its persona, a tie the later one;
    a persona with none evaluated gets none. The admin API shows each version's own."""
    server, registry, _ = live
    rollouts, reader = Rollouts(registry), _client(server, "reader")
    v1, v2, v3 = (v["id"] for v in registry.versions(0)[0])
    assert registry.serving_weights() == {} and registry.blend_weights(v1) is None

    def sums(persona: float, personal: float) -> dict:  # least-squares weight rd / dd
        return {"persona_rd": persona, "persona_dd": 1.0, "personal_rd": personal, "personal_dd": 1.0}
    rollouts.record_evaluation(v1, 10.0, 8.0, 10.0, 5, sums(0.2, 0.4))
    rollouts.record_evaluation(v3, 10.0, 8.0, 10.0, 5, sums(0.6, 0.8))
    weights = registry.serving_weights()
    assert {v: (w["personal"], source) for v, (w, source) in weights.items()} == {
        v1: (pytest.approx(0.4), v1), v2: (pytest.approx(0.8), v3), v3: (pytest.approx(0.8), v3)}  # tie: later
    assert not set(weights) & {v["id"] for v in registry.versions(1)[0]}  # persona 1: nothing evaluated
    rollouts.record_evaluation(v2, 10.0, 8.0, 10.0, 5, sums(-1.0, 3.0))  # weights are clipped to [0, 1]
    rollouts.record_evaluation(v2, 10.0, 8.0, 10.0, 2, sums(0.0, 0.0))  # later pools add to the version's sums
    assert registry.serving_weights()[v2] == ({"persona": 0.0, "personal": 1.0}, v2)
    shown = reader.get(f"/versions/{v2}").json()["evaluation"]
    assert shown["persona_blend_weight"] == 0.0 and shown["personal_blend_weight"] == 1.0
    assert shown["blend_devices"] == 7
    assert reader.get(f"/versions/{v1 + 3}").json()["evaluation"]["personal_blend_weight"] is None


def test_serving_weights_shrink_each_personas_own_toward_every_personas_pool(live):
    """With K > 1 each persona's weight is fitted on its own few evaluation devices: serving adds
    `blend-prior-devices` (from the fitted version's manifest) devices' worth of the pool of every persona's nearest
    evaluated version. A version never evaluated takes its persona's nearest evaluated one's; the admin API shows
    both the version's own fit and what is served; registries written before the setting keep their own weights."""
    server, registry, _ = live
    rollouts, reader = Rollouts(registry), _client(server, "reader")
    old = [v["id"] for v in registry.versions(0)[0]]
    registry.serving = {**registry.serving, "blend_prior_devices": 5.0}
    a = registry.add_version(0, 3, _arrays(3.0), 4)
    b = registry.add_version(1, 3, _arrays(3.0), 20)

    def sums(rd: float, dd: float) -> dict:
        return {"persona_rd": rd, "persona_dd": dd, "personal_rd": rd, "personal_dd": dd}
    rollouts.record_evaluation(a, 10.0, 8.0, 10.0, 4, sums(4.0, 4.0))     # own weight 1.0, 4 devices
    rollouts.record_evaluation(b, 10.0, 8.0, 10.0, 20, sums(4.0, 20.0))   # own weight 0.2, 20 devices
    pool_rd, pool_dd, pool_n = 8.0, 24.0, 24
    want_a = (4.0 + 5 * pool_rd / pool_n) / (4.0 + 5 * pool_dd / pool_n)
    want_b = (4.0 + 5 * pool_rd / pool_n) / (20.0 + 5 * pool_dd / pool_n)
    weights = registry.serving_weights()
    assert weights[a] == ({"persona": pytest.approx(want_a), "personal": pytest.approx(want_a)}, a)
    assert weights[b][0]["persona"] == pytest.approx(want_b) and 0.2 < want_b < want_a < 1.0
    assert all(weights[v] == weights[a] for v in old)  # never evaluated: persona 0's nearest evaluated version
    assert registry.serving_weight(a, prior_devices=0.0)[0]["persona"] == pytest.approx(1.0)
    assert registry.serving_weight(b, prior_devices=1e12)[0]["persona"] == pytest.approx(pool_rd / pool_dd)
    shown = reader.get(f"/versions/{a}").json()
    assert shown["evaluation"]["persona_blend_weight"] == pytest.approx(1.0)  # the version's own fit
    assert shown["served_blend"] == {"persona": pytest.approx(want_a), "personal": pytest.approx(want_a),
                                     "fitted_on": a}
    # a version written before the setting existed (no blend_prior_devices in its manifest) keeps its own weight
    c = registry.add_version(0, 4, _arrays(4.0), 3)
    manifest = registry.version(c)["manifest"]
    del manifest["serving"]["blend_prior_devices"]
    with registry.engine.begin() as conn:
        conn.execute(versions.update().where(versions.c.id == c).values(manifest=json.dumps(manifest)))
    rollouts.record_evaluation(c, 10.0, 8.0, 10.0, 3, sums(3.0, 3.0))
    assert registry.serving_weight(c)[0]["persona"] == pytest.approx(1.0)


@pytest.mark.parametrize("value", ["nan", "inf", "3", -1.0, 1e400, float("nan"), "x", None, [], {"a": 1}, True, 2.5])
def test_a_manifests_blend_prior_is_read_as_a_finite_number_or_none_at_all(value):
    """A manifest edited by hand (or written by a buggy build) must not make serving fail or use a wild prior: a
    value that is not a finite number >= 0 counts as absent (0: each version's own weight)."""
    from server.registry import _prior_from_manifest

    got = _prior_from_manifest(json.dumps({"serving": {"blend_prior_devices": value}}))
    assert got == (2.5 if value == 2.5 else 0.0)
    assert _prior_from_manifest("not json") == 0.0 and _prior_from_manifest(json.dumps({"serving": []})) == 0.0
