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
