import numpy as np

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
