import numpy as np
import pytest

from client.device import Device, runtime
from common.personas import FeatureSpace
from common.adapters import adapter_arrays
from common.config import LoraSettings, PromptConfig
from common.data import load_movielens
from common.prompt import title_year
from common.split import temporal_split


def _device(ml100k_dir, user=1):
    data = load_movielens(ml100k_dir)
    split = temporal_split(data.ratings)
    rt = runtime("tiny", LoraSettings(rank=4))
    return Device(user, data, split.train[split.train["user"] == user], split.test[split.test["user"] == user], rt)


def test_training_targets_leave_out_movies_quoted_in_the_profile(ml100k_dir):
    device = _device(ml100k_dir)
    suffixes, ratings = device.train_examples
    assert len(suffixes) == device.n_train - PromptConfig().recent_items
    recent = device.train.sort_values("ts").tail(PromptConfig().recent_items)["item"]
    quoted = {tuple(device._suffixes([i])[0]) for i in recent}
    assert not quoted & {tuple(s) for s in suffixes}


def test_error_sums_match_predictions(ml100k_dir):
    device = _device(ml100k_dir)
    arrays = adapter_arrays(device.rt.model)
    pred = device.predict(arrays)
    _, true = device.test_examples
    errors = device.errors(arrays)
    assert errors["n"] == len(true) == len(device.test)
    np.testing.assert_allclose(errors["sse"], ((pred - true) ** 2).sum())
    np.testing.assert_allclose(errors["sae"], np.abs(pred - true).sum())


def test_onboarding_answers_come_from_the_users_own_data(ml100k_dir):
    device = _device(ml100k_dir, user=2)
    answers = device.onboarding()
    assert (answers.age, answers.gender, answers.occupation) == (21, "M", "engineer")
    space = FeatureSpace.of(device.data)
    assert set(answers.liked_genres) <= set(space.genres) and len(answers.liked_genres) <= 3
    assert space.encode(answers).sum() == 3 + len(answers.liked_genres)


def test_long_term_memory_recalls_other_past_ratings_into_each_movie_prompt(ml100k_dir):
    plain = _device(ml100k_dir)
    device = Device(plain.user, plain.data, plain.train, plain.test, plain.rt, memory_items=3)
    tok = device.rt.tokenizer
    with_memory, ratings = device.train_examples
    assert len(with_memory) == len(plain.train_examples[0]) and (ratings == plain.train_examples[1]).all()
    for suffix, base in zip(with_memory, plain.train_examples[0]):
        text = tok.decode(suffix)
        assert "Similar movies they rated:" in text and len(suffix) > len(base)
        assert text.count("/5") == 3
    # a training target never quotes its own rating: its title appears once, as the movie being rated
    for item in device.train["item"].iloc[:5]:
        quoted = title_year(device.data.items.loc[item]) + ":"
        assert quoted not in tok.decode(device._suffixes([item])[0])
    assert not np.allclose(device.predict(adapter_arrays(device.rt.model)),
                           plain.predict(adapter_arrays(plain.rt.model)))


def test_dp_records_are_keyed_by_the_devices_own_item_ids(ml100k_dir):
    """Device DP hashes each training example's item id into its record: the ids must line up with the examples."""
    from common.training import hashed_records

    device = _device(ml100k_dir)
    suffixes, _ = device.train_examples
    items = device.train_items
    assert len(items) == len(suffixes)
    assert [tuple(s) for s in device._suffixes(items)] == [tuple(s) for s in suffixes]
    records = hashed_records(items, 16, str(device.user).encode())
    # one more rating (a movie the user has not rated) leaves every existing example in its record
    new_item = next(i for i in device.data.items.index if i not in set(items))
    grown = hashed_records(list(items) + [new_item], 16, str(device.user).encode())
    assert sum(a != b for a, b in zip(records, grown)) == 1


