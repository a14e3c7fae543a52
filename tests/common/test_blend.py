"""The blend's sums give every weight's squared error exactly, and the weight is the validation optimum."""

import pytest
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


sums = st.tuples(st.floats(-1e3, 1e3), st.floats(1e-3, 1e3))  # (rd, dd > 0)


@given(sums, st.lists(st.tuples(sums, st.integers(1, 50)), min_size=1, max_size=6), st.integers(1, 50),
       st.floats(0.0, 1e3))
def test_a_shrunk_weight_lies_between_the_adapters_own_and_the_pools(own, others, devices, prior):
    """`shrunk_weight` adds `prior` devices' worth of the pool (the adapter's own sums among it) to its own: no
    prior, its own least-squares weight; any prior, a weight between its own and the pool's; with one persona (the
    pool is the adapter itself) every prior gives its own weight."""
    rd, dd = own
    pool = [(rd, dd, devices), *((r, d, n) for (r, d), n in others)]
    pool_rd, pool_dd, pool_n = (sum(p[i] for p in pool) for i in range(3))
    mine, pooled = blend.weight(rd, dd), blend.weight(pool_rd, pool_dd)
    assert blend.shrunk_weight(rd, dd, pool_rd, pool_dd, pool_n, 0.0) == mine
    w = blend.shrunk_weight(rd, dd, pool_rd, pool_dd, pool_n, prior)
    assert 0.0 <= w <= 1.0 and min(mine, pooled) - 1e-9 <= w <= max(mine, pooled) + 1e-9
    assert blend.shrunk_weight(rd, dd, rd, dd, devices, prior) == pytest.approx(mine, abs=1e-9)
    far = blend.shrunk_weight(rd, dd, pool_rd, pool_dd, pool_n, 1e12)
    assert far == pytest.approx(pooled, abs=1e-6)


def test_a_shrunk_weight_moves_toward_the_pool_as_the_prior_grows_and_ignores_an_impossible_pool():
    # own: 4 devices say 1.0 (rd = dd = 4); the pool of 20 devices says 0.2
    ws = [blend.shrunk_weight(4.0, 4.0, 4.0, 20.0, 20, k) for k in (0.0, 1.0, 5.0, 50.0)]
    assert ws == sorted(ws, reverse=True) and ws[0] == 1.0 and ws[-1] < 0.3
    assert blend.shrunk_weight(4.0, 4.0, 4.0, 20.0, 20, 5.0) == pytest.approx((4 + 1) / (4 + 5))
    for bad in (float("nan"), float("inf")):
        assert blend.shrunk_weight(4.0, 8.0, bad, 20.0, 20, 5.0) == 0.5  # the pool ignored, own weight kept
    assert blend.shrunk_weight(4.0, 8.0, 4.0, 20.0, 0, 5.0) == 0.5  # an empty pool adds nothing


@given(true=arrays(np.float64, 12, elements=st.floats(1, 5)), base=arrays(np.float64, 12, elements=st.floats(1, 5)),
       scale=st.floats(0.2, 5.0))
def test_a_weight_bounded_above_elsewhere_than_1_recovers_an_adapter_that_moves_a_fixed_share_of_the_way(
        true, base, scale):
    """An adapter that moves 1/scale of the way from the base to every rating needs weight `scale`: with the bound
    lifted (`upper`, rescore's measurement of weights above 1) the least-squares weight finds it; the served
    bound of 1 caps it."""
    if np.abs(true - base).max() < 1e-3:
        return
    pred = base + (true - base) / scale
    sums = blend.residual_sums(pred, base, true)
    assert blend.weight(sums["rd"], sums["dd"], upper=float("inf")) == pytest.approx(scale, rel=1e-6)
    assert blend.weight(sums["rd"], sums["dd"]) == pytest.approx(min(scale, 1.0), rel=1e-6)
    assert blend.weight(sums["rd"], sums["dd"], upper=2.0) == pytest.approx(min(scale, 2.0), rel=1e-6)
