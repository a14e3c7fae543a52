import numpy as np
import pytest

from common.metrics import rmse
from common.split import temporal_split
from simulations.classical import Biases, GlobalMean, MatrixFactorization, out_of_fold, tune_mf
from tests.conftest import make_data


def _split():
    ratings, _, _ = make_data(n_users=60, n_items=80, per_user=40, seed=1)
    return temporal_split(ratings)


def _score(model, split):
    return rmse(model.predict(split.test["user"], split.test["item"]), split.test["rating"])


def test_learners_beat_the_mean_on_data_with_structure():
    split = _split()
    mean = _score(GlobalMean().fit(split.train), split)
    bias = _score(Biases().fit(split.train), split)
    mf = _score(tune_mf(split.train), split)
    assert bias < mean - 0.05
    assert mf < bias  # the data has rank-2 user/item interactions the bias model cannot express


def test_predictions_are_clipped_and_cover_unseen_ids():
    split = _split()
    for model in (Biases().fit(split.train), MatrixFactorization(epochs=30).fit(split.train)):
        pred = model.predict([1, 9999, 1], [9999, 1, 2])
        assert np.all((pred >= 1) & (pred <= 5)) and np.isfinite(pred).all()


def test_mf_is_deterministic_given_a_seed():
    split = _split()
    a = MatrixFactorization(epochs=20, seed=3).fit(split.train).predict(split.test["user"], split.test["item"])
    b = MatrixFactorization(epochs=20, seed=3).fit(split.train).predict(split.test["user"], split.test["item"])
    np.testing.assert_array_equal(a, b)


def test_item_bias_ignores_who_is_asking_and_shrinks_rare_movies():
    import pandas as pd
    from simulations.classical import ItemBias

    train = pd.DataFrame({"user": [1, 2, 3, 1, 2], "item": [10, 10, 10, 11, 11], "rating": [5.0, 5.0, 5.0, 1.0, 2.0]})
    model = ItemBias().fit(train)
    a, b = model.predict([1, 99], [10, 10])
    assert a == b  # the same for a known and an unknown user
    mu = train["rating"].mean()
    assert a == pytest.approx(mu + 3 * (5 - mu) / (3 + 10))  # regularised towards the global mean
    assert model.predict([1], [12])[0] == pytest.approx(mu)  # an unseen movie: the global mean


class _Lookup:
    """Remembers each (user, item)'s rating: a model that can only echo rows it was fitted on."""

    def fit(self, train):
        self.seen = {(u, i): r for u, i, r in train[["user", "item", "rating"]].itertuples(index=False)}
        return self

    def predict(self, users, items):
        return np.array([self.seen.get((u, i), np.nan) for u, i in zip(users, items)])


def test_out_of_fold_predicts_every_row_with_a_model_that_never_saw_it():
    ratings, _, _ = make_data(n_users=12, n_items=30, per_user=10, seed=3)
    ratings = ratings.sample(frac=1.0, random_state=0)  # any row order: predictions come back in it
    assert np.isnan(out_of_fold(ratings, lambda part: _Lookup().fit(part), folds=4)).all()
    # and a real model's out-of-fold predictions, in row order, are worse on its own rows than in-sample ones
    oof = out_of_fold(ratings, lambda part: MatrixFactorization(rank=8, reg=0.01, epochs=200, seed=0).fit(part))
    insample = MatrixFactorization(rank=8, reg=0.01, epochs=200, seed=0).fit(ratings).predict(
        ratings["user"].to_numpy(), ratings["item"])
    y = ratings["rating"].to_numpy()
    assert np.isfinite(oof).all() and rmse(oof, y) > rmse(insample, y) + 0.05
