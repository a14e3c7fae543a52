"""The federated-MF measurement runs end to end, tunes on validation only, and orders its rows as noise says."""

import json
import math

from simulations.item_factors import main


def test_item_factors_table_end_to_end(ml100k_dir, tmp_path, capsys):
    out = tmp_path / "out"
    result = main(["--dataset", str(ml100k_dir), "--split", "default", "--epsilons", "inf,0.5", "--seeds", "0,1",
                   "--rank", "4", "--regs", "0.1,0.4", "--priors", "0,30", "--rounds", "20", "--round-grid", "5,10",
                   "--eval-users", "0", "--out", str(out)])
    assert json.loads((out / "table.json").read_text())["test_ratings"] == result["test_ratings"] > 0
    rows = {r["epsilon"]: r for r in result["rows"] if r["epsilon"] is not None}
    free, noisy = rows[math.inf], rows[0.5]
    assert len(free["rmse"]) == len(noisy["rmse"]) == 2
    assert set(free["reg"]) <= {0.1, 0.4} and all(1 <= t <= 20 for t in free["rounds"])
    assert set(free["prior"]) <= {0.0, 30.0}
    # DP reuses the noise-free penalty and prior count
    assert set(noisy["rounds"]) <= {5, 10} and noisy["reg"] == free["reg"] and noisy["prior"] == free["prior"]
    assert noisy["noise_multiplier"] > 1
    assert max(free["rmse"]) < min(noisy["rmse"])  # a release at eps 0.5 over its rounds is mostly noise
    assert all(len(d) == 3 and d[1] <= d[0] <= d[2] for d in free["diff_vs_mf"])
    assert "paired MSE diff vs classical MF" in capsys.readouterr().out
