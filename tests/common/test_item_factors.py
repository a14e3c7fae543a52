"""Federated MF: the devices' summed answers are the centralised loss's gradient, the user fit is the ridge
minimum, any input a device holds gives a finite answer of the fixed shape, clipping bounds one user's influence,
and the rounds learn planted low-rank structure that a bias model cannot."""

import math

import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from common.item_factors import (USER_HALF_BOUND, ItemFactors, ItemFactorTrainer, clip, contribution, fit_user, norm,
                                 predict, read_release, release_arrays, user_half, zero_user)
from simulations.classical import Biases

N_ITEMS, RANK = 12, 3


def _model(seed: int = 0) -> ItemFactors:
    rng = np.random.default_rng(seed)
    return ItemFactors(3.4, 0.3 * rng.standard_normal(N_ITEMS), 0.5 * rng.standard_normal((N_ITEMS, RANK)))


def _users(seed: int = 1, n: int = 6):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        items = rng.choice(np.arange(1, N_ITEMS + 1), size=rng.integers(2, N_ITEMS), replace=False)
        out.append((items, rng.integers(1, 6, size=len(items)).astype(float)))
    return out


@pytest.mark.parametrize("prior", [0.0, 7.5])
def test_the_summed_answers_are_the_gradient_of_the_centralised_loss(prior):
    model, reg = _model(), 0.2
    users = _users()
    mu = torch.tensor([model.mu], dtype=torch.float64, requires_grad=True)
    bias = torch.tensor(model.bias, requires_grad=True)
    q = torch.tensor(model.factors, requires_grad=True)
    loss = 0.0
    for items, ratings in users:
        b_u, p_u = fit_user(items, ratings, model, reg, prior)  # the user's half at its optimum, as each device fits it
        i = torch.tensor(items - 1)
        err = mu + b_u + bias[i] + q[i] @ torch.tensor(p_u) - torch.tensor(ratings)
        loss = loss + (err ** 2).sum() + reg * (bias[i] ** 2 + (q[i] ** 2).sum(1)).sum()
    loss.backward()
    total = {"mu": 0, "bias": 0, "factors": 0}
    for items, ratings in users:
        c = contribution(items, ratings, model, reg, prior)
        total = {k: total[k] + c[k] for k in total}
    np.testing.assert_allclose(total["mu"], mu.grad.numpy(), rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(total["bias"], bias.grad.numpy(), rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(total["factors"], q.grad.numpy(), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("prior", [0.0, 4.0])
def test_the_user_fit_is_the_ridge_minimum(prior):
    model, reg = _model(), 0.3
    items, ratings = _users(n=1)[0]
    b_u, p_u = fit_user(items, ratings, model, reg, prior)
    theta = np.concatenate([[b_u], p_u])

    def objective(t):
        err = model.mu + t[0] + model.bias[items - 1] + model.factors[items - 1] @ t[1:] - ratings
        return np.sum(err ** 2) + reg * (len(items) + prior) * np.sum(t ** 2)
    base = objective(theta)
    rng = np.random.default_rng(0)
    for _ in range(20):  # a minimum: every small move costs
        assert objective(theta + 1e-3 * rng.standard_normal(len(theta))) > base


@settings(max_examples=80, deadline=None)
@given(seed=st.integers(0, 10**6), priors=st.lists(st.floats(0.0, 1e4), min_size=2, max_size=2))
def test_a_larger_prior_count_shrinks_the_user_half_toward_the_item_half_alone(seed, priors):
    """The prior only adds penalty: the user's (b_u, p_u) never grows with it, and at a huge prior the user predicts
    what a cold-start user (the zero user) would."""
    model = _model(seed % 7)
    items, ratings = _users(seed, n=1)[0]
    small, large = sorted(priors)
    size = [np.linalg.norm(np.concatenate([[b], p])) for b, p in (fit_user(items, ratings, model, 0.2, c)
                                                                    for c in (small, large))]
    assert size[1] <= size[0] * (1 + 1e-9) + 1e-12
    huge = fit_user(items, ratings, model, 0.2, 1e12)
    np.testing.assert_allclose(predict(huge, items, model), predict((0.0, np.zeros(RANK)), items, model), atol=1e-6)


_values = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-10**6, 10**6).map(float))


@settings(max_examples=150, deadline=None)
@given(items=st.lists(st.integers(-5, N_ITEMS + 5), max_size=40), data=st.data())
def test_any_ratings_give_a_finite_answer_of_the_catalogue_shape(items, data):
    ratings = data.draw(st.lists(_values, min_size=len(items), max_size=len(items)))
    c = contribution(np.array(items, np.int64), np.array(ratings, np.float64), _model(), 0.1)
    assert c["mu"].shape == (1,) and c["bias"].shape == (N_ITEMS,) and c["factors"].shape == (N_ITEMS, RANK)
    assert all(np.isfinite(v).all() for v in c.values())
    rated = {i - 1 for i, r in zip(items, ratings) if 1 <= i <= N_ITEMS and math.isfinite(r)}
    untouched = [i for i in range(N_ITEMS) if i not in rated]
    assert not c["bias"][untouched].any() and not c["factors"][untouched].any()  # nothing about unrated movies
    b_u, p_u = fit_user(np.array(items, np.int64), np.array(ratings, np.float64), _model(), 0.1)
    pred = predict((b_u, p_u), np.array(items, np.int64), _model())
    assert np.isfinite(pred).all() and ((pred >= 1) & (pred <= 5)).all()


def test_a_movie_rated_twice_counts_once_with_its_last_rating():
    model = _model()
    twice = contribution(np.array([3, 5, 3]), np.array([1.0, 4.0, 5.0]), model, 0.1)
    once = contribution(np.array([5, 3]), np.array([4.0, 5.0]), model, 0.1)
    for k in twice:
        np.testing.assert_allclose(twice[k], once[k])


@given(scale=st.floats(1e-6, 1e6), bound=st.floats(1e-3, 1e3))
def test_clipping_bounds_one_users_answer_and_keeps_its_direction(scale, bound):
    c = {k: v * scale for k, v in contribution(*_users(n=1)[0], _model(), 0.1).items()}
    clipped = clip(c, bound)
    assert norm(clipped) <= bound * (1 + 1e-9)
    if norm(c) <= bound:
        for k in c:
            np.testing.assert_array_equal(clipped[k], c[k])
    else:
        ratio = norm(clipped) / norm(c)
        for k in c:
            np.testing.assert_allclose(clipped[k], c[k] * ratio, rtol=1e-9, atol=1e-300)


@settings(max_examples=60, deadline=None)
@given(mu=st.one_of(_values, st.just(3.0)), bias=arrays(np.float64, N_ITEMS, elements=_values),
       extra=st.integers(-1, 1))
def test_a_release_with_a_non_finite_or_misshapen_field_is_refused(mu, bias, extra):
    factors = np.zeros((N_ITEMS + extra, RANK))
    good = math.isfinite(mu) and np.isfinite(bias).all() and extra == 0
    if good:
        restored = ItemFactors.from_arrays({"mu": np.array([mu]), "bias": bias, "factors": factors})
        assert 1.0 <= restored.mu <= 5.0
    else:
        with pytest.raises(ValueError):
            ItemFactors.from_arrays({"mu": np.array([mu]), "bias": bias, "factors": factors})


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 10**6), prior=st.floats(0.0, 50.0), scale=st.floats(0.0, 3.0))
def test_with_a_released_centre_the_user_fit_is_the_ridge_minimum_around_it(seed, prior, scale):
    """The penalty pulls the user half toward the population centre: the fit minimises the ridge objective centred
    there, a huge prior count gives the centre itself, no ratings give the centre, and a zero centre is the old fit."""
    from dataclasses import replace

    rng = np.random.default_rng(seed)
    centre = scale * rng.standard_normal(1 + RANK)
    model, reg = replace(_model(seed % 5), centre=centre), 0.3
    items, ratings = _users(seed, n=1)[0]
    theta = np.concatenate([[(fit := fit_user(items, ratings, model, reg, prior))[0]], fit[1]])

    def objective(t):
        err = model.mu + t[0] + model.bias[items - 1] + model.factors[items - 1] @ t[1:] - ratings
        return np.sum(err ** 2) + reg * (len(items) + prior) * np.sum((t - centre) ** 2)
    base = objective(theta)
    for _ in range(10):
        assert objective(theta + 1e-3 * rng.standard_normal(len(theta))) >= base - 1e-9
    huge = fit_user(items, ratings, model, reg, 1e12)
    np.testing.assert_allclose(np.concatenate([[huge[0]], huge[1]]), centre, atol=1e-6)
    b, p = zero_user(model)
    np.testing.assert_array_equal(np.concatenate([[b], p]), centre)
    b, p = fit_user(np.array([], np.int64), np.array([]), model, reg, prior)
    np.testing.assert_array_equal(np.concatenate([[b], p]), centre)
    plain = fit_user(items, ratings, replace(model, centre=np.zeros(1 + RANK)), reg, prior)
    old = fit_user(items, ratings, replace(model, centre=None), reg, prior)
    np.testing.assert_allclose(plain[1], old[1])
    assert plain[0] == pytest.approx(old[0])


