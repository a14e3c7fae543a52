"""simulations.personal_tuning's per-device choice (the fine-tuning itself runs on a real federation in
test_federated.py)."""

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from simulations.personal_tuning import PER_USER, per_user_choice, table


@settings(max_examples=80, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), users=st.integers(1, 6), settings_=st.integers(1, 4),
       no_val=st.integers(0, 5))
def test_each_device_keeps_the_setting_with_its_lowest_validation_error(seed, users, settings_, no_val):
    rng = np.random.default_rng(seed)
    who = np.repeat(np.arange(users), rng.integers(1, 6, users))
    val_counts = rng.integers(0, 4, users)
    val_counts[no_val % users] = 0  # a device without validation ratings
    who_val = np.repeat(np.arange(users), val_counts)
    names = ["persona adapter (0 steps)"] + [f"{s} steps" for s in range(1, settings_)]
    result = {"who": who, "y": rng.integers(1, 6, len(who)).astype(float), "who_val": who_val,
              "y_val": rng.integers(1, 6, len(who_val)).astype(float),
              "pred": {n: {"val": rng.uniform(1, 5, len(who_val)), "test": rng.uniform(1, 5, len(who))}
                       for n in names}}
    choice = per_user_choice(result)
    for user in range(users):
        v, t = who_val == user, who == user
        errors = [float(((result["pred"][n]["val"][v] - result["y_val"][v]) ** 2).sum()) for n in names]
        best = names[0] if not v.any() else names[int(np.argmin(errors))]
        np.testing.assert_array_equal(choice["test"][t], result["pred"][best]["test"][t])
        np.testing.assert_array_equal(choice["val"][v], result["pred"][best]["val"][v])
    # chosen per device on validation, it is at least as good there as any one setting for everyone
    sse = {n: float(((p["val"] - result["y_val"]) ** 2).sum()) for n, p in result["pred"].items()}
    assert float(((choice["val"] - result["y_val"]) ** 2).sum()) <= min(sse.values()) + 1e-9


def test_the_table_has_a_row_for_the_per_device_choice():
    rng = np.random.default_rng(0)
    who, who_val = np.repeat(np.arange(4), 5), np.repeat(np.arange(4), 2)
    y, y_val = rng.uniform(1, 5, 20), rng.uniform(1, 5, 8)
    result = {"who": who, "y": y, "who_val": who_val, "y_val": y_val,
              "pred": {n: {"val": rng.uniform(1, 5, 8), "test": rng.uniform(1, 5, 20)} for n in ("a", "b")},
              "private bias": {"val": y_val + 0.5, "test": y + 0.5},
              **{b: y + 0.3 for b in ("user+item bias", "matrix factorisation")}}
    text = table(result)
    assert f"| {PER_USER} |" in text and text.count("(chosen on validation)") == 1
