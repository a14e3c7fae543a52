import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from common import kslot

SHAPES = {"b": (3, 2), "a": (4,)}


@settings(max_examples=30, deadline=None)
@given(personas=st.lists(st.integers(0, 3), min_size=1, max_size=8), seed=st.integers(0, 2**16))
def test_summed_vectors_decode_to_per_persona_sums_and_counts(personas, seed):
    rng = np.random.default_rng(seed)
    k, n = 4, len(personas)
    levels, coord_range = kslot.levels_for(n), 0.3
    deltas = [{name: rng.normal(0, 0.05, s).astype(np.float32) for name, s in SHAPES.items()} for _ in personas]
    total = np.zeros(k * 10 + k, np.uint32)
    for d, p in zip(deltas, personas):
        total += kslot.encode(d, p, k, 10.0, coord_range, levels)
    sums, counts = kslot.decode(total, n, SHAPES, k, coord_range, levels)
    assert counts.tolist() == [personas.count(p) for p in range(k)]
    for p in range(k):
        for name in SHAPES:
            plain = sum((d[name].astype(np.float64) for d, q in zip(deltas, personas) if q == p),
                        np.zeros(SHAPES[name]))
            # one rounding step per member; the empty slots' zeros are exact
            tol = counts[p] * kslot.step(coord_range, levels) + 1e-12
            np.testing.assert_allclose(sums[p][name], plain, atol=tol, rtol=0)


def test_a_vector_is_clipped_in_norm_and_range_and_counts_one_device():
    levels = kslot.levels_for(5)
    delta = {"a": np.full(4, 3.0, np.float32), "b": np.zeros((3, 2), np.float32)}
    v = kslot.encode(delta, 1, 2, clip=1.0, coord_range=0.4, levels=levels)
    assert v.dtype == np.uint32 and v.shape == (2 * 10 + 2,)
    assert v[-2:].tolist() == [0, 1]
    assert (v[:10] == levels // 2).all()  # the other persona's slot: quantised zeros, exactly
    sums, _ = kslot.decode(v, 1, SHAPES, 2, 0.4, levels)
    a = sums[1]["a"]
    assert np.linalg.norm(a) <= 1.0 and np.abs(a).max() <= 0.4


@pytest.mark.parametrize("counts", [[0, 1], [1, 0], [2**32 - 1, 3], [3, 0]])
def test_sums_no_honest_devices_could_produce_are_refused(counts):
    total = np.zeros(2 * 10 + 2, np.uint32)
    total[-2:] = counts
    total[:-2] = kslot.levels_for(2)  # two devices' quantised zeros
    with pytest.raises(ValueError):
        kslot.decode(total, 2, SHAPES, 2, 0.3, kslot.levels_for(2))
    with pytest.raises(ValueError):
        kslot.decode(total[:-1], 2, SHAPES, 2, 0.3, kslot.levels_for(2))


def test_quantisation_levels_never_let_a_cohort_wrap_around():
    for n in (1, 2, 13, 1000, 4096):
        levels = kslot.levels_for(n)
        assert levels % 2 == 0 and n * levels < kslot.MODULUS and levels <= 2**30
    with pytest.raises(ValueError):
        kslot.encode({"a": np.zeros(4, np.float32)}, 2, 2, 1.0, 0.1, 1000)  # persona out of range
    with pytest.raises(ValueError):
        kslot.encode({"a": np.full(4, np.nan, np.float32)}, 0, 2, 1.0, 0.1, 1000)
    with pytest.raises(ValueError):
        kslot.encode({"a": np.zeros(4, np.float32)}, 0, 2, 1.0, 0.1, 1001)  # odd levels: zero would round
    with pytest.raises(ValueError):
        kslot.encode({"a": np.zeros(4, np.float32)}, 0, 10**6, 1.0, 0.1, 1000)  # 10**6 slots of memory