def test_evaluation_sums_add_the_private_bias_and_blend_sums_only_with_statistics_and_validation(ml100k_dir):
    from common import blend
    from common.item_stats import ItemStats, predict, user_bias
    from common.split import validation_split

    data = load_movielens(ml100k_dir)
    split = temporal_split(data.ratings)
    fit, val = validation_split(split.train[split.train["user"] == 1], 0.2)
    rt = runtime("tiny", LoraSettings(rank=4))
    device = Device(1, data, fit, split.test[split.test["user"] == 1], rt, val=val)
    arrays = adapter_arrays(rt.model)
    plain = device.evaluation_sums({"persona": arrays})
    assert set(plain) == {"n", "persona_sse", "persona_sae"}  # no release yet: nothing to blend with
    n_items = int(data.items.index.max())
    rng = np.random.default_rng(0)
    stats = ItemStats(rng.uniform(2, 4.5, n_items), rng.integers(0, 50, n_items).astype(float), 3.4)
    sums = device.use_item_stats(stats).evaluation_sums({"persona": arrays})
    b_user = user_bias(fit["item"].to_numpy(), fit["rating"].to_numpy(), stats)
    for held_out, rows in (("test", device.test), ("val", val)):
        bias = predict(b_user, rows["item"].to_numpy(), stats)
        expect = blend.residual_sums(device.predict(arrays, held_out), bias, rows["rating"].to_numpy())
        assert sums[f"persona_{held_out}_rd"] == pytest.approx(expect["rd"])
        assert sums[f"persona_{held_out}_dd"] == pytest.approx(expect["dd"])
        if held_out == "test":
            assert sums["bias_sse"] == pytest.approx(expect["rr"])
    assert sums["n_val"] == len(val) > 0 and sums["n"] == len(device.test)
    assert not set(val["item"]) & set(device.train["item"])  # validation ratings never train


def test_a_residual_device_trains_and_predicts_a_correction_to_its_private_bias_model(ml100k_dir):
    from dataclasses import replace as with_

    from common.config import TrainConfig
    from common.item_stats import ItemStats, predict, user_bias
    from common.scoring import predict_with_prefix

    plain = _device(ml100k_dir)
    residual = with_(plain, residual=True)
    with pytest.raises(ValueError, match="item-stats"):
        residual.bases([1, 2])  # no released statistics: nothing to correct
    n_items = int(plain.data.items.index.max())
    rng = np.random.default_rng(1)
    stats = ItemStats(rng.uniform(2, 4.5, n_items), rng.integers(0, 50, n_items).astype(float), 3.4)
    plain.use_item_stats(stats), residual.use_item_stats(stats)
    assert plain.bases([1, 2]) is None
    items = residual.test["item"].to_numpy()
    bias = predict(user_bias(residual.train["item"].to_numpy(), residual.train["rating"].to_numpy(), stats),
                   items, stats)
    np.testing.assert_allclose(residual.bases(items), bias)
    start = adapter_arrays(residual.rt.model)
    # predictions are the adapter's logits on top of the bias model's prior, the same the training saw
    want = predict_with_prefix(residual.rt.model, residual.rt.head, residual.prefix, residual.test_examples[0],
                               pad_id=residual.rt.pad_id, base=bias)
    np.testing.assert_allclose(residual.predict(start), want, atol=1e-6)
    assert not np.allclose(residual.predict(start), plain.predict(start), atol=1e-3)
    # the same start, seed and rows: the prior changes what training learns
    cfg = TrainConfig(steps=2, lr=1e-2)
    a, metrics = residual.train_adapter(start, cfg)
    b, _ = plain.train_adapter(start, cfg)
    assert np.isfinite(metrics["train_loss"])
    assert any(not np.allclose(a[k], b[k]) for k in a)


def test_with_released_item_factors_the_private_base_is_mf_and_training_targets_get_out_of_fold_bases(ml100k_dir):
    from dataclasses import replace as with_

    from client.device import read_serving_context
    from common.item_factors import ItemFactors, fit_user, predict
    from common.item_stats import ItemStats

    device = with_(_device(ml100k_dir), residual=True)
    n_items = int(device.data.items.index.max())
    rng = np.random.default_rng(3)
    device.use_item_stats(ItemStats(rng.uniform(2, 4.5, n_items), rng.integers(0, 50, n_items).astype(float), 3.4))
    factors = ItemFactors(3.5, 0.3 * rng.standard_normal(n_items), 0.4 * rng.standard_normal((n_items, 4)),
                          centre=0.3 * rng.standard_normal(5))  # the released population centre
    device.use_item_factors(factors, 0.1, 3.0)
    items, ratings = device.train["item"].to_numpy(), device.train["rating"].to_numpy()
    # held-out ratings: MF with this device's own user factors, fitted on all its training ratings
    test_items = device.test["item"].to_numpy()
    np.testing.assert_allclose(device.bases(test_items),
                               predict(fit_user(items, ratings, factors, 0.1, 3.0), test_items, factors))
    # training targets: each from user factors fitted without it (its fold), so none scores its own rating
    bases = device.training_bases()
    targets = device._target_rows
    assert len(bases) == len(targets) and np.isfinite(bases).all()
    in_sample = predict(fit_user(items, ratings, factors, 0.1, 3.0), targets["item"].to_numpy(), factors)
    assert not np.allclose(bases, in_sample)
    j = 0  # change one target's rating: its own base stays, the other folds' bases move
    flipped = device.train.copy()
    pos = device.train.index.get_loc(targets.index[j])
    flipped.iloc[pos, flipped.columns.get_loc("rating")] = 1 if flipped.iloc[pos]["rating"] >= 3 else 5
    other = with_(device, train=flipped)
    other.use_item_factors(factors, 0.1, 3.0)
    assert other.training_bases()[j] == pytest.approx(bases[j])
    assert not np.allclose(np.delete(other.training_bases(), j), np.delete(bases, j))
    # the serving context carries the factors, so on-device serving scores against the same base
    stats, residual, (back, reg, prior), weight = read_serving_context(device.serving_context())
    assert residual and reg == pytest.approx(0.1) and prior == pytest.approx(3.0) and stats is not None
    assert weight == 1.0  # no blend weight sent yet: the adapter alone
    np.testing.assert_allclose(back.factors, factors.factors, rtol=1e-6)
    np.testing.assert_allclose(back.centre, factors.centre, rtol=1e-6)  # the centre the user half is fitted toward
    served = with_(_device(ml100k_dir), residual=False).use_serving_context(device.serving_context())
    np.testing.assert_allclose(served.bases(test_items), device.bases(test_items), rtol=1e-5)


