"""Per-movie rating statistics as a user-level DP federated sum: the collaborative signal bias and MF models live
on, released without any device's ratings reaching the coordinator in a readable form (issue #17).

One device contributes one vector over the catalogue (`contribution`):
- `sums[i]`  = w * (r_i - CENTRE) for each movie i it rated (0 elsewhere),
- `weights[i]` = w for each movie it rated,
- `volume` = min(n, VOLUME_CAP) / VOLUME_CAP, its number of ratings, capped (unweighted: it is a separate part of the
  vector, so the L2 bound below still holds).
`w` scales the device's per-movie part to L2 norm <= `bound`, so one user moves the whole release by at most
sqrt(bound^2 + 1) in L2 (`sensitivity`): the coordinator clips to that and adds Gaussian noise of std
noise_multiplier x sensitivity to every coordinate, a user-level Gaussian mechanism accounted like a discovery
release (sample rate 1: every device answers).

Why weight instead of capping the number of ratings: the signal-to-noise ratio of a movie's sum is
sum over raters of w_u / (noise x bound), and with w_u = bound / |v_u| that is independent of `bound`; every
rating still counts, heavy raters just count less each (their ratings are a weighted mean's, not dropped). The
weight also shrinks a little for users whose ratings sit far from the centre (their vectors are longer), which
pulls means towards 3 by ~0.01-0.02 on planted data: a small bias traded for the noise a ratings-blind weight
(bound / sqrt(5 n), the worst case) would add by spending 41% more noise per rating.

`estimate` turns the noisy sums into per-movie means shrunk towards the global mean (the shrinkage grows with the
noise, so a movie few users rated is its noise-free prior, not noise), and into per-movie rating counts
estimated through the volume slot. Everything after the sum is post-processing: it costs no privacy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

CENTRE = 3.0  # the middle of the 1..5 scale: deviations lie in [-2, 2]
VOLUME_CAP = 1000  # ratings per device counted in the volume slot (MovieLens' heaviest user has 737)


def sensitivity(bound: float) -> float:
    """L2 bound on one device's whole contribution: the weighted per-movie part plus the volume slot."""
    return math.sqrt(bound ** 2 + 1.0)


def contribution(items: np.ndarray, ratings: np.ndarray, n_items: int, bound: float = 1.0
                 ) -> tuple[np.ndarray, np.ndarray, float]:
    """(sums, weights, volume) of one device; `items` are 1-based movie ids (MovieLens), each counted once (the
    last rating wins if a movie appears twice)."""
    items, ratings = np.asarray(items, dtype=np.int64), np.asarray(ratings, dtype=np.float64)
    sums, weights = np.zeros(n_items), np.zeros(n_items)
    keep = (items >= 1) & (items <= n_items) & np.isfinite(ratings)
    if not keep.any():
        return sums, weights, 0.0
    last = pd.Series(np.clip(ratings[keep], 1.0, 5.0)).groupby(items[keep]).last()
    idx, dev = last.index.to_numpy() - 1, last.to_numpy() - CENTRE
    norm = math.sqrt(float(np.sum(dev ** 2 + 1.0)))
    w = min(1.0, bound / norm)
    sums[idx], weights[idx] = w * dev, w
    return sums, weights, min(len(idx), VOLUME_CAP) / VOLUME_CAP


def clip_contribution(sums: np.ndarray, weights: np.ndarray, volume: float, bound: float
                      ) -> tuple[np.ndarray, np.ndarray, float]:
    """The coordinator's side of the bound: a reply that claims more than `sensitivity(bound)` is scaled down
    (an honest device's never is), so a hostile device moves the release no more than an honest one can."""
    total = math.sqrt(float(np.sum(sums ** 2) + np.sum(weights ** 2) + volume ** 2))
    limit = sensitivity(bound)
    scale = 1.0 if total <= limit else limit / total
    return sums * scale, weights * scale, volume * scale


