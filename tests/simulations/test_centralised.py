"""The centralised upper bound trains the adapter and compares it with the baselines on the same users."""

import json

import numpy as np
import pytest
import pandas as pd

from common.model import tiny_tokenizer
from common.prompt import PromptBuilder, item_stats, item_stats_text
from simulations.centralised import main, movie_prompts


def test_item_stats_come_from_training_ratings_only_and_reach_the_prompt():
    train = pd.DataFrame({"user": [1, 2, 3], "item": [7, 7, 8], "rating": [4.0, 5.0, 2.0]})
    stats = item_stats(train)
    assert item_stats_text(7, stats) == "Other users rated it 4.5/5 on average (2 ratings)."
    assert item_stats_text(8, stats) == "Other users rated it 2.0/5 on average (1 rating)."
    assert item_stats_text(9, stats) == "No other user has rated it yet."
    items = pd.DataFrame({"title": ["A", "B"], "year": pd.array([1990, 1991], "Int64"), "genres": [("Drama",), ()]},
                         index=pd.Index([7, 8], name="item"))
    tok = tiny_tokenizer()
    builder = PromptBuilder(tok)
    with_stats, plain = movie_prompts(items, builder, stats), movie_prompts(items, builder, None)
    assert "4.5/5" in tok.decode(with_stats[7]) and "4.5/5" not in tok.decode(plain[7])


def test_centralised_run_end_to_end(ml100k_dir, tmp_path, capsys):
    out = tmp_path / "out"
    main(["--dataset", str(ml100k_dir), "--split", "default", "--base-model", "tiny", "--steps", "4",
          "--eval-users", "6", "--seeds", "0,1", "--item-stats", "--eval-at", "2", "--out", str(out)])
    result = json.loads((out / "slm-item-stats.json").read_text())
    methods = [r["method"] for r in result["table"]]
    assert methods == ["global mean", "user+item bias", "matrix factorisation", "centralised SLM adapter + item stats"]
    assert result["users"] == 6 and len(result["runs"]) == 2
    for run in result["runs"]:
        pred = np.array(run["pred"])
        assert len(pred) == result["test_ratings"] and np.all((pred >= 1) & (pred <= 5))
    # a learning curve: scored after step 2 and at the end (step 4), and the end point is the reported prediction
    assert sorted(run["rmse_by_step"]) == ["2", "4"]
    assert all(0 < v < 4 for v in run["rmse_by_step"].values())
    # two seeds train two different adapters
    assert not np.allclose(result["runs"][0]["pred"], result["runs"][1]["pred"])
    assert "paired MSE diff vs user+item bias" in capsys.readouterr().out


def test_validation_comes_from_training_ratings_and_tunes_the_blend(ml100k_dir, tmp_path):
    from common.split import validation_split
    from simulations.centralised import blend_weight

    train = pd.DataFrame({"user": [1] * 10 + [2] * 3, "item": list(range(10)) + [1, 2, 3],
                          "rating": [3.0] * 13, "ts": list(range(10)) + [5, 6, 7]})
    fit, val = validation_split(train, 0.2)
    # user 1's two latest ratings validate; user 2 (fewer than 5) keeps all of its ratings for fitting
    assert sorted(val["item"]) == [8, 9] and set(val["user"]) == {1} and len(fit) + len(val) == len(train)
    y = np.array([1.0, 2.0, 3.0, 4.0])
    assert blend_weight(y, np.full(4, 2.5), y) == 1.0 and blend_weight(np.full(4, 2.5), y, y) == 0.0
    out = tmp_path / "out"
    main(["--dataset", str(ml100k_dir), "--split", "default", "--base-model", "tiny", "--steps", "2",
          "--eval-users", "6", "--seeds", "0", "--item-stats", "--val-fraction", "0.2", "--out", str(out)])
    result = json.loads((out / "slm-item-stats.json").read_text())
    blended = result["table"][-1]
    assert "blended with user+item bias" in blended["method"] and len(blended["diff_vs_mf"]) == 1
    for run in result["runs"]:
        w = run["blend_weight"]
        assert 0 <= w <= 1 and len(run["val_pred"]) > 0
        bias = np.array(run["blend_pred"]) - w * np.array(run["pred"])  # (1 - w) x the bias prediction
        assert np.all(np.isfinite(bias))
    assert "over seeds vs MF" in (out / "slm-item-stats.md").read_text()
    # a second seed later, pooled with the first: two runs, each blend refitted from its validation predictions
    main(["--dataset", str(ml100k_dir), "--split", "default", "--base-model", "tiny", "--steps", "2",
          "--eval-users", "6", "--seeds", "1", "--item-stats", "--val-fraction", "0.2", "--out", str(tmp_path / "o2"),
          "--with-runs", str(out / "slm-item-stats.json")])
    pooled = json.loads((tmp_path / "o2" / "slm-item-stats.json").read_text())
    assert [r["seed"] for r in pooled["runs"]] == [0, 1] and pooled["runs"][0]["pred"] == result["runs"][0]["pred"]
    assert len(pooled["table"][-1]["diff_vs_mf"]) == 2
    with pytest.raises(SystemExit, match="other settings"):
        main(["--dataset", str(ml100k_dir), "--split", "default", "--base-model", "tiny", "--steps", "3",
              "--eval-users", "6", "--seeds", "2", "--item-stats", "--val-fraction", "0.2",
              "--out", str(tmp_path / "o3"), "--with-runs", str(out / "slm-item-stats.json")])


