"""The breakdown of per-rating predictions by the user's and the movie's training-rating counts."""

import numpy as np
import pandas as pd
import pytest

from simulations.breakdown import ITEM_BUCKETS, USER_BUCKETS, bucket_table, main, markdown
from simulations.rescore import PRIVATE_BASE


def _frame(seed: int = 0) -> pd.DataFrame:
    """Two runs over 40 users: the prediction is the truth for heavy users (160+ training ratings) and the base
    plus noise for light ones (20-39), so the breakdown must find the adapter paying only for the heavy ones."""
    rng = np.random.default_rng(seed)
    rows = []
    for run in ("a", "b"):
        for user in range(40):
            heavy = user % 2 == 0
            for item in range(5):
                y = float(rng.integers(1, 6))
                base = y + rng.normal(0, 0.8)
                pred = y if heavy else base + rng.normal(0, 0.5)
                rows.append({"run": run, "user": user, "item": item, "rating": y, "item_ratings": 30 + item,
                             "user_ratings": 200 if heavy else 25, "prediction": pred, PRIVATE_BASE: base,
                             "matrix factorisation": base})
    return pd.DataFrame(rows)


def test_buckets_show_where_the_adapter_pays_and_the_weight_test_would_pick():
    frame = _frame()
    rows = {r["bucket"]: r for r in bucket_table(frame, "user_ratings", USER_BUCKETS)}
    assert set(rows) == {"20-39", "160+"}
    heavy, light = rows["160+"], rows["20-39"]
    assert heavy["users"] == light["users"] == 20 and heavy["ratings"] == light["ratings"] == 100  # per run
    assert heavy["rmse"] == pytest.approx(0.0) and heavy["vs_base"][2] < 0 and all(v < 0 for v in heavy["per_run"])
    assert heavy["test_weight"] == pytest.approx(1.0)  # the prediction is the truth: the full weight
    assert light["vs_base"][1] > 0 and light["test_weight"] < 0.5  # noise on the base: worse, little weight
    part = frame[frame["user_ratings"] == 25]
    assert light["base_rmse"] == pytest.approx(np.mean([np.sqrt(((g[PRIVATE_BASE] - g["rating"]) ** 2).mean())
                                                        for _, g in part.groupby("run")]))
    # every rating falls in one movie bucket here (30-34 training ratings)
    (one,) = bucket_table(frame, "item_ratings", ITEM_BUCKETS)
    assert one["bucket"] == "25-49" and one["ratings"] == 200
    assert "| 160+ | 100 | 20 | 0.0000 |" in markdown(list(rows.values()), "user's training ratings")


def test_main_reads_the_rescore_csv_and_refuses_one_without_a_private_base(tmp_path, capsys):
    path = tmp_path / "pred.csv"
    _frame().to_csv(path, index=False)
    main([str(path)])
    out = capsys.readouterr().out
    assert "2 runs, 200 ratings of 40 users each" in out and "| movie's training ratings |" in out
    _frame().drop(columns=[PRIVATE_BASE]).to_csv(path, index=False)
    with pytest.raises(SystemExit, match="private base"):
        main([str(path)])
