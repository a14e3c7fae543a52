"""Privacy audit of a real DP federation with a coordinator restart in the middle: every stored persona version's
(epsilon, delta) is recounted by an independent accountant (Google's dp-accounting) from the version's full
lineage of releases, and the run fails on an under-report."""

import json
import time
from pathlib import Path

import dp_accounting
import pytest
from dp_accounting import pld

from client.keys import KEY_ENV, RawKey
from common.config import FederationConfig
from common.privacy import poisson_rate
from server.registry import PersonaRegistry
from server.server_app import discovery_releases
from tests.conftest import make_data, write_grouplens_100k

NODES = 5


def _run(overrides: dict) -> None:
    """One real Flower simulation on `out-dir` as it is: unlike simulations.federated.run_federation, nothing is
    wiped, so a second call is the coordinator restarting on the same registry."""
    from client.client_app import build_app as client_app
    from server.server_app import build_app as server_app
    from simulations.runtime import simulate

    overrides = {**overrides, "min-nodes": NODES}
    simulate(server_app(overrides), client_app(overrides), NODES)
    assert (Path(overrides["out-dir"]) / "history.json").exists(), "the run ended without writing its history"


def _lineage(registry: PersonaRegistry, version: int) -> list[dict]:
    chain = []
    while version is not None:
        chain.append(registry.version(version))
        version = chain[-1]["parent"]
    return chain[::-1]


def _recount(chain: list[dict], run_of, cfg: FederationConfig, cache: dict) -> float:
    """dp-accounting's PLD epsilon of everything a version's users took part in, rebuilt from the protocol and the
    lineage (not from the manifests' event lists): every coordinator run from the one that created the lineage's
    root to the one that created the version starts with discovery releases over all devices (sample rate 1),
    and each trained version in the lineage is one Poisson-sampled round release."""
    runs = run_of(chain[-1]) - run_of(chain[0]) + 1
    rounds = sum(v["round"] >= 1 for v in chain)
    key = (runs, rounds)
    if key not in cache:
        q = poisson_rate(cfg.fraction_train, cfg.min_train_nodes, NODES)
        noise, discovery_noise = cfg.dp_user_noise, cfg.dp_discovery_noise or cfg.dp_user_noise
        accountant = pld.PLDAccountant()
        accountant.compose(dp_accounting.GaussianDpEvent(discovery_noise), runs * discovery_releases(cfg))
        if rounds:
            accountant.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(noise)), rounds)
        cache[key] = accountant.get_epsilon(cfg.dp_delta)
    return cache[key]


def test_every_stored_version_covers_its_full_lineage_across_a_coordinator_restart(tmp_path):
    ratings, items, users = make_data(n_users=NODES, n_items=40, per_user=25, seed=6)
    data_dir = write_grouplens_100k(tmp_path / "ml", ratings, items, users)
    overrides = {"base-model": "tiny", "dataset": str(data_dir), "split": "default", "num-personas": 2,
                 "num-rounds": 1, "kmeans-iters": 1, "fraction-train": 0.6, "eval-users": 0, "lr": 0.01,
                 "dp-user-noise": 1.0, "dp-user-clip": 0.5, "personal-steps": 0, "local-steps": 1,
                 "out-dir": str(tmp_path / "out"), "device-dir": str(tmp_path / "devices")}
    cfg = FederationConfig.from_run_config(overrides)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(KEY_ENV, RawKey.generate().raw.hex())
        _run(overrides)
        restart = time.time()
        _run(overrides)  # the coordinator restarts on the same out-dir and resumes every persona

    def run_of(version: dict) -> int:
        return 1 + (version["created"] >= restart)

    registry = PersonaRegistry(tmp_path / "out")
    versions, total = registry.versions(limit=500)
    assert total == len(versions) and total >= 4
    # The restart happened: some version of the second run is trained from one of the first run's.
    assert any(run_of(v) == 2 and v["parent"] is not None and run_of(registry.version(v["parent"])) == 1
               for v in versions)
    cache: dict = {}
    problems = []  # every version checked, every problem listed
    for v in versions:
        manifest = json.loads((tmp_path / "out" / v["path"] / "manifest.json").read_text())
        for where, privacy in (("manifest.json", manifest["privacy"]), ("registry manifest", v["manifest"]["privacy"])):
            if not (privacy.get("dp") and privacy.get("delta") == cfg.dp_delta
                    and privacy.get("epsilon") == v["epsilon"]):
                problems.append(f"version {v['id']} (round {v['round']}): {where} privacy {privacy}")
        if v["delta"] != cfg.dp_delta:  # version 0 included: no null delta
            problems.append(f"version {v['id']} (round {v['round']}): registry delta {v['delta']}")
        chain = _lineage(registry, v["id"])
        independent = _recount(chain, run_of, cfg, cache)
        if not (v["epsilon"] or 0.0) >= 0.9 * independent:  # a >10% under-report fails
            problems.append(f"version {v['id']} (run {run_of(v)}, lineage rounds {[c['round'] for c in chain]}) "
                            f"reports epsilon {v['epsilon']}, dp-accounting recounts {independent:.3f}")
        if v["parent"] is not None and (v["epsilon"] or 0.0) < (registry.version(v["parent"])["epsilon"] or 0.0):
            problems.append(f"version {v['id']} reports less than its parent {v['parent']}")
    assert not problems, "\n".join(problems)
