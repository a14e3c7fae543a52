"""A real Flower simulation (Ray backend) of the whole system with the tiny model."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from peft import PeftModel
from safetensors.numpy import load_file

from client.keys import KEY_ENV, RawKey
from client.store import EncryptedStore
from common.model import load_base_model
from common.personas import elbow
from common.privacy import PrivacyLedger
from server.registry import PersonaRegistry
from server.serving import ITEM_FACTORS_FILE
from simulations.federated import run_federation
from tests.conftest import make_data, write_grouplens_100k

ROOT = Path(__file__).resolve().parents[2]
PERSONA_FILES = {"adapter_config.json", "adapter_model.safetensors", "manifest.json"}


@pytest.fixture(scope="module")
def federation(tmp_path_factory):
    root = tmp_path_factory.mktemp("fed")
    ratings, items, users = make_data(n_users=6, n_items=40, per_user=25, seed=2)
    # Two users with a short history: the cold-start path (threshold below is 15 training ratings: 16 for the
    # others, 13 for these two, once validation-fraction holds out their latest 4 and 3).
    ratings = ratings[~((ratings["user"] >= 5) & (ratings.groupby("user").cumcount() >= 20))]
    data_dir = write_grouplens_100k(root / "ml", ratings, items, users)
    overrides = {"base-model": "tiny", "dataset": str(data_dir), "split": "default", "num-personas": 2, "num-rounds": 2,
                 "fraction-train": 1.0,  # every device trains: the registry test needs every persona trained
                 "eval-every": 1, "eval-users": 6, "cold-start-threshold": 15,
                 "kmeans-iters": 2, "lr": 0.01, "out-dir": str(root / "out"), "device-dir": str(root / "devices"),
                 "eval-min-devices": 1,  # six test devices: release every pooled metric (the default withholds < 5)
                 "item-stats": True,  # the collaborative signal's release, without noise here
                 "validation-fraction": 0.2,  # and the blend of each adapter with the private bias model
                 }
    key = RawKey.generate()
    # The devices take their store key from the environment (a daemon's key source), so the test can open them.
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(KEY_ENV, key.raw.hex())
        history = run_federation(overrides, num_nodes=6)
    return history, root / "out", root / "devices", key


def test_persona_versions_are_written_as_loadable_peft_adapters(federation):
    history, out = federation[:2]
    versions = sorted(out.glob("personas/p*/r*"))
    assert {v.parent.name for v in versions} == {"p0", "p1"}
    assert any(v.name == "r0002" for v in versions) or any(v.name == "r0001" for v in versions)
    latest = max(versions, key=lambda v: v.name)
    manifest = json.loads((latest / "manifest.json").read_text())
    assert manifest["contributing_devices"] >= 1 and manifest["round"] >= 1
    base, tok = load_base_model("tiny")
    model = PeftModel.from_pretrained(base, str(latest))
    saved = load_file(str(latest / "adapter_model.safetensors"))
    loaded = {n: p for n, p in model.named_parameters() if "lora_" in n}
    assert len(loaded) == len(saved)
    some_key = sorted(saved)[0]
    param = next(p for n, p in loaded.items() if n.replace(".default", "") == some_key)
    assert torch.allclose(param, torch.from_numpy(saved[some_key]))
    assert any(np.abs(v).sum() > 0 for k, v in saved.items() if "lora_B" in k)  # trained, not the zero init


def test_coordinator_output_holds_persona_artefacts_only(federation):
    out = federation[1]
    for path in out.rglob("*"):
        if path.is_file():
            rel = path.relative_to(out)
            assert rel.as_posix() in ("history.json", "onboarding.json", "item_stats.npz", "registry.db",
                                      "registry.db-wal", "registry.db-shm") or (
                rel.parts[0] == "personas" and rel.parts[1].startswith("p") and rel.name in PERSONA_FILES), rel
    history_text = (out / "history.json").read_text()
    assert "partition" not in history_text and "user" not in json.loads(history_text)["train"]["1"]


def test_metrics_and_personal_adapters(federation):
    history = federation[0]
    assert history["devices"] == 6
    assert sum(history["personas"]["sizes"]) == 6 and history["personas"]["cold_start_devices"] == 2
    final = history["evaluate"][str(max(map(int, history["evaluate"])))]
    for key in ("persona_rmse", "persona_mae", "personal_rmse", "personal_mae", "cold_persona_rmse",
                "warm_persona_rmse"):
        assert np.isfinite(final[key]) and final[key] > 0, key
    assert final["users"] == 6 and final["ratings"] > 0
    assert final["personal_distance"] > 0  # personal adapters moved away from their persona adapter
    train = history["train"]["1"]
    assert train["tokens_per_s"] > 0 and train["gflops_per_s"] > 0


def test_private_bias_and_blends_are_pooled_from_the_released_statistics_and_validation_sums(federation):
    from common.config import split_preset
    from common.data import load_movielens
    from common.item_stats import ItemStats, predict, user_bias
    from common.split import temporal_split, validation_split
    from simulations.federated import federated_rows, markdown

    history, out = federation[0], federation[1]
    final = history["evaluate"][str(max(map(int, history["evaluate"])))]
    # Recomputed outside the federation: the released statistics, each user's bias on the ratings left after the
    # validation hold-out, scored on the test ratings. The devices must have done exactly this.
    cfg = history["config"]
    data = load_movielens(cfg["dataset"])
    split = temporal_split(data.ratings, split_preset(cfg["split"]))
    fit, val = validation_split(split.train, 0.2)
    stats = ItemStats.from_arrays(dict(np.load(out / "item_stats.npz")))
    sse = n = 0.0
    for user, test in split.test.groupby("user"):
        mine = fit[fit["user"] == user]
        pred = predict(user_bias(mine["item"].to_numpy(), mine["rating"].to_numpy(), stats), test["item"], stats)
        sse, n = sse + float(((pred - test["rating"].to_numpy()) ** 2).sum()), n + len(test)
    assert final["ratings"] == n
    np.testing.assert_allclose(final["bias_rmse"], np.sqrt(sse / n), rtol=1e-6)
    for path in ("persona", "personal"):
        assert 0.0 <= final[f"{path}_blend_weight"] <= 1.0
        assert 0.0 < final[f"{path}_blend_rmse"] < 4.0
        # per scope too (cold and warm users each pool their own weight)
        assert {f"cold_{path}_blend_rmse", f"warm_{path}_blend_rmse"} <= set(final)
    # training held the validation ratings out: the devices reported the smaller training counts
    assert history["personas"]["cold_start_devices"] == 2
    rows = {r["method"]: r for r in federated_rows("run", 2, {**history, "seconds": 1.0})}
    blend_row = [m for m in rows if m.startswith("run: personal adapter + private bias, w=")]
    assert len(blend_row) == 1 and rows[blend_row[0]]["mae"] is None
    assert rows["run: private user+item bias (released item statistics)"]["rmse"] == final["bias_rmse"]
    assert f"| {blend_row[0]} | 2 |" in markdown(list(rows.values())) and "| - |" in markdown(list(rows.values()))
    # the paired per-user comparison with the private bias model: every adapter and blend, an interval around it
    for path in ("persona", "personal", "persona_blend", "personal_blend"):
        mean, lo, hi = (final[f"{path}_vs_bias_{k}"] for k in ("mean", "lo", "hi"))
        assert lo <= mean <= hi and np.isfinite(hi - lo)
    assert rows[blend_row[0]]["vs_bias"] == [final[f"personal_blend_vs_bias_{k}"] for k in ("mean", "lo", "hi")]
    assert "per-user MSE diff vs the private base (MF or bias model) [95% CI]" in markdown(list(rows.values()))
    # with one persona the row is exactly what is served (the version's weight pools the same validation sums); with
    # K=2 (here) the rows of what is served are each persona at its own weight leaning on the pool
    served = [m for m in rows if "(served" in m]
    assert len(served) == 2 and all("per-persona weights" in m for m in served)
    for path in ("persona", "personal"):
        assert all(0 <= final[f"p{j}_{path}_served_weight"] <= 1 for j in range(2))
        assert rows[next(m for m in served if m.startswith(f"run: {path} adapter"))]["rmse"] == \
            final[f"{path}_served_rmse"]
    one = {r["method"] for r in federated_rows("run", 1, {**history, "seconds": 1.0})}
    assert any(m.startswith("run: personal adapter + private bias, w=") and m.endswith("(served: devices)")
               for m in one)
    assert not any("served" in r["method"] for r in federated_rows("run", 1, {**history, "serving_blend": None,
                                                                               "seconds": 1.0}))


def test_rescore_serves_cold_start_users_the_persona_their_devices_were_placed_in(federation):
    """K=2: `simulations.rescore --cold-only` places each cold-start user with the released onboarding tables, as
    the run's coordinator did: the pooled RMSE is the run's own cold-start figure, which serving each user the
    other persona would not give. Warm users' personas stay on their devices, so without --cold-only it refuses."""
    from common.metrics import rmse
    from simulations.rescore import PRIVATE_BASE, load_run, rescore, served_at_prior, table

    out = federation[1]
    history = json.loads((out / "history.json").read_text())
    last = history["evaluate"][max(history["evaluate"], key=int)]
    with pytest.raises(SystemExit, match="--cold-only"):
        rescore(out)
    r = rescore(out, cold_only=True)
    assert r["k"] == 2 and sum(r["sizes"]) == len(np.unique(r["who"])) == last["cold_users"] == 2 and r["cold"].all()
    assert rmse(r["persona"], r["y"]) == pytest.approx(last["cold_persona_rmse"], rel=1e-5)
    # the private base each device fitted (here the bias model over the released statistics) is the run's too
    assert rmse(r[PRIVATE_BASE], r["y"]) == pytest.approx(last["cold_bias_rmse"], rel=1e-5)
    text = table([r])
    assert "| vs private base |" in text and f"private base {last['cold_bias_rmse']:.4f}" in text
    # and what these users can resolve: each reference paired with item bias only
    from simulations.centralised import paired_vs
    d = paired_vs((r[PRIVATE_BASE] - r["y"]) ** 2, (r["item bias only"] - r["y"]) ** 2, r["who"])
    assert f"| {PRIVATE_BASE} | {d[0]:+.4f} [{d[1]:+.4f}, {d[2]:+.4f}] |" in text
    assert "| item bias only | " not in text.split("paired with item bias only")[1]
    run = load_run(out, cold_only=True)
    other = np.concatenate([run.device(u).predict(run.arrays[1 - run.persona(run.device(u))]) for u in run.users])
    assert abs(rmse(other, r["y"]) - last["cold_persona_rmse"]) > 1e-4
    # `--served`: what the run serves, each persona's adapter blended with the private base at the weight the
    # registry serves its stable version at (`serve-blend`, its own fit shrunk toward both personas' pool);
    # `--served-priors`: also at other blend-prior-devices, paired like the baselines (0: each persona's own fit)
    served = rescore(out, cold_only=True, served=True, served_priors=(0.0, 1e9))
    registry = PersonaRegistry(out)
    stable = {j: registry.rollout(j)["stable"] for j in range(2)}
    assert served["weights"] == {j: pytest.approx(registry.serving_weight(stable[j])[0]["persona"]) for j in range(2)}
    w = pd.Series({u: served["weights"][run.persona(run.device(u))] for u in run.users})[r["who"]].to_numpy()
    np.testing.assert_allclose(served["persona"], r[PRIVATE_BASE] + w * (r["persona"] - r[PRIVATE_BASE]), atol=1e-9)
    own = served_at_prior(0.0)
    assert served["alternative_weights"][own] == [pytest.approx(registry.blend_weights(stable[j])["persona"])
                                                  for j in range(2)]
    w0 = pd.Series({u: served["alternative_weights"][own][run.persona(run.device(u))] for u in run.users})[r["who"]]
    np.testing.assert_allclose(served[own], r[PRIVATE_BASE] + w0.to_numpy() * (r["persona"] - r[PRIVATE_BASE]),
                               atol=1e-9)
    pooled = served["alternative_weights"][served_at_prior(1e9)]
    assert pooled[0] == pytest.approx(pooled[1], abs=1e-6)  # one weight for both personas: the pool's
    text_served = table([served])
    assert "served: blended with the private base at w" in text_served and f"| vs {own} |" in text_served
    assert "| served RMSE (the federation's blend RMSE) |" in text_served and "served RMSE" not in text


