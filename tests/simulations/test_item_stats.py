"""The private item-statistics measurement runs end to end and orders its rows as noise says it must."""

import json
import math

from simulations.item_stats import main


def test_item_stats_table_end_to_end(ml100k_dir, tmp_path, capsys):
    out = tmp_path / "out"
    result = main(["--dataset", str(ml100k_dir), "--split", "default", "--epsilons", "inf,8,0.5",
                   "--seeds", "0,1,2", "--eval-users", "0", "--out", str(out)])
    assert json.loads((out / "table.json").read_text())["test_ratings"] == result["test_ratings"] > 0
    rows = {(r["method"], r["epsilon"]): r for r in result["rows"]}
    private = "user+item bias (private release + on-device user bias)"
    assert len(rows[(private, math.inf)]["rmse"]) == 1 and len(rows[(private, 8.0)]["rmse"]) == 3
    # more noise, worse statistics: the noise-free release beats the eps-0.5 one on every draw
    assert max(rows[(private, math.inf)]["rmse"]) < min(rows[(private, 0.5)]["rmse"])
    assert all(len(d) == 3 and d[1] <= d[0] <= d[2] for d in rows[(private, 8.0)]["diff_vs_classical"])
    assert "paired MSE diff vs classical bias" in capsys.readouterr().out
