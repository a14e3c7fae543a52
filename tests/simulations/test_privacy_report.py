"""The privacy report end to end with the tiny model: two real Flower simulations (no DP, user-level eps 4)."""

import json
import math

from client.keys import KEY_ENV
from simulations.privacy_report import main
from tests.conftest import make_data, write_grouplens_100k


def test_privacy_report_runs_levels_and_reports_both_epsilons_and_the_attack(tmp_path, monkeypatch):
    monkeypatch.setenv(KEY_ENV, "")  # main() sets the devices' store key; restored after the test
    ratings, items, users = make_data(n_users=6, n_items=40, per_user=25, seed=4)
    data_dir = write_grouplens_100k(tmp_path / "ml", ratings, items, users)
    out = tmp_path / "privacy"
    settings = {"base-model": "tiny", "dataset": str(data_dir), "split": "default", "num-rounds": 2,
                "fraction-train": 0.5, "eval-every": 2, "eval-users": 4, "kmeans-iters": 1, "lr": 0.01,
                "eval-min-devices": 1}  # 4 evaluation devices: release their pooled RMSE (default withholds < 5)
    argv = ["--personas", "2", "--epsilons", "4", "--mia-users", "3", "--mia-ratings", "8", "--out", str(out)]
    for k, v in settings.items():
        argv += ["--set", f"{k}={v}"]
    main(argv)

    rows = json.loads((out / "privacy.json").read_text())["rows"]
    plain, private = rows
    assert plain["level"] == "no DP" and math.isinf(float(plain["user_epsilon"]))
    assert math.isinf(float(plain["example_epsilon"]))
    assert 0 < private["user_epsilon"] <= 4.0 and 0 < private["example_epsilon"] < math.inf
    for row in rows:
        assert 0.0 <= row["mia_auc"] <= 1.0 and row["mia_members"] >= 1 and row["mia_non_members"] >= 1
        assert row["persona_rmse"] > 0 and row["personal_rmse"] > 0
    assert (out / "privacy.png").stat().st_size > 0 and "attack AUC" in (out / "privacy.md").read_text()