def test_rescore_simulates_cold_start_by_keeping_each_users_oldest_or_newest_ratings(federation):
    """`--first 3`: every evaluation user (warm ones too) keeps their 3 oldest training ratings and no validation
    ratings, keeps every test rating, is placed by the onboarding rule and compared only with baselines that have no
    user term (fitted on everything, a user term would know the history given up) and the private base."""
    from simulations.rescore import PRIVATE_BASE, load_run, rescore

    out = federation[1]
    history = json.loads((out / "history.json").read_text())
    run = load_run(out, first=3)
    whole = run.baseline_fit  # every training rating (minus validation), as the devices held them in the run
    assert len(run.users) == 6 and run.val[run.val["user"].isin(run.users)].empty
    for u in run.users:
        oldest = whole[whole["user"] == u].sort_values(["ts", "item"], kind="stable").head(3)
        assert len(oldest) == 3 and len(whole[whole["user"] == u]) > 3
        assert run.device(u).train[["item", "rating", "ts"]].equals(oldest[["item", "rating", "ts"]])
    # every test rating the run's evaluation scored is still scored
    assert len(run.test) == history["evaluate"][max(history["evaluate"], key=int)]["ratings"]
    r = rescore(out, first=3)
    assert r["cold"].all() and sum(r["sizes"]) == 6
    assert set(r) >= {"global mean", "item bias only", PRIVATE_BASE}
    assert not {"user+item bias", "matrix factorisation"} & set(r)
    expected = np.concatenate([run.device(u).predict(run.arrays[run.persona(run.device(u))]) for u in run.users])
    np.testing.assert_allclose(r["persona"], expected, atol=1e-6)
    # the item half of the baselines comes from every training rating, not only what the users kept
    from simulations.classical import ItemBias
    np.testing.assert_allclose(r["item bias only"], ItemBias().fit(whole).predict(r["who"], run.test["item"]))
    assert not np.allclose(r["item bias only"], ItemBias().fit(run.fit).predict(r["who"], run.test["item"]))
    for bad in (-1, 15):  # the fixture's cold-start threshold is 15
        with pytest.raises(SystemExit, match="--first"):
            load_run(out, first=bad)
        with pytest.raises(SystemExit, match="--last"):
            load_run(out, last=bad)
    # `--last 3`: the 3 newest instead, those just before the test ratings; the rest as above
    latest = load_run(out, last=3)
    assert latest.kept == 3 and latest.newest and latest.val[latest.val["user"].isin(latest.users)].empty
    for u in latest.users:
        newest = whole[whole["user"] == u].sort_values(["ts", "item"], kind="stable").tail(3)
        assert latest.device(u).train[["item", "rating", "ts"]].equals(newest[["item", "rating", "ts"]])
        assert not newest.equals(whole[whole["user"] == u].sort_values(["ts", "item"], kind="stable").head(3))
    assert latest.test.equals(run.test)
    with pytest.raises(SystemExit, match="choose one"):
        load_run(out, first=3, last=3)
    # `--last 0`: devices that have just enrolled, no rating at all; served from the released artefacts alone
    enrolled = rescore(out, last=0)
    fresh = load_run(out, last=0)
    assert all(fresh.device(u).train.empty for u in fresh.users) and enrolled["cold"].all()
    from common.item_stats import predict as bias_predict
    np.testing.assert_allclose(enrolled[PRIVATE_BASE], bias_predict(0.0, fresh.test["item"], fresh.released))
    assert np.isfinite(enrolled["persona"]).all() and len(enrolled["persona"]) == len(run.test)
    # `--predictions`: one row per scored rating, each prediction beside its rating and the counts of the training
    # ratings its movie and its user had (the user's: what they kept)
    from simulations.rescore import predictions_frame
    frame = predictions_frame([r, enrolled])
    assert len(frame) == 2 * len(run.test) and set(frame["run"]) == {str(out)}
    first_run = frame.iloc[:len(run.test)]
    np.testing.assert_allclose(first_run["prediction"], r["persona"])
    np.testing.assert_allclose(first_run[PRIVATE_BASE], r[PRIVATE_BASE])
    assert (first_run["user_ratings"] == 3).all() and (frame.iloc[len(run.test):]["user_ratings"] == 0).all()
    movies = run.fit["item"].value_counts()
    assert first_run["item_ratings"].tolist() == [int(movies.get(i, 0)) for i in first_run["item"]]


