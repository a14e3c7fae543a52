"""A real deployment on loopback: TLS SuperLink with SuperNode authentication and 3 device daemons (tiny model).

One daemon is killed in the middle of the run (the round completes with the other two) and restarted (it comes
back with its encrypted state). Takes a few minutes: every Flower message starts a ClientApp process.
"""

import json
import time

import httpx
import pytest

from client.daemon import load_settings, status
from server.registry import PersonaRegistry
from simulations.deployment import Deployment
from tests.conftest import make_data, write_grouplens_100k


def _wait(predicate, timeout: float, what: str, deployment: Deployment):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(1)
    pytest.fail(f"timed out waiting for {what}; logs in {deployment.work}")


def _rounds(out) -> dict[int, int]:
    """round -> contributing devices of persona versions written so far."""
    if not (out / "registry.db").exists():
        return {}
    return {v["round"]: v["devices"] for v in PersonaRegistry(out).versions(limit=500)[0] if v["devices"]}


def test_tls_deployment_survives_a_killed_daemon_and_resumes_a_restarted_one(tmp_path):
    ratings, items, users = make_data(n_users=3, n_items=40, per_user=25, seed=8)
    catalogue = write_grouplens_100k(tmp_path / "catalogue", ratings, items, users)
    deployment = Deployment(tmp_path / "deploy")
    try:
        deployment.start_superlink()
        for i, user in enumerate((1, 2, 3)):
            own = ratings[ratings["user"] == user]
            data = tmp_path / f"user{user}.jsonl"
            data.write_text("".join(json.dumps({"item": int(r.item), "rating": int(r.rating), "ts": int(r.ts)}) + "\n"
                                    for r in own.itertuples()))
            u = users[users["user"] == user].iloc[0]
            deployment.enrol(f"device{i}", data, user, int(u["age"]), str(u["gender"]), str(u["occupation"]),
                             str(catalogue))
            deployment.start_device(f"device{i}")
        out = tmp_path / "coordinator"
        deployment.submit({"base-model": "tiny", "dataset": str(catalogue), "num-rounds": 3, "num-personas": 1,
                           "fraction-train": 1.0, "min-train-nodes": 1, "eval-every": 3, "min-nodes": 3,
                           "lr": 0.01, "out-dir": str(out)})

        _wait(lambda: _rounds(out).get(1) == 3, 600, "round 1 with all three devices", deployment)
        deployment.kill("device2")  # daemon, its SuperNode and any ClientApp process, mid-run
        _wait(lambda: 2 in _rounds(out), 600, "round 2 without the killed device", deployment)
        assert _rounds(out)[2] == 2

        home = deployment.work / "devices" / "device2"
        before = status(load_settings(home))
        assert before["rounds_contributed"] >= 1 and before["persona"] == 0
        deployment.start_device("device2")
        api = f"http://127.0.0.1:{deployment.device_ports['device2'][0]}"
        token = (home / "api.token").read_text()

        def restarted_status():
            try:
                return httpx.get(api + "/status", headers={"Authorization": f"Bearer {token}"}).json()
            except httpx.TransportError:
                return None
        resumed = _wait(restarted_status, 120, "the restarted daemon's local API", deployment)
        # The restarted daemon reads the state it had before it was killed (decrypted with its own key).
        assert resumed["persona"] == before["persona"] and resumed["rounds_contributed"] >= before["rounds_contributed"]
        assert resumed["supernode"] == "running"

        _wait(lambda: (out / "history.json").exists(), 900, "the end of the run", deployment)
        history = json.loads((out / "history.json").read_text())
        assert sorted(map(int, history["train"])) == [1, 2, 3] and history["devices"] == 3
        assert sorted(_rounds(out)) == [1, 2, 3]
    finally:
        deployment.close()
