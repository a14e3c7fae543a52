"""Discovery contributions as quantised vectors: their sum decodes to the plain sums within the rounding."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from common import secure_vector
from common.item_stats import contribution, sensitivity


@settings(max_examples=25, deadline=None)
@given(st.lists(st.lists(st.tuples(st.integers(1, 30), st.integers(1, 5)), max_size=30), min_size=1, max_size=6))
def test_item_statistics_contributions_sum_to_the_plain_sums_within_quantisation(devices):
    n_items, levels, bound = 30, secure_vector.levels_for(len(devices)), sensitivity(1.0)
    shapes = [(n_items,), (n_items,), (1,)]
    plain = [np.zeros(s) for s in shapes]
    total = np.zeros(secure_vector.length(shapes), np.uint32)
    for rated in devices:
        sums, weights, volume = contribution(np.array([i for i, _ in rated], np.int64),
                                             np.array([r for _, r in rated], np.float64), n_items)
        arrays = [sums, weights, np.array([volume])]
        plain = [p + a for p, a in zip(plain, arrays)]
        total += secure_vector.encode(arrays, bound, levels)
    decoded = secure_vector.decode(total, len(devices), shapes, bound, levels)
    for got, want in zip(decoded, plain):
        np.testing.assert_allclose(got, want, atol=secure_vector.error(len(devices), bound, levels))
    with pytest.raises(ValueError, match="devices"):
        secure_vector.decode(total, len(devices) + 1, shapes, bound, levels)
    with pytest.raises(ValueError, match="shape"):
        secure_vector.decode(total[:-1], len(devices), shapes, bound, levels)


@settings(max_examples=25, deadline=None)
@given(st.lists(st.floats(-1e6, 1e6), min_size=1, max_size=20), st.floats(0.1, 10.0))
def test_a_device_cannot_put_more_than_its_bound_into_the_sum(values, bound):
    levels = 1 << 20
    vector = secure_vector.encode([np.array(values)], bound, levels)
    (decoded,) = secure_vector.decode(vector, 1, [(len(values),)], bound, levels)
    assert np.linalg.norm(decoded) <= bound + secure_vector.error(1, bound, levels) * np.sqrt(len(values))


def test_non_finite_contributions_and_bad_parameters_are_refused():
    with pytest.raises(ValueError, match="NaN"):
        secure_vector.encode([np.array([np.nan])], 1.0, 1 << 10)
    with pytest.raises(ValueError, match="bound"):
        secure_vector.encode([np.array([1.0])], float("inf"), 1 << 10)
    with pytest.raises(ValueError, match="levels"):
        secure_vector.encode([np.array([1.0])], 1.0, 3)
