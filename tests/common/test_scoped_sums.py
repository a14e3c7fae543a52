import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from common import kslot, scoped_sums

SCOPES = ["all", "p0", "p1", "cold", "warm"]


def _values(n, sse, sae):
    return {"n": n, "persona_sse": sse, "persona_sae": sae, "personal_sse": sse / 2, "personal_sae": sae / 2}


@settings(max_examples=30, deadline=None)
@given(devices=st.lists(st.tuples(st.integers(0, 1), st.booleans(), st.integers(1, 300), st.floats(0, 1)),
                        min_size=1, max_size=10))
def test_summed_vectors_decode_to_every_scopes_pooled_statistics(devices):
    levels = kslot.levels_for(len(devices))
    total = np.zeros(len(SCOPES) * len(scoped_sums.FIELDS), np.uint32)
    for persona, cold, n, err in devices:
        own = ["all", f"p{persona}", "cold" if cold else "warm"]
        total += scoped_sums.encode(_values(n, 4 * err * n, 2 * err * n), own, SCOPES, levels)
    table = scoped_sums.decode(total, len(devices), SCOPES, levels)
    step = len(devices) * 2 * 16.0 * scoped_sums.MAX_HELD_OUT / levels  # one rounding step per device
    for scope in SCOPES:
        members = [d for d in devices if scope == "all" or scope == f"p{d[0]}" or scope == ("cold" if d[1] else "warm")]
        assert table[scope]["users"] == len(members)
        assert table[scope]["n"] == pytest.approx(sum(d[2] for d in members), abs=step)
        assert table[scope]["persona_sse"] == pytest.approx(sum(4 * d[3] * d[2] for d in members), abs=step)


def test_a_device_cannot_report_more_error_than_its_ratings_allow():
    clipped = scoped_sums.clip_values({**_values(10, 1e9, -5.0), "personal_distance": 1e12})
    assert clipped["persona_sse"] == 160.0 and clipped["persona_sae"] == 0.0 and clipped["users"] == 1.0
    assert clipped["personal_distance"] == scoped_sums.MAX_DISTANCE
    assert scoped_sums.clip_values(_values(1e9, 0, 0))["n"] == scoped_sums.MAX_HELD_OUT


def test_sums_no_honest_devices_could_produce_are_refused():
    levels = kslot.levels_for(2)
    one = scoped_sums.encode(_values(5, 1, 1), ["all", "p0"], SCOPES, levels)
    with pytest.raises(ValueError):  # two devices claimed, one summed
        scoped_sums.decode(one, 2, SCOPES, levels)
    with pytest.raises(ValueError):
        scoped_sums.encode(_values(5, 1, 1), ["all"], ["all", "all"], levels)  # scopes must be distinct


@settings(max_examples=30, deadline=None)
@given(devices=st.lists(st.tuples(st.booleans(), st.integers(1, 50), st.floats(-1, 1), st.floats(0, 1)),
                        min_size=1, max_size=8))
def test_blend_sums_pool_through_the_masked_vector_with_their_sign(devices):
    """Validation/test blend sums (`common.blend`) may be negative (sum r d): they decode with their sign; devices
    without blend sums add zeros and are not counted as blending."""
    levels = kslot.levels_for(len(devices))
    total = np.zeros(len(SCOPES) * len(scoped_sums.FIELDS), np.uint32)
    expected = {"blend_users": 0, "personal_val_rd": 0.0, "persona_test_dd": 0.0}
    for blends, n, rd, dd in devices:
        values = _values(n, 2.0 * n, 1.0 * n)
        if blends:
            values.update({f: 0.0 for f in scoped_sums.FIELDS if f not in values and f not in ("users", "blend_users",
                                                                                               "personal_distance")})
            values.update(n_val=n, personal_val_rd=16 * rd * n, persona_test_dd=16 * dd * n, bias_sse=n)
            expected["blend_users"] += 1
            expected["personal_val_rd"] += 16 * rd * n
            expected["persona_test_dd"] += 16 * dd * n
        total += scoped_sums.encode(values, ["all"], SCOPES, levels)
    row = scoped_sums.decode(total, len(devices), SCOPES, levels)["all"]
    step = len(devices) * 2 * 16.0 * scoped_sums.MAX_HELD_OUT / levels
    assert row["blend_users"] == pytest.approx(expected["blend_users"], abs=0.01)
    assert row["personal_val_rd"] == pytest.approx(expected["personal_val_rd"], abs=step)
    assert row["persona_test_dd"] == pytest.approx(expected["persona_test_dd"], abs=step)


def test_a_device_cannot_report_blend_sums_beyond_what_its_ratings_allow():
    values = {**_values(10, 1.0, 1.0), "bias_sse": 1e9, "bias_sae": -1.0, "n_val": 2.0,
              **{f: -1e9 for f in scoped_sums.SIGNED}, "persona_test_dd": 1e9, "persona_val_dd": -3.0,
              "personal_test_dd": 1.0, "personal_val_dd": 1.0}
    clipped = scoped_sums.clip_values(values)
    assert clipped["blend_users"] == 1.0 and clipped["bias_sse"] == 160.0 and clipped["bias_sae"] == 0.0
    assert clipped["persona_test_rd"] == -160.0 and clipped["persona_val_rd"] == -32.0  # 16 per rating: 10 and 2
    assert clipped["persona_test_dd"] == 160.0 and clipped["persona_val_dd"] == 0.0
    partial = scoped_sums.clip_values({**_values(10, 1.0, 1.0), "bias_sse": 3.0})
    assert partial["blend_users"] == 0.0 and partial["bias_sse"] == 0.0  # all or nothing, like the plain check


@settings(deadline=None, max_examples=20)
@given(st.lists(st.tuples(st.integers(0, 12), st.floats(-1, 1), st.floats(0, 1), st.floats(0, 1)),
                min_size=2, max_size=6))
def test_paired_terms_pool_through_the_masked_vector_within_their_bounds(devices):
    """Each device's per-user terms (`paired_terms`, from its clipped sums) sum through the masked vector like
    every other field, signed ones with their sign; a device without test ratings adds none of them."""
    levels = kslot.levels_for(len(devices))
    total = np.zeros(len(SCOPES) * len(scoped_sums.FIELDS), np.uint32)
    want = {f: 0.0 for f in scoped_sums.FIELDS if "paired" in f}
    for n, rd, dd, err in devices:
        values = {**_values(n, 16 * err * n, 4 * err * n), "bias_sse": 16 * (1 - err) * n, "bias_sae": 0.0,
                  "n_val": 1.0, **{f"{p}_{h}_rd": 16 * rd * n for p in ("persona", "personal") for h in ("test", "val")},
                  **{f"{p}_{h}_dd": 16 * dd * n for p in ("persona", "personal") for h in ("test", "val")}}
        clipped = scoped_sums.clip_values(values)
        assert all(abs(clipped[f]) <= scoped_sums.FIELDS[f] for f in want)
        if n:
            for f, v in {"paired_users": 1.0, **scoped_sums.paired_terms(clipped)}.items():
                want[f] += v
        else:
            assert all(clipped[f] == 0.0 for f in want)
        total += scoped_sums.encode(values, ["all"], SCOPES, levels)
    row = scoped_sums.decode(total, len(devices), SCOPES, levels)["all"]
    for f, v in want.items():
        assert row[f] == pytest.approx(v, abs=len(devices) * 2 * scoped_sums.FIELDS[f] / levels + 1e-9), f
