"""The public warm start: trained only on users outside the federation's split, saved as a PEFT adapter the
coordinator can start every persona from, with a check against MF on those users' held-out ratings."""

import json

import numpy as np
import pandas as pd
import pytest

from common.adapters import adapter_arrays, adapter_digest, add_lora, load_saved_adapter
from common.config import FederationConfig, split_preset
from common.model import load_base_model
from common.split import temporal_split
from simulations.warm_start import ADAPTER_DIR, REPORT, main, public_ratings


def test_public_ratings_are_every_rating_of_the_users_the_split_leaves_out():
    rng = np.random.default_rng(0)
    counts = {1: 120, 2: 30, 3: 150, 4: 250, 5: 99, 6: 100}  # the paper split keeps 100-200 ratings: 1, 3 and 6
    ratings = pd.DataFrame([{"user": u, "item": i + 1, "rating": float(rng.integers(1, 6)), "ts": i}
                            for u, n in counts.items() for i in range(n)])
    public = public_ratings(ratings, "paper")
    inside = set(temporal_split(ratings, split_preset("paper")).users)
    assert inside == {1, 3, 6} and set(public["user"]) == {2, 4, 5}
    assert len(public) == sum(n for u, n in counts.items() if u not in inside)  # all of theirs, nothing else


def test_warm_start_end_to_end_gives_an_adapter_the_federation_accepts(ml100k_dir, tmp_path, capsys):
    """On the synthetic data the paper split keeps nobody, so every user is public. The adapter is the
    federation's LoRA shape (the coordinator's loader takes it), has learned something (B is no longer zero), and
    the report's digest is the saved weights'."""
    from server.server_app import initial_adapter

    out = tmp_path / "warm"
    main(["--dataset", str(ml100k_dir), "--split", "paper", "--base-model", "tiny", "--steps", "3",
          "--check-users", "4", "--out", str(out)])
    report = json.loads((out / REPORT).read_text())
    model = add_lora(load_base_model("tiny")[0], FederationConfig().lora)
    saved = load_saved_adapter(model, out / ADAPTER_DIR)
    assert report["digest"] == adapter_digest(saved) and set(saved) == set(adapter_arrays(model))
    assert any(np.abs(v).max() > 0 for k, v in saved.items() if "lora_B" in k)
    check = report["check"]
    assert check["users"] == 4 and check["ratings"] > 0
    assert 0 < check["adapter_rmse"] < 4 and 0 < check["mf_rmse"] < 4 and len(check["adapter_vs_mf"]) == 3
    arrays, warm = initial_adapter(FederationConfig(base_model="tiny", warm_start=str(out / ADAPTER_DIR)))
    assert warm["digest"] == report["digest"] and all(np.array_equal(arrays[k], saved[k]) for k in saved)
    assert "held-out ratings" in capsys.readouterr().out


def test_a_split_that_keeps_every_user_leaves_nothing_public(ml100k_dir, tmp_path):
    with pytest.raises(SystemExit, match="no public user"):
        main(["--dataset", str(ml100k_dir), "--split", "default", "--base-model", "tiny", "--steps", "1",
              "--out", str(tmp_path / "w")])