def test_a_tampered_serving_context_with_item_factors_is_refused(ml100k_dir):
    import io

    from client.device import read_serving_context
    from common.item_factors import ItemFactors

    device = _device(ml100k_dir)
    n_items = int(device.data.items.index.max())
    device.use_item_factors(ItemFactors.initial(n_items, 3), 0.2)
    good = dict(np.load(io.BytesIO(device.serving_context())))
    for key, bad in (("mf-reg", np.array([0.0])), ("mf-reg", np.array([np.nan])),
                     ("mf-factors", np.full((n_items, 3), np.inf)), ("mf-bias", np.zeros(n_items + 1))):
        buf = io.BytesIO()
        np.savez(buf, **{**good, key: bad})
        with pytest.raises(ValueError):
            read_serving_context(buf.getvalue())


def test_serving_applies_the_blend_weight_with_the_private_base_and_evaluation_does_not(ml100k_dir):
    """`served` returns b + w (adapter - b): the private base at w = 0, the adapter at w = 1; the weight travels in
    the serving context, and the device's own evaluation keeps scoring the adapter itself."""
    from dataclasses import replace as with_

    from client.device import read_serving_context
    from common.item_stats import ItemStats

    device = _device(ml100k_dir)
    n_items = int(device.data.items.index.max())
    rng = np.random.default_rng(5)
    items = device.test["item"].to_numpy()[:6]
    pred = rng.uniform(1, 5, len(items))
    assert device.served(pred, items) is pred  # no released statistics: no base to blend with
    device.use_item_stats(ItemStats(rng.uniform(2, 4.5, n_items), rng.integers(0, 50, n_items).astype(float), 3.4))
    base = device.bias_of(items)
    np.testing.assert_array_equal(device.served(pred, items), pred)  # weight 1 until one is sent
    for w in (0.0, 0.3, 1.0):
        device.blend_weight = w
        np.testing.assert_allclose(device.served(pred, items), base + w * (pred - base))
    device.blend_weight = 0.3
    assert read_serving_context(device.serving_context())[3] == pytest.approx(0.3)
    back = with_(_device(ml100k_dir)).use_serving_context(device.serving_context())
    assert back.blend_weight == pytest.approx(0.3)
    np.testing.assert_allclose(back.served(pred, items), base + 0.3 * (pred - base))


def test_a_tampered_blend_weight_in_the_serving_context_is_refused(ml100k_dir):
    import io

    from hypothesis import given, settings, strategies as st

    from client.device import read_serving_context

    good = dict(np.load(io.BytesIO(_device(ml100k_dir).serving_context())))

    @settings(max_examples=60, deadline=None)
    @given(bad=st.one_of(
        st.floats().filter(lambda w: not 0 <= w <= 1).map(lambda w: np.array([w])),  # NaN, Inf, out of range
        st.lists(st.floats(0, 1), min_size=2, max_size=3).map(np.array),  # not one number
        st.just(np.zeros(0)), st.just(np.array(["0.5"])), st.just(np.array([b"\xff"]))))
    def refused(bad):
        buf = io.BytesIO()
        np.savez(buf, **{**good, "blend_weight": bad})
        with pytest.raises(ValueError, match="blend weight"):
            read_serving_context(buf.getvalue())

    refused()
