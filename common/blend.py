"""An adapter's expected rating blended with the private user+item bias model, the weight fitted on validation
ratings from sums that pool exactly across devices (issue #17).

The blend is b + w (p - b): `b` is the bias model's prediction (released item statistics + the device's own user
bias, `common.item_stats`), `p` the adapter's. With residuals r = y - b and d = p - b, its squared error over any
set of ratings is a quadratic in w,

    SSE(w) = sum r^2 - 2 w sum r d + w^2 sum d^2,

so three sums per device (`residual_sums`) give every w's error once pooled: the weight is the least-squares
w = sum r d / sum d^2 over the pooled *validation* sums (each device's latest training ratings, held out of all
training), clipped to [0, 1], and the *test* sums then give the blend's test RMSE at that weight. Nothing is chosen
on test ratings, and a single device's few validation ratings never set a weight alone: per-user weights fitted on
6-12 ratings were worse than the bias model in the centralised measurement (docs/results.md).
"""

from __future__ import annotations

import math

import numpy as np

FIELDS = ("rr", "rd", "dd")  # sum r^2, sum r d, sum d^2


def residual_sums(pred: np.ndarray, bias: np.ndarray, true: np.ndarray) -> dict[str, float]:
    """The three sums of one set of ratings (r = true - bias, d = pred - bias)."""
    r = np.asarray(true, np.float64) - np.asarray(bias, np.float64)
    d = np.asarray(pred, np.float64) - np.asarray(bias, np.float64)
    return {"rr": float(r @ r), "rd": float(r @ d), "dd": float(d @ d)}


def weight(rd: float, dd: float, upper: float = 1.0) -> float:
    """The adapter's weight in [0, `upper`] minimising the validation SSE (0, the bias model alone, when the adapter
    never departs from it). The system serves weights in [0, 1]; a larger `upper` is for measuring what a weight
    above 1 would give (`simulations.rescore --unclipped-weight`: on all 216 paper users, nothing)."""
    if not (math.isfinite(rd) and math.isfinite(dd)) or dd <= 0:
        return 0.0
    return float(min(upper, max(0.0, rd / dd)))


def shrunk_weight(rd: float, dd: float, pool_rd: float, pool_dd: float, pool_devices: int,
                  prior_devices: float) -> float:
    """An adapter's weight from its own devices' validation sums (rd, dd) with `prior_devices` devices' worth of a
    pool's added: the pool's average per-device sums (pool_rd / pool_devices, pool_dd / pool_devices), so the
    weight runs from the adapter's own least-squares weight (prior_devices 0, or an empty pool) toward the pool's
    (prior_devices large), and a persona fitted on few devices moves little from the pool. With K personas each
    weight is fitted on one persona's few evaluation devices (7-11 in the main job) and one missed on test
    (docs/results.md, "What the system serves"); the pool is every persona's nearest evaluation, so with K=1 (the
    pool is the adapter's own sums) the weight is the same at any prior."""
    if prior_devices > 0 and pool_devices > 0 and math.isfinite(pool_rd) and math.isfinite(pool_dd):
        rd, dd = rd + prior_devices * pool_rd / pool_devices, dd + prior_devices * pool_dd / pool_devices
    return weight(rd, dd)


def sse(rr: float, rd: float, dd: float, w: float) -> float:
    """The blend's squared error at weight w from the sums (never below 0: rounding cannot make it negative)."""
    return max(0.0, rr - 2.0 * w * rd + w * w * dd)
