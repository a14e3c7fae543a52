"""simulations.rescore's choice of users (the rescoring itself runs on a real federation in test_federated.py)."""

import numpy as np
import pandas as pd
from hypothesis import given, settings
from hypothesis import strategies as st

from simulations.rescore import cold_users


@settings(max_examples=60, deadline=None)
@given(counts=st.lists(st.integers(0, 40), min_size=1, max_size=12), threshold=st.integers(1, 30),
       absent=st.lists(st.integers(100, 110), max_size=3, unique=True))
def test_cold_users_are_exactly_those_under_the_threshold(counts, threshold, absent):
    # users 0..n-1 hold counts[u] training ratings; users 100+ hold none (they are cold too)
    fit = pd.DataFrame({"user": np.repeat(np.arange(len(counts)), counts)})
    users = list(range(len(counts))) + absent
    cold = cold_users(fit, users, threshold)
    assert list(cold) == [u for u in users if (counts[u] if u < len(counts) else 0) < threshold]