@settings(max_examples=60, deadline=None)
@given(items=st.lists(st.integers(-5, N_ITEMS + 5), max_size=30), data=st.data())
def test_a_devices_user_half_answer_is_bounded_finite_and_zero_without_ratings(items, data):
    ratings = data.draw(st.lists(_values, min_size=len(items), max_size=len(items)))
    half = user_half(np.array(items, np.int64), np.array(ratings, np.float64), _model(), 0.05)
    assert half.shape == (1 + RANK,) and np.isfinite(half).all()
    assert np.linalg.norm(half) <= USER_HALF_BOUND * (1 + 1e-9)
    if not any(1 <= i <= N_ITEMS and math.isfinite(r) for i, r in zip(items, ratings)):
        assert not half.any()
    else:
        b, p = fit_user(np.array(items, np.int64), np.array(ratings, np.float64), _model(), 0.05)
        whole = np.concatenate([[b], p])
        np.testing.assert_allclose(half, whole * min(1.0, USER_HALF_BOUND / np.linalg.norm(whole)), atol=1e-12)


@settings(max_examples=60, deadline=None)
@given(centre=arrays(np.float64, st.integers(0, RANK + 2), elements=st.floats(width=32)))  # released as float32
def test_a_released_centre_travels_with_the_item_half_and_a_bad_one_is_refused(centre):
    from dataclasses import replace

    arrays_ = {**_model().to_arrays(), "centre": centre, "reg": np.array([0.2]), "prior": np.array([5.0])}
    if centre.shape == (1 + RANK,) and np.isfinite(centre).all():
        model, reg, prior = read_release(arrays_)
        np.testing.assert_array_equal(model.centre, centre)
        again, *_ = read_release(release_arrays(model, reg, prior))  # stored and sent as float32
        np.testing.assert_array_equal(again.centre, centre.astype(np.float32))
    else:
        with pytest.raises(ValueError, match="centre"):
            read_release(arrays_)
    old, *_ = read_release({k: v for k, v in arrays_.items() if k != "centre"})  # a release made before it
    assert old.centre is None and "centre" not in release_arrays(old, 0.2)
    assert "centre" in release_arrays(replace(old, centre=np.zeros(1 + RANK)), 0.2)


