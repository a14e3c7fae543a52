import json

import pandas as pd

from simulations.baselines import main


def test_baseline_table_end_to_end(ml100k_dir, tmp_path, capsys):
    out = tmp_path / "out"
    main(["--dataset", str(ml100k_dir), "--base-model", "tiny", "--slm-users", "5", "--out", str(out)])

    table = pd.read_csv(out / "baselines.csv")
    methods = set(table["method"])
    assert {"global mean", "user+item bias", "matrix factorisation", "SLM vanilla prompting (tiny)"} <= methods
    slm = table[table["method"].str.startswith("SLM")].iloc[0]
    assert slm["users"] == 5 and slm["scope"] == "5-user sample"
    assert 0 < slm["rmse"] < 4 and slm["mae"] <= slm["rmse"]
    # The like-for-like rows score exactly the SLM's test ratings.
    sample_rows = table[table["scope"] == "5-user sample"]
    assert (sample_rows["test_ratings"] == slm["test_ratings"]).all() and len(sample_rows) == 4
    full = table[table["scope"] == "all users"]
    assert (full["users"] == 12).all() and (full["test_ratings"] == 12 * 5).all()
    assert json.loads((out / "baselines.json").read_text())["rows"][0]["method"] == "global mean"
    assert "| SLM vanilla prompting (tiny) |" in capsys.readouterr().out
