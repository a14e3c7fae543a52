"""Secure aggregation in a real Flower simulation (Ray backend, tiny model): the same federation with and
without it, same seed. Every device has the same number of training ratings, so the plain example-weighted mean
is the uniform mean secure aggregation computes, and the two runs' persona versions must agree within the
quantisation error."""

import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from client.keys import KEY_ENV, RawKey
from server.registry import PersonaRegistry
from simulations.federated import run_federation
from tests.conftest import make_data, write_grouplens_100k


def record_replies(path: str):
    """A ClientApp mod that appends what each reply carries (record names, array dtypes, metric names) to
    `path`: the Ray workers run the devices, so the test reads it back from the file."""
    def mod(message, context, call_next):
        reply = call_next(message, context)
        summary = {"type": message.metadata.message_type, "error": reply.has_error(), "records": {}}
        if not reply.has_error():
            for name, record in reply.content.items():
                summary["records"][name] = {key: (getattr(value, "dtype", None) or type(value).__name__)
                                            for key, value in record.items()}
        with open(path, "a") as f:
            f.write(json.dumps(summary) + "\n")
        return reply
    return mod


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("secure")
    ratings, items, users = make_data(n_users=5, n_items=40, per_user=25, seed=5)  # 20 training ratings each
    data_dir = write_grouplens_100k(root / "ml", ratings, items, users)
    out = {}
    for name, secure in (("plain", False), ("secure", True)):
        overrides = {"base-model": "tiny", "dataset": str(data_dir), "split": "default", "num-personas": 2,
                     "num-rounds": 2, "fraction-train": 1.0, "eval-every": 2, "eval-users": 5,
                     "kmeans-iters": 2, "lr": 0.01, "personal-steps": 0, "eval-min-devices": 1,
                     "discovery-features": "genre-deviation", "secure-aggregation": secure,
                     # the item statistics and the blend sums go through secure sums too (16 training ratings
                     # left per device: all below the cold-start threshold, so they pool as "cold")
                     "item-stats": True, "validation-fraction": 0.2,
                     # two rounds of federated MF and its population centre: three more secure sums
                     "item-factors-rounds": 2,
                     "secure-aggregation-group": 3,  # discovery's secure sums in two groups (3 + 2 devices)
                     "out-dir": str(root / name / "out"), "device-dir": str(root / name / "devices")}
        log = root / f"{name}.jsonl"
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv(KEY_ENV, RawKey.generate().raw.hex())
            history = run_federation(overrides, num_nodes=5, mods=[record_replies(str(log))])
        out[name] = history, root / name / "out", [json.loads(line) for line in log.read_text().splitlines()]
    return out


def _versions(out: Path) -> dict[str, dict[str, np.ndarray]]:
    return {f"{p.parent.name}/{p.name}": load_file(str(p / "adapter_model.safetensors"))
            for p in sorted(out.glob("personas/p*/r*"))}


def test_secure_run_releases_the_plain_runs_persona_versions_within_quantisation_error(runs):
    plain, secure = _versions(runs["plain"][1]), _versions(runs["secure"][1])
    assert sorted(plain) == sorted(secure) and any(name.endswith("r0002") for name in secure)
    moved = 0.0
    for name in plain:
        # Round 1 differs by the rounding alone (5 devices x 2e-10, then float32); round 2 trains from adapters
        # that differ by that much, and Adam's normalised steps can turn it into up to ~1% of a step (lr 0.01).
        atol = {"r0000": 0.0, "r0001": 1e-7}.get(name.split("/")[1], 1e-3)
        for key in plain[name]:
            np.testing.assert_allclose(secure[name][key], plain[name][key], atol=atol, rtol=0, err_msg=name)
            moved = max(moved, float(np.abs(plain[name][key]).max()))
    assert moved > 1e-3  # the versions were trained, so the comparison means something
    history = runs["secure"][0]
    for round_, train in history["train"].items():
        assert "secagg_aborted" not in train and train["secagg_dropped"] == 0, (round_, train)
        assert sum(train[f"p{p}_devices"] for p in range(2) if f"p{p}_devices" in train) == 5
        assert "train_loss" not in train and "max_update_norm" not in train  # single devices' figures
    # Evaluation went through secure sums too: the same pooled metrics, and the same per-version evaluations in
    # the registry (the canary machinery's input).
    assert sorted(history["evaluate"]) == sorted(runs["plain"][0]["evaluate"]) == ["2"]  # eval-every 2
    final, plain_final = history["evaluate"]["2"], runs["plain"][0]["evaluate"]["2"]
    # counts go through the same quantised sums as the errors: equal within the quantisation, not exactly
    assert final["users"] == plain_final["users"] == 5
    assert final["ratings"] == pytest.approx(plain_final["ratings"], abs=1e-3)
    assert {k for k in final if not k.startswith("secagg")} == set(plain_final)  # the same pools are released
    for key in ("persona_rmse", "personal_rmse", "p0_persona_rmse", "cold_persona_mae", "bias_rmse",
                "personal_blend_rmse", "persona_blend_weight", "persona_vs_bias_mean", "personal_blend_vs_bias_hi"):
        assert final[key] == pytest.approx(plain_final[key], abs=1e-3), key
    evaluations = {name: [PersonaRegistry(runs[name][1]).evaluation(v["id"]) for v in
                          PersonaRegistry(runs[name][1]).versions()[0]] for name in ("plain", "secure")}
    assert [e["devices"] for e in evaluations["secure"]] == [e["devices"] for e in evaluations["plain"]]
    assert sum(e["devices"] for e in evaluations["secure"]) == 5