def test_the_wall_breakdown_adds_up_and_names_where_the_time_went(federation):
    timing = federation[0]["timing"]
    parts = timing["seconds"]
    assert sum(parts.values()) == pytest.approx(timing["wall_s"], rel=1e-6)
    for name in ("model: persona training", "model: personal training", "model: evaluation scoring",
                 "device: encrypted store", "device: loading data and model", "device: building prompts",
                 "device: discovery features", "coordinator: aggregation", "coordinator: discovery sums",
                 "coordinator: registry writes"):
        assert parts[name] > 0 and timing["calls"][name] >= 1, name
    # Devices run one at a time and phases count exclusively: what no phase covers is never negative.
    assert parts["rest (messaging, polling, idle, shut-down)"] >= 0
    assert parts["start-up (Ray, Flower, until the first phase)"] > 0


def test_devices_serve_their_personal_adapter_at_the_blend_weight_validation_chose_for_its_version(federation):
    """`serve-blend`: the coordinator records each version's weights from its devices' validation sums, and at the
    end of the run every device keeps the personal weight of the version its adapter was derived from."""
    from client.client_app import PERSONAL, load_state
    from client.device import SERVING, read_serving_context
    from common.adapters import adapter_digest

    history, out, devices, key = federation
    registry = PersonaRegistry(out)
    sent = history["serving_blend"]
    assert sent["devices"] == 6 and sent["versions"]
    by_digest = {}
    for version, weight in sent["versions"].items():
        # its own weight, or the nearest evaluated version's of its persona (`serving_weights`), shrunk toward the
        # pool of both personas' nearest evaluations (`blend-prior-devices`)
        fitted_on = sent["fitted_on"][version]
        assert (registry.serving_weight(int(version)) ==
                ({"persona": pytest.approx(registry.serving_weight(fitted_on)[0]["persona"]),
                  "personal": pytest.approx(weight)}, fitted_on))
        assert 0 <= weight <= 1 and registry.blend_weights(fitted_on) is not None
        assert registry.version(fitted_on)["persona"] == registry.version(int(version))["persona"]
        by_digest[adapter_digest(registry.arrays(int(version)))] = weight
    kept = 0
    for node in devices.glob("node-*"):
        store = EncryptedStore(node, key)
        (user,) = store.users()
        assert store.versions(user, PERSONAL)
        served = read_serving_context(store.get_bytes(user, SERVING))[3]
        derived_from = load_state(store, user)["personal_from"]
        assert served == pytest.approx(by_digest.get(derived_from, 1.0))
        kept += derived_from in by_digest
    assert kept >= 1  # the devices evaluated on the final versions hold their weight