@dataclass
class ItemStats:
    """Released per-movie statistics: `mean[i-1]` and `count[i-1]` for movie id i, and the global mean `mu`."""

    mean: np.ndarray
    count: np.ndarray
    mu: float

    def frame(self) -> pd.DataFrame:
        """The `common.prompt.item_stats` shape (index item id; columns mean, count), for prompts."""
        return pd.DataFrame({"mean": self.mean, "count": self.count},
                            index=pd.RangeIndex(1, len(self.mean) + 1, name="item"))

    def item_bias(self) -> np.ndarray:
        return self.mean - self.mu

    def to_arrays(self) -> dict[str, np.ndarray]:
        return {"mean": self.mean.astype(np.float32), "count": self.count.astype(np.float32),
                "mu": np.array([self.mu], dtype=np.float32)}

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> "ItemStats":
        mean, count = np.asarray(arrays["mean"], np.float64), np.asarray(arrays["count"], np.float64)
        mu = float(np.asarray(arrays["mu"]).reshape(-1)[0])
        if mean.shape != count.shape or mean.ndim != 1 or not (np.isfinite(mean).all() and np.isfinite(count).all()
                                                               and math.isfinite(mu)):
            raise ValueError("item statistics must be two finite vectors of one length and a finite mean")
        return cls(np.clip(mean, 1.0, 5.0), np.maximum(count, 0.0), float(np.clip(mu, 1.0, 5.0)))


def estimate(sums: np.ndarray, weights: np.ndarray, volume: float, noise_std: float = 0.0,
             prior_ratings: float = 10.0, prior_sd: float = 0.5) -> ItemStats:
    """Per-movie means and counts from the (noised) sums.

    `noise_std` is the std of the noise on each coordinate (0 for exact sums). A movie's bias b is the posterior
    mean under a N(0, prior_sd^2) prior when its deviation sum is S = W b + rating noise + DP noise:
    b = W S / (W^2 + lambda W + noise_std^2 / prior_sd^2), with lambda `prior_ratings` ratings' worth of weight.
    Without noise that is Koren's regularised item bias S / (W + lambda); with noise a movie whose weight is
    mostly noise falls back on the global mean instead of a ratio of two noises. `prior_sd` 0.5 is a fixed prior
    (ML-100K's item biases have sd ~0.5 at 20+ ratings), not tuned on any evaluation figure."""
    sums, weights = np.asarray(sums, np.float64), np.asarray(weights, np.float64)
    total_weight = float(np.sum(weights))
    ratings = max(volume * VOLUME_CAP, 1.0)
    per_rating = max(total_weight, 1e-12) / ratings  # a rating's mean weight: weights back to counts
    # The global mean gets the same posterior treatment as a movie (prior N(CENTRE, 0.5^2)): with few devices the
    # total weight is itself mostly noise (std noise_std x sqrt(movies)), and a ratio of two noises would pin mu at
    # 1 or 5.
    total_noise = noise_std * math.sqrt(len(sums))
    w_total = max(total_weight, 0.0)
    mu = CENTRE + w_total * float(np.sum(sums)) / (w_total ** 2 + (total_noise / 0.5) ** 2 + 1e-12)
    mu = float(np.clip(mu, 1.0, 5.0))
    w = np.maximum(weights, 0.0)
    deviation = sums - w * (mu - CENTRE)
    mean = mu + w * deviation / (w ** 2 + prior_ratings * per_rating * w + (noise_std / prior_sd) ** 2 + 1e-12)
    return ItemStats(np.clip(mean, 1.0, 5.0), np.round(w / per_rating), mu)


def user_bias(items: np.ndarray, ratings: np.ndarray, stats: ItemStats, reg: float = 5.0) -> float:
    """A device's own bias against the released statistics, computed on the device: the user half of a user+item
    bias model whose item half is public (Koren's baseline, one ridge step)."""
    items, ratings = np.asarray(items, dtype=np.int64), np.asarray(ratings, dtype=np.float64)
    known = (items >= 1) & (items <= len(stats.mean))
    if not known.any():
        return 0.0
    residual = ratings[known] - stats.mu - stats.item_bias()[items[known] - 1]
    return float(residual.sum() / (known.sum() + reg))


def predict(user_bias_: float, items: np.ndarray, stats: ItemStats) -> np.ndarray:
    """mu + b_user + b_item, clipped to the scale; movies outside the catalogue get no item bias."""
    items = np.asarray(items, dtype=np.int64)
    known = (items >= 1) & (items <= len(stats.mean))
    b_item = np.zeros(len(items))
    b_item[known] = stats.item_bias()[items[known] - 1]
    return np.clip(stats.mu + user_bias_ + b_item, 1.0, 5.0)
