"""K-slot updates: one device's persona delta as an integer vector whose sum over devices is the K persona sums.

Layout (all uint32, added modulo 2**32 by secure aggregation):

    [ slot 0: d coordinates | slot 1: d | ... | slot K-1: d | counts: K ]

A device writes its clipped, quantised delta into its persona's slot, the quantised zero elsewhere, and a 1 into
its persona's count. Every slot of every vector has the same form, so a masked vector says nothing about which
slot is the device's; only the sum over devices is decoded, into each persona's delta sum and device count.

Quantisation is Flower's (`flwr.common.secure_aggregation.quantization`): each coordinate is clipped to
[-range, range] and stochastically rounded onto the integers 0..levels (unbiased). With an even `levels` a zero
quantises to levels / 2 exactly, so the empty slots carry no rounding error. `levels` is chosen so that the
largest possible honest sum, cohort x levels, stays below the modulus: honest sums never wrap around.
"""

from __future__ import annotations

import math

import numpy as np
from flwr.common.secure_aggregation.quantization import dequantize, quantize
from flwr.supercore.differential_privacy import clip_inputs_inplace, get_norm

MAX_SLOTS = 64
MODULUS = 1 << 32  # masked arithmetic is uint32 with its natural wrap-around: 4 bytes a coordinate, as float32


def levels_for(cohort: int) -> int:
    """The largest even quantisation level count whose sum over `cohort` devices cannot reach the modulus."""
    if cohort < 1:
        raise ValueError(f"cohort must be >= 1, got {cohort}")
    levels = min((MODULUS - 1) // cohort, 1 << 30)  # Flower's quantiser rounds through int32
    return levels - levels % 2


def step(coord_range: float, levels: int) -> float:
    """One quantisation step: the largest rounding error of one device's coordinate."""
    return 2.0 * coord_range / levels


def layout(shapes: dict[str, tuple[int, ...]]) -> tuple[list[str], int]:
    """The adapter's keys in the fixed order both sides flatten them in, and the coordinates of one slot."""
    keys = sorted(shapes)
    return keys, sum(math.prod(shapes[k]) for k in keys)


def encode(delta: dict[str, np.ndarray], persona: int, k: int, clip: float, coord_range: float,
           levels: int) -> np.ndarray:
    """This device's K-slot vector: `delta` clipped to L2 norm `clip` and to [-coord_range, coord_range] per
    coordinate (the quantisation range), quantised into slot `persona`; quantised zeros elsewhere; count 1 there."""
    if not 1 <= k <= MAX_SLOTS:  # the coordinator's number: a huge one would exhaust the device's memory
        raise ValueError(f"{k} slots; at most {MAX_SLOTS}")
    if not 0 <= persona < k:
        raise ValueError(f"persona {persona} is not one of {k} slots")
    keys, d = layout({n: v.shape for n, v in delta.items()})
    flat = np.concatenate([np.asarray(delta[n], np.float64).ravel() for n in keys]) if keys else np.zeros(0)
    if not np.isfinite(flat).all():
        raise ValueError("the delta has NaN or Inf values")
    if not 0 < clip < float("inf") or not 0 < coord_range < float("inf"):
        raise ValueError(f"clip and range must be finite and > 0, got {clip}, {coord_range}")
    if levels < 2 or levels % 2 or levels > 1 << 30:
        raise ValueError(f"levels must be even and in [2, 2**30], got {levels}")
    # Rounding moves each coordinate by less than one step, so the L2 norm by less than step x sqrt(d): clipping
    # to that much below `clip` keeps the quantised delta itself within `clip`, which the coordinator checks.
    bound = clip - step(coord_range, levels) * math.sqrt(d)
    if bound <= 0:
        raise ValueError(f"clip {clip} is below the quantisation error of {d} coordinates")
    arrays = [flat]
    if get_norm(arrays) > bound:  # Flower's helper divides by the norm: an all-zero delta is already within it
        clip_inputs_inplace(arrays, bound)
    zero = levels // 2
    vector = np.full(k * d + k, zero, np.uint32)
    vector[persona * d:(persona + 1) * d] = quantize([arrays[0]], coord_range, levels)[0].astype(np.uint32)
    vector[k * d:] = 0
    vector[k * d + persona] = 1
    return vector


def decode(total: np.ndarray, devices: int, shapes: dict[str, tuple[int, ...]], k: int, coord_range: float,
           levels: int) -> tuple[dict[int, dict[str, np.ndarray]], np.ndarray]:
    """The per-persona delta sums (float64) and device counts from the unmasked sum of `devices` K-slot vectors.

    Raises ValueError when the sum cannot be one of honest vectors: the wrong length, or counts that are not
    `devices` non-negative integers in total (every honest vector has exactly one 1 among its counts). That is
    also what a wrongly reconstructed mask turns into, with overwhelming probability."""
    keys, d = layout(shapes)
    if total.shape != (k * d + k,):
        raise ValueError(f"the sum has shape {total.shape}, expected ({k * d + k},)")
    counts = total[k * d:].astype(np.int64)
    if counts.sum() != devices or (counts < 0).any() or (counts > devices).any():
        raise ValueError(f"persona counts {counts.tolist()} are not {devices} devices")
    sums: dict[int, dict[str, np.ndarray]] = {}
    for p in range(k):
        # Each device's coordinate dequantises to q x step - range, so n devices' sum is Q x step - n x range.
        flat = dequantize([total[p * d:(p + 1) * d].astype(np.int64)], coord_range, levels)[0] \
            - (devices - 1) * coord_range
        out, at = {}, 0
        for n in keys:
            size = math.prod(shapes[n])
            out[n] = flat[at:at + size].reshape(shapes[n])
            at += size
        sums[p] = out
    return sums, counts