def test_device_stores_hold_personal_adapters_encrypted_only(federation):
    devices, key = federation[2], federation[3]
    nodes = sorted(devices.glob("node-*"))
    assert len(nodes) == 6
    blobs = [p.read_bytes() for p in devices.rglob("*") if p.is_file()]
    assert blobs and all(b.startswith(b"PFLV") for b in blobs)
    personal = []
    for node in nodes:
        store = EncryptedStore(node, key)
        (user,) = store.users()
        assert 1 <= len(store.versions(user, "personal")) <= 2  # keep-versions
        personal.append(store.get_adapter(user, "personal"))
    # Neither the safetensors header (tensor names) nor any run of a personal adapter's tensor bytes is on disk.
    for blob in blobs:
        assert b"lora_" not in blob and b"dtype" not in blob
        for tensors in personal:
            for name, t in tensors.items():
                raw = t.numpy().tobytes()
                if "lora_B" in name and np.abs(t.numpy()).sum() > 0:
                    window = raw[len(raw) // 2: len(raw) // 2 + 32]
                    assert window not in blob, name


@pytest.fixture(scope="module")
def dp_federation(tmp_path_factory):
    root = tmp_path_factory.mktemp("fed-dp")
    ratings, items, users = make_data(n_users=5, n_items=40, per_user=25, seed=3)
    data_dir = write_grouplens_100k(root / "ml", ratings, items, users)
    overrides = {"base-model": "tiny", "dataset": str(data_dir), "split": "default", "num-personas": 2, "num-rounds": 2,
                 "fraction-train": 0.6, "eval-every": 2, "eval-users": 5, "kmeans-iters": 2, "lr": 0.01,
                 "persona-candidates": "1,2,3", "dp-device-noise": 0.8, "dp-device-budget": 50.0,
                 "discovery-features": "genre-deviation",  # the other discovery path, through DP clipping
                 "dp-user-noise": 1.0, "dp-user-clip": 0.5, "item-stats": True,
                 "residual-to-bias": True,  # DP-SGD and evaluation on top of the private bias model's prior
                 "out-dir": str(root / "out"), "device-dir": str(root / "devices")}
    key = RawKey.generate()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(KEY_ENV, key.raw.hex())
        history = run_federation(overrides, num_nodes=5)
    return history, root / "out", root / "devices", key


def test_dp_simulation_reports_user_level_epsilon_in_every_persona_manifest(dp_federation):
    history, out, devices, key = dp_federation
    manifests = [json.loads(p.read_text()) for p in sorted(out.glob("personas/p*/r*/manifest.json"))]
    trained = [m for m in manifests if m["round"] >= 1]
    # Under DP every persona with devices is released every round, noise only if none of its devices was sampled.
    sizes = history["personas"]["sizes"]
    assert len(trained) == 2 * sum(1 for s in sizes if s)
    for m in trained:
        privacy = m["privacy"]
        assert privacy["dp"] and privacy["level"] == "user" and 0 < privacy["epsilon"] < 1e3
        # discovery (the item statistics, 2 k-means iterations for each of 3 candidate K, the onboarding tables:
        # every device), then one event per round
        assert privacy["releases"][0] == [1.0, 1.0, 8] and len(privacy["releases"]) == 1 + m["round"]
    for persona in {m["persona"] for m in trained}:
        eps = [m["privacy"]["epsilon"] for m in trained if m["persona"] == persona]
        assert eps == sorted(eps) and eps[0] < eps[-1]  # spending accumulates
    for round_, train in history["train"].items():
        assert "train_loss" not in train  # no data-dependent figure leaves a device under DP
        # every sampled device (a secret Poisson draw, each device with probability 0.6) trained under DP-SGD and
        # contributed: none failed, none was refused
        assert train["failed"] == train["rejected"] == train["skipped"] == 0, (round_, train)
    # Devices that trained hold an encrypted, non-empty example-level ledger.
    ledgers = [PrivacyLedger.from_bytes(EncryptedStore(node, key).get_bytes(u, "privacy-ledger"))
               for node in devices.glob("node-*") for u in EncryptedStore(node, key).users()
               if EncryptedStore(node, key).versions(u, "privacy-ledger")]
    assert ledgers and all(ledger.history and 0 < ledger.spent <= 50.0 for ledger in ledgers)


def test_item_statistics_are_released_from_training_ratings_and_noised_under_dp(federation, dp_federation):
    from common.data import load_movielens
    from common.item_stats import ItemStats
    from common.split import temporal_split
    from common.config import split_preset

    exact, noisy = (ItemStats.from_arrays(dict(np.load(fed[1] / "item_stats.npz"))) for fed in (federation,
                                                                                                   dp_federation))
    cfg = federation[0]["config"]
    data = load_movielens(cfg["dataset"])
    from common.split import validation_split

    # the ratings left after the devices' validation hold-out (the dp federation holds none out)
    train = validation_split(temporal_split(data.ratings, split_preset(cfg["split"])).train,
                             cfg["validation_fraction"])[0]
    truth = train.groupby("item")["rating"].mean()
    # no noise: each movie's released mean is its training mean, shrunk by the 10-rating prior (and weighted)
    assert len(exact.mean) == int(data.items.index.max())
    assert np.corrcoef(exact.mean[truth.index - 1], truth.to_numpy())[0, 1] > 0.9
    assert abs(exact.mu - train["rating"].mean()) < 0.05
    # under DP (noise multiplier 1 on 5 devices) the release is noise-dominated: shrunk towards the prior, never a
    # ratio of two noises (tests/common/test_item_stats.py checks this over many draws)
    assert len(noisy.mean) == len(exact.mean) and 1.5 < noisy.mu < 4.5 and np.all(np.abs(noisy.item_bias()) < 1.0)


def test_k_is_chosen_at_the_elbow_of_the_noisy_federated_inertia(dp_federation):
    history, out, _, _ = dp_federation
    personas = history["personas"]
    inertia = {int(k): v for k, v in personas["inertia"].items()}
    assert sorted(inertia) == [1, 2, 3] and all(v >= 0 for v in inertia.values())
    assert personas["k"] == elbow(inertia) == len(personas["sizes"])
    assert personas["features"] == "genre-deviation"
    assert history["config"]["num_personas"] == personas["k"]
    assert {p.name for p in (out / "personas").iterdir()} == {f"p{k}" for k in range(personas["k"])}


def test_registry_records_lineage_stable_versions_and_per_version_evaluations(federation):
    out = federation[1]
    registry = PersonaRegistry(out)
    assert registry.personas() == [0, 1]
    for persona in (0, 1):
        items, total = registry.versions(persona)
        assert total == len(items) >= 2 and items[0]["round"] == 0 and items[0]["parent"] is None
        for older, newer in zip(items, items[1:]):
            assert newer["parent"] == older["id"]  # each version is trained from the previous one
        rollout = registry.rollout(persona)
        assert rollout["stable"] == items[-1]["id"] and items[-1]["state"] == "stable"  # auto-promote
        assert all(v["state"] == "retired" for v in items[:-1])
    evaluated = [registry.evaluation(v["id"]) for v in registry.versions()[0]]
    assert sum(e["devices"] for e in evaluated) == 6 * 2  # every evaluation device, both evaluation rounds


def _main_job_data(tmp_path):
    ratings, items, users = make_data(n_users=6, n_items=70, per_user=60, seed=4)
    # Users 5 and 6 are light (8 training ratings), the rest heavier (48): two activity buckets.
    ratings = ratings[~((ratings["user"] >= 5) & (ratings.groupby("user").cumcount() >= 10))]
    return write_grouplens_100k(tmp_path / "ml", ratings, items, users)


# What the known, handled warnings look like on a console, and a console's generic warning lines: none may show.
KNOWN_NOISE = ("past_key_values", "run_simulation", "DEPRECATED FEATURE", "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO",
               "Secure RNG", "ClientAppActor", "Loading weights", "Warning", "WARNING")
HANDLED = ("past_key_values", "The `run_simulation` function is deprecated", "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO",
           "Secure RNG")


def test_main_job_writes_the_table_with_rmse_per_user_activity_bucket_and_privacy_rows(tmp_path):
    """Run as a user runs it, in a process of its own (so warnings shown once per process, and whatever Ray's
    workers print, reach the console as they would): the console has progress and results only, the log file the
    rest, and the log file is named on the first line."""
    out = tmp_path / "results"
    sets = {"base-model": "tiny", "dataset": str(_main_job_data(tmp_path)), "split": "default", "num-rounds": 1,
            "eval-every": 1, "eval-users": 6, "kmeans-iters": 2, "cold-start-threshold": 18, "memory-items": 2,
            "lr": 0.01, "persona-candidates": "1,2,3", "eval-min-devices": 1,  # per-bucket RMSE of 2 and 4 users
            "item-factors-rounds": 2, "item-factors-rank": 3}
    args = ["--personas", "elbow", "--epsilons", "2", "--dp-personas", "2", "--out", str(out)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    run = subprocess.run([sys.executable, "-m", "simulations.federated", *args]
                         + [a for k, v in sets.items() for a in ("--set", f"{k}={v}")],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    assert run.returncode == 0, run.stderr[-3000:]
    log_file = out / "federated.log"
    assert run.stdout.splitlines()[0] == f"log file (library logging and warnings): {log_file.resolve()}"
    log = log_file.read_text()
    assert "Starting PersonaStrategy strategy" in log and "py.warnings" in log  # Flower's log and warnings went there
    processes = {line.split()[2] for line in log.splitlines() if line[:4].isdigit()}
    assert len(processes) >= 2, "the simulation workers' logging is not in the log file"
    # Handled at their source, so not even in the log file.
    assert not [n for n in HANDLED if n in log], [line for line in log.splitlines() if any(n in line for n in HANDLED)]
    noisy = [line for line in (run.stdout + run.stderr).splitlines() if any(n in line for n in KNOWN_NOISE)]
    assert not noisy, noisy
    rounds = [line for line in run.stdout.splitlines() if line.startswith("round 1/1 | ")]
    assert len(rounds) == 3 and all("evaluation by 6 users: persona RMSE" in line for line in rounds), run.stdout
    result = json.loads((out / "results.json").read_text())
    rows = {r["method"]: r for r in result["rows"]}
    # personas from genre deviations (the discovery that separates taste and survives DP), in every federation
    assert result["overrides"]["discovery-features"] == "genre-deviation"
    assert {h["config"]["discovery_features"] for hs in result["histories"].values() for h in hs} == {"genre-deviation"}
    # the main job's defaults: adapters correcting the private MF base, blended with it on validation; the DP row
    # keeps the bias base (MF rounds would be more discovery releases) and says so
    variant = " + long-term memory (2), residual to private MF"
    assert {"SLM vanilla prompting + long-term memory (2)", f"single adapter{variant}: persona adapter",
            "2 personas, user-level ε=2 + long-term memory (2), residual to private bias: personal adapter",
            f"single adapter{variant}: private MF (released item factors + on-device user factors)"} <= set(rows)
    assert result["histories"]["2 personas, user-level ε=2"][0]["config"]["item_factors_rounds"] == 0
    assert (out / "k1" / "item_factors.npz").exists() and not (out / "k2-eps2" / "item_factors.npz").exists()
    elbow_row = rows[f"K at the elbow of 1,2,3{variant}: persona adapter"]
    assert elbow_row["K"] == result["histories"]["K at the elbow of 1,2,3"][0]["personas"]["k"] in (1, 2, 3)
    # The DP row is a user-level DP run: its persona versions carry the epsilon spent.
    manifests = [json.loads(p.read_text()) for p in (out / "k2-eps2" / "personas").glob("p*/r0001/manifest.json")]
    assert manifests and all(m["privacy"]["dp"] and 0 < m["privacy"]["epsilon"] <= 2.0 + 1e-6 for m in manifests)
    for row in rows.values():
        if "per-persona weights" in row["method"]:  # what K > 1 serves: the buckets pool across personas
            assert row["activity"] == {} and elbow_row["K"] > 1 and "(served: " in row["method"]
            continue
        assert set(row["activity"]) == {"ratings_0_19", "ratings_20_49"}, row["method"]
        # a pooled RMSE lies between its parts (not a blend's: each bucket pools its own weight)
        if ", w=" not in row["method"]:
            assert min(row["activity"].values()) - 1e-9 <= row["rmse"] <= max(row["activity"].values()) + 1e-9
    table = (out / "results.md").read_text()
    assert "| method | 0-19 ratings | 20-49 ratings |" in table and "RMSE sd" not in table
    assert "not at the run's w, which is what is served" in table
    # the wall breakdown: one column per federation, and the share of the wall spent in the model
    assert "| phase | single adapter | K at the elbow of 1,2,3 | 2 personas, user-level ε=2 |" in table
    assert "model: persona training" in table and "**model forward/backward (all `model:` phases)**" in table
    assert (out / "results.csv").exists() and (out / "rmse_per_round.png").exists()


def test_a_seed_replays_the_same_cohorts_although_flower_draws_new_node_ids(tmp_path):
    """Two runs, same seed, half of the devices sampled a round and half of them each MF round: the same users
    train, so the same item factors and versions come out (Flower's simulation gives nodes random ids each run;
    every draw over devices goes in partition order)."""
    ratings, items, users = make_data(n_users=8, n_items=40, per_user=25, seed=6)
    data_dir = write_grouplens_100k(tmp_path / "ml", ratings, items, users)
    versions, factors = [], []
    for run in ("a", "b"):
        overrides = {"base-model": "tiny", "dataset": str(data_dir), "split": "default", "num-personas": 1,
                     "num-rounds": 2, "fraction-train": 0.4, "eval-every": 5, "kmeans-iters": 2, "lr": 0.01,
                     "personal-steps": 0, "item-stats": True, "validation-fraction": 0.2,
                     "residual-to-bias": True, "item-factors-rounds": 3, "item-factors-fraction": 0.5,
                     "out-dir": str(tmp_path / run / "out"), "device-dir": str(tmp_path / run / "devices")}
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv(KEY_ENV, RawKey.generate().raw.hex())
            run_federation(overrides, num_nodes=8)
        factors.append(dict(np.load(tmp_path / run / "out" / ITEM_FACTORS_FILE)))
        versions.append({p.parent.name + "/" + p.name: load_file(str(p / "adapter_model.safetensors"))
                         for p in sorted((tmp_path / run / "out").glob("personas/p*/r*"))})
    assert sorted(versions[0]) == sorted(versions[1]) and "p0/r0002" in versions[0]
    for key, value in factors[0].items():  # sampled MF rounds asked the same users
        np.testing.assert_allclose(factors[1][key], value, atol=1e-6, err_msg=key)
    for name, arrays in versions[0].items():
        for key, value in arrays.items():
            np.testing.assert_allclose(versions[1][name][key], value, atol=1e-6, err_msg=name)
    assert any(np.abs(v).max() > 1e-4 for v in versions[0]["p0/r0002"].values())  # trained, not just the start
    # Rescored after the fact from the released version, the evaluation users' ratings are what their devices
    # reported (the pooled RMSE is the federation's own), now per user and paired with the baselines.
    from simulations.rescore import rescore, table

    runs = [rescore(tmp_path / run / "out") for run in ("a", "b")]
    for r in runs:
        assert np.sqrt(np.mean((r["persona"] - r["y"]) ** 2)) == pytest.approx(r["reported"], rel=1e-5)
    np.testing.assert_allclose(runs[0]["persona"], runs[1]["persona"], atol=1e-5)
    text = table(runs)
    assert "over the 2 runs" in text and "| vs global mean | vs item bias only |" in text
    # 16 training ratings each (25 x 0.8 x 0.8) are under the cold-start threshold of 20: the cold-start rows
    assert all(r["cold"].all() for r in runs) and "cold-start users only" in text
    cold = rescore(tmp_path / "a" / "out", cold_only=True)  # every user here is cold: the same users, same scores
    np.testing.assert_array_equal(cold["who"], runs[0]["who"])
    np.testing.assert_allclose(cold["persona"], runs[0]["persona"], atol=1e-6)
    assert text.count("(seed 0), cold-start users only") == 2  # all cold: one row per run, not a duplicate
    # users drawn from another split preset of the same train fraction keep their ratings, so their scores;
    # one that would move the users' training ratings is refused
    mixed = rescore(tmp_path / "a" / "out", population="mixed")
    np.testing.assert_allclose(mixed["persona"], runs[0]["persona"], atol=1e-6)
    assert np.isnan(mixed["reported"])
    with pytest.raises(SystemExit, match="train fraction"):
        rescore(tmp_path / "a" / "out", population="paper")
    # Personal fine-tuning of that released adapter, per setting: steps 0 is the persona adapter as rescored, a
    # trained setting moves the predictions, and the chosen setting is the one with the lowest validation RMSE.
    from simulations import personal_tuning
    from simulations.rescore import load_run

    tuned = personal_tuning.tune(load_run(tmp_path / "a" / "out"), steps=[3], lrs=[0.05])
    preds = tuned["pred"]
    assert list(preds) == [personal_tuning.PERSONA, "3 steps at lr 0.05"]
    np.testing.assert_allclose(preds[personal_tuning.PERSONA]["test"], runs[0]["persona"], atol=1e-6)
    assert np.abs(preds["3 steps at lr 0.05"]["test"] - runs[0]["persona"]).max() > 1e-3
    assert len(tuned["y_val"]) == len(preds[personal_tuning.PERSONA]["val"]) > 0
    val_rmse = {k: np.sqrt(np.mean((p["val"] - tuned["y_val"]) ** 2)) for k, p in preds.items()}
    assert personal_tuning.chosen(tuned) == min(val_rmse, key=val_rmse.get)
    assert "(chosen on validation)" in personal_tuning.table(tuned)


def test_repeated_runs_use_other_training_seeds_on_the_same_evaluation_users(tmp_path):
    from simulations.federated import main

    out = tmp_path / "results"
    sets = {"base-model": "tiny", "dataset": str(_main_job_data(tmp_path)), "split": "default", "num-rounds": 1,
            "eval-every": 1, "eval-users": 4, "fraction-train": 0.5, "lr": 0.01, "eval-min-devices": 1,
            "item-factors-rounds": 2, "item-factors-rank": 3}
    main(["--personas", "", "--repeats", "2", "--no-slm-baseline", "--out", str(out)]
         + [a for k, v in sets.items() for a in ("--set", f"{k}={v}")])
    result = json.loads((out / "results.json").read_text())
    runs = result["histories"]["single adapter"]
    assert [h["config"]["seed"] for h in runs] == [0, 1]
    assert {h["evaluate"]["1"]["ratings"] for h in runs} == {result["rows"][0]["test_ratings"]}  # same users
    row = next(r for r in result["rows"] if r["method"] == "single adapter, residual to private MF: persona adapter")
    assert row["repeats"] == 2 and len(row["rmse_runs"]) == 2
    assert row["rmse"] == pytest.approx(np.mean(row["rmse_runs"]))
    assert row["rmse_sd"] == pytest.approx(np.std(row["rmse_runs"], ddof=1))
    assert "| RMSE | RMSE sd (runs) |" in (out / "results.md").read_text()
    assert {p.name for p in out.iterdir() if p.name.startswith("k1")} == {"k1-seed0", "k1-seed1"}


def test_summarise_averages_repeats_and_keeps_each_bucket():
    from simulations.federated import summarise

    def row(rmse, k, activity):
        return {"method": "m: persona adapter", "K": k, "users": 3, "test_ratings": 9, "rmse": rmse, "mae": rmse / 2,
                "wall_s": 10.0 * rmse, "activity": activity}

    (summary,) = summarise([[row(1.0, 2, {"a": 1.0})], [row(2.0, 4, {"a": 3.0, "b": 5.0})]])
    assert summary["rmse"] == 1.5 and summary["mae"] == 0.75 and summary["wall_s"] == 15.0
    assert summary["rmse_sd"] == pytest.approx(np.std([1.0, 2.0], ddof=1)) and summary["K"] == "2/4"
    assert summary["activity"] == {"a": 2.0, "b": 5.0}
    (single,) = summarise([[row(1.0, 2, {"a": 1.0})]])
    assert single["rmse_sd"] is None and single["K"] == 2 and single["repeats"] == 1


def test_persona_runs_start_with_the_single_adapter_unless_skipped_and_refuse_bad_k():
    from simulations.federated import persona_runs

    runs = persona_runs("2,4,8", {})
    assert [(name, k, slug) for name, k, slug, _ in runs] == [
        ("single adapter", 1, "k1"), ("2 personas", 2, "k2"), ("4 personas", 4, "k4"), ("8 personas", 8, "k8")]
    assert all(extra == {"persona-candidates": ""} for *_, extra in runs)
    assert persona_runs("elbow", {})[1][3] == {"persona-candidates": "1,2,4,8"}
    assert [slug for _, _, slug, _ in persona_runs("4", {}, single=False)] == ["k4"]
    assert persona_runs("", {}, single=False) == []  # main() refuses to run nothing
    dp = persona_runs("", {}, epsilons="1, 0.5", dp_k=4, device_noise=0.7)
    assert [(name, k, slug) for name, k, slug, _ in dp[1:]] == [
        ("4 personas, user-level ε=1", 4, "k4-eps1"), ("4 personas, user-level ε=0.5", 4, "k4-eps0.5")]
    assert dp[1][3]["dp-user-target-epsilon"] == 1.0 and dp[1][3]["dp-device-noise"] == 0.7
    assert dp[1][3]["item-factors-rounds"] == 0  # DP rows keep the one-shot bias base
    with pytest.raises(SystemExit, match="integer >= 1"):
        persona_runs("2,x", {})
    with pytest.raises(SystemExit, match="number > 0"):
        persona_runs("2", {}, epsilons="0")


def _history(evaluations: dict[int, tuple[float, float]], users: int = 6) -> dict:
    return {"evaluate": {str(r): {"persona_rmse": a, "personal_rmse": b, "users": users}
                         for r, (a, b) in evaluations.items()}}


BASELINES = [{"method": m, "rmse": v, "users": 6} for m, v in
             [("global mean", 1.15), ("user+item bias", 1.02), ("matrix factorisation", 0.98)]]


def test_a_run_with_one_evaluation_is_plotted_as_bars_of_its_rmse():
    from matplotlib.container import BarContainer

    from simulations.federated import plot

    # --quick: one evaluated round (round 2); a federation repeated twice is drawn at its mean.
    histories = {"single adapter": [_history({2: (1.30, 1.20)}), _history({2: (1.10, 1.00)})],
                 "4 personas": [_history({2: (1.25, 1.15)})]}
    ax = plot(histories, BASELINES).axes[0]
    (bars,) = [c for c in ax.containers if isinstance(c, BarContainer)]
    assert [b.get_width() for b in bars] == pytest.approx([1.15, 1.02, 0.98, 1.20, 1.10, 1.25, 1.15])
    labels = [t.get_text() for t in ax.get_yticklabels()]
    assert labels[0] == "global mean (baseline)" and labels[3] == "single adapter: shared persona adapter"
    assert not ax.lines  # no one-dot lines on a 1.9-2.1 axis
    assert "RMSE" in ax.get_xlabel() and "6 evaluation users" in ax.get_title() and "round 2" in ax.get_title()


def test_a_run_with_several_evaluations_is_plotted_as_lines_over_rounds():
    from simulations.federated import plot

    histories = {"single adapter": [_history({1: (1.3, 1.2), 3: (1.2, 1.1), 5: (1.1, 1.0)})]}
    ax = plot(histories, BASELINES).axes[0]
    assert not ax.containers
    persona, personal, *baselines = ax.lines
    assert list(persona.get_xdata()) == [1, 3, 5] and list(persona.get_ydata()) == pytest.approx([1.3, 1.2, 1.1])
    assert list(personal.get_ydata()) == pytest.approx([1.2, 1.1, 1.0])
    assert [line.get_ydata()[0] for line in baselines] == pytest.approx([1.15, 1.02, 0.98])
    assert "round" in ax.get_xlabel() and "RMSE" in ax.get_ylabel() and "6 evaluation users" in ax.get_title()


def test_devices_keep_what_their_personal_adapter_was_trained_against_for_serving(dp_federation):
    from client.client_app import PERSONAL
    from client.device import SERVING, read_serving_context
    from common.item_stats import ItemStats

    history, out, devices, key = dp_federation
    assert history["serving_blend"] is None
    released = ItemStats.from_arrays(dict(np.load(out / "item_stats.npz")))
    kept = 0
    for node in devices.glob("node-*"):
        store = EncryptedStore(node, key)
        for user in store.users():
            if not store.versions(user, PERSONAL):
                continue
            stats, residual, factors, weight = read_serving_context(store.get_bytes(user, SERVING))
            assert residual and factors is None  # residual-to-bias: on top of the bias model's prior (no MF here)
            assert weight == 1.0  # under DP no blend weight is served (fitted on un-noised sums)
            np.testing.assert_allclose(stats.mean, released.mean, rtol=1e-6)
            assert stats.mu == pytest.approx(released.mu, rel=1e-6)
            kept += 1
    assert kept >= 1


def test_released_item_factors_make_mf_the_private_base_the_adapters_correct(tmp_path):
    """item-factors-rounds: the coordinator learns MF's item half from the devices' gradients, every device fits
    its own user factors, and the private baseline, blend and residual prior are that MF. Recomputed outside the
    federation from the released file and each user's own ratings, the pooled private-base RMSE is the devices'."""
    from common.config import split_preset
    from common.data import load_movielens
    from common.item_factors import ItemFactors, fit_user, predict
    from common.split import temporal_split, validation_split
    from simulations.rescore import rescore

    ratings, items, users = make_data(n_users=6, n_items=40, per_user=30, seed=4)
    data_dir = write_grouplens_100k(tmp_path / "ml", ratings, items, users)
    overrides = {"base-model": "tiny", "dataset": str(data_dir), "split": "default", "num-personas": 1,
                 "num-rounds": 1, "fraction-train": 1.0, "eval-every": 1, "eval-users": 6, "eval-min-devices": 1,
                 "lr": 0.01, "personal-steps": 1, "item-stats": True, "validation-fraction": 0.2,
                 "residual-to-bias": True, "item-factors-rounds": 4, "item-factors-rank": 3,
                 "out-dir": str(tmp_path / "out"), "device-dir": str(tmp_path / "devices")}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(KEY_ENV, RawKey.generate().raw.hex())
        history = run_federation(overrides, num_nodes=6)
    out = tmp_path / "out"
    arrays = dict(np.load(out / "item_factors.npz"))
    released = ItemFactors.from_arrays(arrays)
    assert released.factors.shape[1] == 3 and float(arrays["reg"][0]) == pytest.approx(0.2)
    assert np.abs(released.factors - ItemFactors.initial(len(released.bias), 3, 0).factors).max() > 1e-4  # trained
    data = load_movielens(str(data_dir))
    split = temporal_split(data.ratings, split_preset("default"))
    fit, _ = validation_split(split.train, 0.2)
    sse = n = 0.0
    for user, test in split.test.groupby("user"):
        mine = fit[fit["user"] == user]
        pred = predict(fit_user(mine["item"].to_numpy(), mine["rating"].to_numpy(), released, 0.2), test["item"],
                       released)
        sse, n = sse + float(((pred - test["rating"].to_numpy()) ** 2).sum()), n + len(test)
    final = history["evaluate"][str(max(map(int, history["evaluate"])))]
    np.testing.assert_allclose(final["bias_rmse"], np.sqrt(sse / n), rtol=1e-5)
    # the population centre the devices fit toward is the mean of every device's clipped user half, each fitted to
    # the released item half alone (no rating left a device for it: recomputed here from each user's own ratings)
    from dataclasses import replace
    from common.item_factors import user_half
    halves = [user_half(fit[fit["user"] == u]["item"].to_numpy(), fit[fit["user"] == u]["rating"].to_numpy(),
                        replace(released, centre=None), 0.2) for u in sorted(fit["user"].unique())]
    assert released.centre is not None and np.abs(released.centre).max() > 1e-4
    np.testing.assert_allclose(released.centre, np.mean(halves, axis=0), rtol=1e-4, atol=1e-6)
    manifest = json.loads(next(out.glob("personas/p0/r0001/manifest.json")).read_text())
    assert manifest["serving"]["item_factors"] is True
    # rescored from the released version and factors, the persona adapter scores what the devices reported
    run = rescore(out)
    assert np.sqrt(np.mean((run["persona"] - run["y"]) ** 2)) == pytest.approx(run["reported"], rel=1e-5)
    # `--unclipped-weight`: the validation sums rescore recomputes from the devices' own validation ratings are
    # those the devices sent the coordinator for the stable version, and the weight is their ratio, not capped at 1
    import sqlalchemy as sa
    from simulations.rescore import EVERY_SCORED, PRIVATE_BASE, UNCLIPPED
    from server.registry import PersonaRegistry, blend_sums
    with pytest.raises(SystemExit, match="--unclipped-weight needs --served"):
        rescore(out, unclipped=True)
    registry = PersonaRegistry(out)
    with registry.engine.connect() as conn:
        sums = conn.execute(sa.select(blend_sums).where(blend_sums.c.version == registry.rollout(0)["stable"])).first()
    assert sums is not None and sums.devices == 6 and sums.persona_dd > 0
    served = rescore(out, served=True, unclipped=True)
    (w,) = served["alternative_weights"][UNCLIPPED]
    assert w == pytest.approx(max(0.0, sums.persona_rd / sums.persona_dd), rel=1e-4)
    assert served["alternative_weights"][EVERY_SCORED] == [pytest.approx(w)]  # here every user is evaluated
    base = served[PRIVATE_BASE]
    np.testing.assert_allclose(served[UNCLIPPED], np.clip(base + w * (run["persona"] - base), 1, 5), atol=1e-9)
    np.testing.assert_allclose(served["persona"], base + min(w, 1.0) * (run["persona"] - base), atol=1e-9)


def test_a_run_whose_evaluation_pooled_fewer_users_than_sampled_is_flagged():
    from simulations.federated import missing_evaluations

    history = {"evaluate": {"5": {"users": 11.0}, "10": {"users": 11.0}}}
    assert "11 of 40" in missing_evaluations(history, 40)
    assert missing_evaluations({"evaluate": {"5": {"users": 40.0}}}, 40) is None
    assert missing_evaluations({"evaluate": {}}, 40) is None
    # a count pooled through secure (quantised) sums lands within rounding of the integer, either side
    assert missing_evaluations({"evaluate": {"5": {"users": 39.9999999}}}, 40) is None
    assert "39 of 40" in missing_evaluations({"evaluate": {"5": {"users": 39.0000001}}}, 40)


def test_rows_count_users_and_ratings_pooled_through_secure_sums_to_the_nearest_integer():
    # A secure (quantised) sum's counts land within rounding of the integer, either side: 5.9999999 users are 6.
    from simulations.federated import federated_rows

    last = {"users": 5.9999999, "ratings": 337.9999, "persona_rmse": 1.0, "personal_rmse": 1.1}
    rows = federated_rows("run", 1, {"evaluate": {"2": last}, "seconds": 1.0})
    assert rows and all(r["users"] == 6 and r["test_ratings"] == 338 for r in rows)


@pytest.mark.parametrize("args", [["--served-priors", "5"], ["--served", "--served-priors", "a"],
                                  ["--served", "--served-priors", "inf"], ["--served", "--served-priors", "-1"],
                                  ["--served", "--served-priors", "nan"]])
def test_rescore_refuses_served_priors_that_are_not_finite_numbers_or_come_without_served(args, tmp_path):
    from simulations.rescore import main

    with pytest.raises(SystemExit, match="served-priors"):
        main([str(tmp_path / "no-run"), *args])


def test_rows_of_a_warm_started_run_say_so():
    from common.config import FederationConfig
    from simulations.federated import _target

    assert _target(FederationConfig(residual_to_bias=True, item_stats=True, item_factors_rounds=3,
                                     warm_start="w")) == \
        ", residual to private MF, from the public warm start"
    assert _target(FederationConfig(warm_start="w")) == ", from the public warm start"
    assert _target(FederationConfig(residual_to_bias=True, item_stats=True)) == ", residual to private bias"