def test_secure_discovery_releases_the_plain_item_statistics_and_personas_within_quantisation(runs):
    from common.item_stats import ItemStats

    plain, secure = (ItemStats.from_arrays(dict(np.load(runs[name][1] / "item_stats.npz")))
                     for name in ("plain", "secure"))
    # 5 devices, each coordinate rounded by at most 2 / levels (~1e-9), then the float32 file
    np.testing.assert_allclose(secure.mean, plain.mean, atol=1e-5)
    np.testing.assert_allclose(secure.count, plain.count, atol=0.5)
    assert secure.mu == pytest.approx(plain.mu, abs=1e-5)
    assert np.abs(plain.mean - plain.mu).max() > 0.05  # real statistics, not the prior alone
    # Discovery's contributions (item statistics; k-means slot sums, 2 iterations; the onboarding tables) leave the
    # devices masked only, and the secure run finds the same personas. (query.cold still names each device's
    # persona: docs/secure_aggregation.md.)
    for kind, count, plain_key in (("query.itemstats", 5, "sums"), ("query.embed", 10, "sums"),
                                   ("query.assign", 5, "features")):
        queries = [r for r in runs["secure"][2] if r["type"] == kind]
        assert len(queries) == count and all(set(r["records"]) == {"metrics", "secagg"} for r in queries), queries
        plain_queries = [r for r in runs["plain"][2] if r["type"] == kind]
        assert plain_queries and all(r["records"]["arrays"][plain_key] == "float32" for r in plain_queries)
    assert runs["secure"][0]["personas"]["sizes"] == runs["plain"][0]["personas"]["sizes"]


def test_secure_mf_rounds_and_centre_release_the_plain_item_factors_within_quantisation(runs):
    from common.item_factors import read_release

    plain, secure = (read_release(dict(np.load(runs[name][1] / "item_factors.npz"))) for name in ("plain", "secure"))
    assert plain[0].centre is not None and secure[0].centre is not None
    # Each round's summed gradient differs by the rounding only (5 devices x 2 x 50 / 2**30 per coordinate, ~1e-7
    # against gradients of ~1e-3): Adam's first steps are lr x sign(g), the same in both runs wherever |g| is
    # larger than that; the centre is a sum of 5 user halves rounded the same way.
    np.testing.assert_allclose(secure[0].bias, plain[0].bias, atol=1e-5, rtol=0)
    np.testing.assert_allclose(secure[0].factors, plain[0].factors, atol=1e-5, rtol=0)
    np.testing.assert_allclose(secure[0].centre, plain[0].centre, atol=1e-6, rtol=0)
    assert secure[0].mu == pytest.approx(plain[0].mu, abs=1e-6)
    # the rounds moved the item half (it starts with zero biases; Adam's first step is 0.02 a coordinate)
    assert np.abs(plain[0].bias).max() > 0.015 and np.abs(plain[0].centre).max() > 1e-3
    # Every MF answer (two rounds and the centre, 5 devices each) left its device masked; the plain run's were floats.
    for kind, count, plain_key in (("query.itemfactors", 10, "factors"), ("query.usercentre", 5, "half")):
        queries = [r for r in runs["secure"][2] if r["type"] == kind]
        assert len(queries) == count and all(set(r["records"]) == {"metrics", "secagg"} for r in queries), queries
        plain_queries = [r for r in runs["plain"][2] if r["type"] == kind]
        assert len(plain_queries) == count
        assert all(r["records"]["arrays"][plain_key] == "float32" for r in plain_queries)


def test_what_devices_send_in_a_secure_round_is_keys_ciphertexts_and_masked_integers(runs):
    replies = runs["secure"][2]
    stages = {r["type"] for r in replies}
    assert {"train.secagg", "evaluate.secagg", "query.secagg_share", "query.secagg_mask",
            "query.secagg_unmask"} <= stages
    assert "train" not in stages and "evaluate" not in stages
    secure = [r for r in replies if "secagg" in r["type"]]
    assert secure and not any(r["error"] for r in secure)
    for r in secure:
        for name, record in r["records"].items():
            assert "persona" not in record and "num-examples" not in record, r
            arrays = [v for v in record.values() if v not in ("bytes", "list", "int", "float", "str")]
            assert all(v == "uint32" for v in arrays), r  # the masked vector is the only array, never a float delta
    # The plain run's train replies carry the float32 delta and the persona id that the secure run does not send.
    plain_train = [r for r in runs["plain"][2] if r["type"] == "train"]
    assert plain_train and all("persona" in r["records"]["metrics"] for r in plain_train)
