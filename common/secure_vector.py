"""Arrays as one quantised integer vector whose sum over devices decodes to the arrays' sums: how discovery's
contributions (k-means slot sums, per-movie statistics) travel under secure aggregation.

Layout (uint32, added modulo 2**32 by `common.secure_aggregation`): [ the arrays, flattened in order | 1 ]. The
device clips its arrays to L2 norm `bound` itself (Flower's FlatClip: the coordinator sees no single contribution
to clip any more), so every coordinate lies in [-bound, bound], the quantisation range; Flower's stochastic
quantisation rounds it onto 0..levels without bias. The trailing 1 counts the devices in a sum, which `decode`
checks: a sum of the wrong number of vectors, or a wrongly reconstructed mask, is refused.
"""

from __future__ import annotations

import math

import numpy as np
from flwr.common.secure_aggregation.quantization import dequantize, quantize

from common.kslot import step
from common.kslot import levels_for  # noqa: F401 -- the level count of a cohort, as for K-slot updates


def length(shapes: list[tuple[int, ...]]) -> int:
    return sum(math.prod(s) for s in shapes) + 1


def encode(arrays: list[np.ndarray], bound: float, levels: int) -> np.ndarray:
    """This device's vector: `arrays` clipped to joint L2 norm `bound`, quantised over [-bound, bound]."""
    flat = np.concatenate([np.asarray(a, np.float64).ravel() for a in arrays]) if arrays else np.zeros(0)
    if not np.isfinite(flat).all():
        raise ValueError("the contribution has NaN or Inf values")
    if not 0 < bound < float("inf"):
        raise ValueError(f"bound must be finite and > 0, got {bound}")
    if levels < 2 or levels % 2 or levels > 1 << 30:
        raise ValueError(f"levels must be even and in [2, 2**30], got {levels}")
    norm = float(np.linalg.norm(flat))
    if norm > bound:
        flat = flat * (bound / norm)
    vector = np.empty(len(flat) + 1, np.uint32)
    vector[:-1] = quantize([np.clip(flat, -bound, bound)], bound, levels)[0].astype(np.uint32)
    vector[-1] = 1
    return vector


def decode(total: np.ndarray, devices: int, shapes: list[tuple[int, ...]], bound: float,
           levels: int) -> list[np.ndarray]:
    """The arrays' sums over the `devices` whose vectors make up `total` (each within `devices` x one
    quantisation step, `error`). ValueError for a sum no such devices could produce."""
    if total.shape != (length(shapes),):
        raise ValueError(f"the sum has shape {total.shape}, expected ({length(shapes)},)")
    if int(total[-1]) != devices:
        raise ValueError(f"the sum counts {int(total[-1])} devices, not {devices}")
    flat = dequantize([total[:-1].astype(np.int64)], bound, levels)[0] - (devices - 1) * bound
    out, at = [], 0
    for shape in shapes:
        size = math.prod(shape)
        out.append(flat[at:at + size].reshape(shape))
        at += size
    return out


def error(devices: int, bound: float, levels: int) -> float:
    """The largest rounding error of one coordinate of a sum of `devices` vectors."""
    return devices * step(bound, levels)