def test_a_residual_run_trains_a_correction_to_user_bias_and_is_not_pooled_with_a_plain_one(ml100k_dir, tmp_path):
    common = ["--dataset", str(ml100k_dir), "--split", "default", "--base-model", "tiny", "--steps", "2",
              "--eval-users", "6", "--seeds", "0", "--item-stats", "--val-fraction", "0.2"]
    main([*common, "--residual", "--out", str(tmp_path / "res")])
    main([*common, "--out", str(tmp_path / "plain")])
    residual = json.loads((tmp_path / "res" / "slm-item-stats-residual.json").read_text())
    plain = json.loads((tmp_path / "plain" / "slm-item-stats.json").read_text())
    assert "residual to user+item bias" in residual["table"][3]["method"]
    # the same LoRA start and training rows; the prior changes every prediction, and keeps them near the bias model
    bias_rmse = residual["table"][1]["rmse"]
    assert not np.allclose(residual["runs"][0]["pred"], plain["runs"][0]["pred"], atol=1e-3)
    assert abs(residual["table"][3]["rmse"] - bias_rmse) < abs(plain["table"][3]["rmse"] - bias_rmse)
    with pytest.raises(SystemExit, match="residual"):
        main([*common, "--seeds", "1", "--out", str(tmp_path / "o"), "--with-runs",
              str(tmp_path / "res" / "slm-item-stats-residual.json")])


def test_a_residual_to_mf_run_corrects_and_blends_with_mf_and_is_not_pooled_with_a_bias_one(ml100k_dir, tmp_path):
    common = ["--dataset", str(ml100k_dir), "--split", "default", "--base-model", "tiny", "--steps", "2",
              "--eval-users", "6", "--seeds", "0", "--item-stats", "--val-fraction", "0.2", "--residual"]
    main([*common, "--residual-base", "mf", "--out", str(tmp_path / "mf")])
    result = json.loads((tmp_path / "mf" / "slm-item-stats-residual-mf.json").read_text())
    methods = [r["method"] for r in result["table"]]
    assert "residual to matrix factorisation" in methods[3] and "blended with matrix factorisation" in methods[4]
    # the blend is w x adapter + (1 - w) x MF's prediction (MF refitted here on the same training ratings)
    from common.config import split_preset
    from common.data import load_movielens
    from common.split import sample_users, temporal_split, validation_split
    from simulations.classical import tune_mf

    split = temporal_split(load_movielens(str(ml100k_dir)).ratings, split_preset("default"))
    train, _ = validation_split(split.train, 0.2)
    test = split.test[split.test["user"].isin(sample_users(split.users, 6, 0))].reset_index(drop=True)
    mf = tune_mf(train, seed=0).predict(test["user"].to_numpy(), test["item"])
    run = result["runs"][0]
    w = run["blend_weight"]
    np.testing.assert_allclose(run["blend_pred"], w * np.array(run["pred"]) + (1 - w) * mf, atol=1e-6)
    with pytest.raises(SystemExit, match="residual_base"):
        main([*common, "--seeds", "1", "--out", str(tmp_path / "o"), "--with-runs",
              str(tmp_path / "mf" / "slm-item-stats-residual-mf.json")])
