import numpy as np
import pandas as pd
import pytest

from common.config import SplitConfig, split_preset
from common.split import sample_users, temporal_split


def test_each_users_test_ratings_are_their_newest(raw_data):
    ratings = raw_data[0]
    split = temporal_split(ratings, SplitConfig(train_frac=0.8))
    for user, test in split.test.groupby("user"):
        train = split.train[split.train["user"] == user]
        assert train["ts"].max() <= test["ts"].min()
        n = len(train) + len(test)
        assert len(train) == int(np.floor(0.8 * n))
    assert len(split.train) + len(split.test) == len(ratings)


def test_split_ignores_file_order(raw_data):
    ratings = raw_data[0]
    a = temporal_split(ratings)
    b = temporal_split(ratings.sample(frac=1.0, random_state=3))
    assert a.test.equals(b.test) and a.train.equals(b.train)


def test_paper_preset_filters_by_activity(raw_data):
    ratings = raw_data[0]
    heavy = ratings[ratings["user"] <= 3]
    extra = heavy.assign(item=heavy["item"] + 1000, ts=heavy["ts"] + 10**6)
    many = pd.concat([ratings] + [extra.assign(item=extra["item"] + 100 * k) for k in range(4)])
    split = temporal_split(many, split_preset("paper"))  # users 1-3 have 125 ratings, the rest 25
    assert sorted(split.users) == [1, 2, 3]
    counts = split.train.groupby("user").size()
    assert (counts == 75).all()  # 60% of 125


def test_a_user_sample_keeps_whole_users_and_is_fixed(raw_data):
    ratings = raw_data[0]
    n_users = ratings["user"].nunique()
    cfg = SplitConfig(users=n_users // 2)
    a, b = temporal_split(ratings, cfg), temporal_split(ratings.sample(frac=1.0, random_state=1), cfg)
    assert len(a.users) == n_users // 2 and a.test.equals(b.test) and a.train.equals(b.train)
    kept = ratings[ratings["user"].isin(a.users)]
    assert len(a.train) + len(a.test) == len(kept)  # every rating of a sampled user, none of the others
    assert len(temporal_split(ratings, SplitConfig(users=10 * n_users)).users) == n_users
    assert split_preset("mixed").users == 240


def test_bad_configs():
    with pytest.raises(ValueError):
        SplitConfig(train_frac=1.0)
    with pytest.raises(ValueError, match="users must be"):
        SplitConfig(users=0)
    with pytest.raises(ValueError, match="unknown split preset"):
        split_preset("nope")


def test_user_sample_is_fixed_by_the_seed():
    users = np.arange(100)
    assert (sample_users(users, 10, 0) == sample_users(users, 10, 0)).all()
    assert not (sample_users(users, 10, 0) == sample_users(users, 10, 1)).all()
    assert len(sample_users(users, None, 0)) == 100