def test_round_trip_through_arrays():
    model = _model()
    back = ItemFactors.from_arrays(model.to_arrays())
    np.testing.assert_allclose(back.factors, model.factors, rtol=1e-6)
    np.testing.assert_allclose(back.bias, model.bias, rtol=1e-6, atol=1e-7)


def test_rounds_learn_planted_low_rank_taste_a_bias_model_misses():
    """Two groups of users with opposite tastes over two groups of movies: no bias can say that, MF can."""
    rng = np.random.default_rng(0)
    n_items, rows = 40, []
    taste = np.where(np.arange(n_items) < 20, 1.0, -1.0)
    for u in range(120):
        sign = 1.0 if u % 2 else -1.0
        items = rng.choice(np.arange(1, n_items + 1), size=25, replace=False)
        ratings = np.clip(np.round(3 + 1.0 * sign * taste[items - 1] + 0.3 * rng.standard_normal(25)), 1, 5)
        rows += [(u, i, r) for i, r in zip(items, ratings)]
    df = pd.DataFrame(rows, columns=["user", "item", "rating"])
    held = df.groupby("user").tail(5)
    fit = df.drop(held.index)
    devices = [(g["item"].to_numpy(), g["rating"].to_numpy()) for _, g in fit.groupby("user")]
    trainer = ItemFactorTrainer(ItemFactors.initial(n_items, 2, seed=0), lr=0.05)
    for _ in range(60):
        total = None
        for items, ratings in devices:
            c = contribution(items, ratings, trainer.model, 0.05)
            total = c if total is None else {k: total[k] + c[k] for k in total}
        trainer.step(total, float(len(fit)))
    pred = np.concatenate([predict(fit_user(*devices[u], trainer.model, 0.05), g["item"].to_numpy(), trainer.model)
                           for u, (_, g) in enumerate(held.groupby("user"))])
    y = np.concatenate([g["rating"].to_numpy() for _, g in held.groupby("user")])
    bias = Biases().fit(fit).predict(held.sort_values("user")["user"].to_numpy(), held.sort_values("user")["item"])
    mf_rmse = float(np.sqrt(np.mean((pred - y) ** 2)))
    bias_rmse = float(np.sqrt(np.mean((bias - held.sort_values("user")["rating"].to_numpy()) ** 2)))
    assert mf_rmse < 0.5 < 0.9 < bias_rmse


def test_a_rounds_cohort_is_a_share_of_the_devices_never_one_and_never_more_than_all():
    import pytest
    from hypothesis import given, settings
    from hypothesis import strategies as st

    from common.item_factors import cohort_size

    @settings(max_examples=300, deadline=None)
    @given(devices=st.integers(2, 10 ** 6), fraction=st.floats(1e-9, 1.0))
    def share(devices, fraction):
        size = cohort_size(devices, fraction)
        assert 2 <= size <= devices and size >= fraction * devices - 1e-6
        assert size == 2 or size - 1 < fraction * devices + 1e-6  # no more than the share asks, rounded up

    share()
    assert cohort_size(943, 1.0) == 943 and cohort_size(943, 0.25) == 236 and cohort_size(1, 0.5) == 1
    for bad in (0.0, -0.5, 1.5, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="fraction"):
            cohort_size(10, bad)
