"""The blend's sums give every weight's squared error exactly, and the weight is the validation optimum."""

import numpy as np
from hypothesis import given, strategies as st
from hypothesis.extra.numpy import arrays

from common import blend

ratings = arrays(np.float64, st.integers(1, 40), elements=st.floats(1.0, 5.0))


@given(ratings, st.data(), st.floats(0.0, 1.0))
def test_sums_give_the_blends_squared_error_at_any_weight(true, data, w):
    n = len(true)
    pred = data.draw(arrays(np.float64, n, elements=st.floats(1.0, 5.0)))
    bias = data.draw(arrays(np.float64, n, elements=st.floats(1.0, 5.0)))
    s = blend.residual_sums(pred, bias, true)
    direct = float(((bias + w * (pred - bias) - true) ** 2).sum())
    np.testing.assert_allclose(blend.sse(s["rr"], s["rd"], s["dd"], w), direct, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(s["rr"], ((bias - true) ** 2).sum(), rtol=1e-12)  # w = 0: the bias model alone


@given(ratings, st.data())
def test_the_weight_is_the_best_in_0_1_on_the_pooled_sums_of_several_devices(true, data):
    n = len(true)
    pred = data.draw(arrays(np.float64, n, elements=st.floats(1.0, 5.0)))
    bias = data.draw(arrays(np.float64, n, elements=st.floats(1.0, 5.0)))
    cut = data.draw(st.integers(0, n))  # two devices: their sums add up to the pooled ones
    parts = [blend.residual_sums(pred[a:b], bias[a:b], true[a:b]) for a, b in ((0, cut), (cut, n))]
    pooled = {k: parts[0][k] + parts[1][k] for k in blend.FIELDS}
    w = blend.weight(pooled["rd"], pooled["dd"])
    assert 0.0 <= w <= 1.0
    best = blend.sse(*(pooled[k] for k in blend.FIELDS), w)
    for other in np.linspace(0, 1, 41):
        assert best <= blend.sse(*(pooled[k] for k in blend.FIELDS), other) + 1e-9


def test_an_adapter_that_never_departs_from_the_bias_model_gets_no_weight():
    assert blend.weight(0.0, 0.0) == 0.0
    assert blend.weight(float("nan"), 1.0) == 0.0 and blend.weight(1.0, float("inf")) == 0.0
    assert blend.weight(-3.0, 1.0) == 0.0 and blend.weight(5.0, 1.0) == 1.0
