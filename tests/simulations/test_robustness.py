"""The robustness experiment end to end with the tiny model: real Flower simulations with simulated attackers
and dropouts."""

import json

from simulations.adversaries import uniform
from simulations.robustness import main
from tests.conftest import make_data, write_grouplens_100k


def test_median_resists_a_sign_flip_attack_that_drags_the_mean_and_dropouts_are_survived(tmp_path):
    ratings, items, users = make_data(n_users=8, n_items=40, per_user=25, seed=5)
    data_dir = write_grouplens_100k(tmp_path / "ml", ratings, items, users)
    assert sum(uniform("malicious", 0, i) < 0.25 for i in range(8)) == 2  # two of eight devices attack
    out = tmp_path / "robust"
    settings = {"base-model": "tiny", "dataset": str(data_dir), "split": "default", "num-rounds": 2,
                "fraction-train": 1.0, "eval-every": 2, "eval-users": 4, "kmeans-iters": 1, "lr": 0.01,
                "personal-steps": 0, "eval-min-devices": 1}  # 4 evaluation devices: release their pooled RMSE
    argv = ["--poison-fraction", "0.25", "--poison-scale", "100", "--dropout", "0.3", "--out", str(out),
            "--scenarios", "clean,mean,median,norm-bound,dropout"]
    for k, v in settings.items():
        argv += ["--set", f"{k}={v}"]
    main(argv)

    clean, mean, median, bound, drop = json.loads((out / "robustness.json").read_text())["rows"]
    assert "median" in median["scenario"] and "norm bound" in bound["scenario"] and "dropout" in drop["scenario"]
    assert clean["updates_aggregated"] == mean["updates_aggregated"] == 16  # 8 devices x 2 rounds, none refused
    # Two attackers at -100x drag the plain mean far from where honest training goes; the median stays close.
    assert mean["adapter_drift"] > 10 * clean["adapter_drift"]
    assert median["adapter_drift"] < 3 * clean["adapter_drift"]
    # The norm bound (2x the largest clean update) refuses exactly the attackers' updates.
    assert bound["rejected"] == 4 and bound["updates_aggregated"] == 12
    assert bound["adapter_drift"] < 3 * clean["adapter_drift"]
    # About 30% of the sampled devices fail each round; both rounds still release and evaluate.
    assert 0 < drop["updates_aggregated"] < 16 and drop["persona_rmse"] > 0
    assert (out / "robustness.png").stat().st_size > 0 and "median" in (out / "robustness.md").read_text()
