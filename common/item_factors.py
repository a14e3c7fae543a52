"""Matrix factorisation learned federatedly: public item factors, private user factors (issue #17's collaborative
base, the one classical model that beats user+item bias on the paper protocol).

The model is MF with biases, r(u, i) = mu + b_u + b_i + p_u . q_i. Its item half (mu, b, Q) is what the
coordinator learns and releases; its user half (b_u, p_u) is fitted on the device and leaves it only once, clipped,
for the population centre (below). One round:

1. the coordinator sends the current item half to every device;
2. each device fits its own user half to its ratings in closed form (`fit_user`: ridge regression on the item
   factors, the user step of alternating least squares) and answers with the gradient of its own squared error
   (plus the per-rating L2 penalty of the items it rated) with respect to the item half (`contribution`);
3. the answer is clipped to an L2 `bound` (one user moves the sum by at most that), the sum over devices gets
   Gaussian noise under user-level DP, and the coordinator takes an Adam step on it (`ItemFactorTrainer`).

After the rounds, one more release: the population's mean user half (`user_half` from each device, clipped to
`USER_HALF_BOUND`, summed and noised like a round, divided by the number of devices asked). It is where a device's
own user half is shrunk to (`fit_user`'s prior centre) instead of zero, and what a device with no rating predicts
with: MF's item half is fitted beside user terms whose mean is not zero (the mean user's factor vector has a
quarter of a typical user's norm at 943 users), so zero is the wrong guess for someone the ratings say little about.

The sum of the devices' gradients is exactly the gradient of the centralised MF loss (every rating weighted once,
L2 on the factors each rating uses), so without clipping or noise this is MF trained by full-batch Adam on items
and exact minimisation on users. Every round is a release over all devices (sample rate 1): `rounds` releases
compose in the accountant like discovery's (`server/server_app.py`), so the round count is a privacy knob, not
only a compute one. Everything after the noisy sum (the Adam step, the user fit on the device) is post-processing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

CENTRE = 3.0  # where mu starts: the middle of the 1..5 scale
# L2 bound of one device's user half (b_u, p_u) in the population-centre release: its sensitivity. A typical user
# half has norm ~0.65 at 943 users; 2 clips the few extreme raters only.
USER_HALF_BOUND = 2.0


def gradient_shapes(n_items: int, rank: int) -> dict[str, tuple[int, ...]]:
    """A device's item-half gradient, array by array, in the order every sum over devices (plain or secure) lays
    it out."""
    return {"mu": (1,), "bias": (n_items,), "factors": (n_items, rank)}


@dataclass
class ItemFactors:
    """The released item half of MF: global mean `mu`, `bias[i-1]` and `factors[i-1]` for movie id i; with
    `centre`, the population's mean user half [b_u, p_u...] released after the rounds (`fit_user` shrinks toward it)."""

    mu: float
    bias: np.ndarray  # [n_items]
    factors: np.ndarray  # [n_items, rank]
    centre: np.ndarray | None = None  # [1 + rank]; None: zero (a release made without it)

    @property
    def rank(self) -> int:
        return int(self.factors.shape[1])

    @classmethod
    def initial(cls, n_items: int, rank: int, seed: int = 0) -> "ItemFactors":
        """Small random factors (the symmetric start, all zeros, is a saddle the gradient never leaves); the draw
        is public (seeded), so it costs no privacy."""
        rng = np.random.default_rng(seed)
        return cls(CENTRE, np.zeros(n_items), 0.1 * rng.standard_normal((n_items, rank)))

    def to_arrays(self) -> dict[str, np.ndarray]:
        return {"mu": np.array([self.mu], np.float32), "bias": self.bias.astype(np.float32),
                "factors": self.factors.astype(np.float32),
                **({} if self.centre is None else {"centre": self.centre.astype(np.float32)})}

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> "ItemFactors":
        mu = np.asarray(arrays["mu"], np.float64).reshape(-1)
        bias, factors = np.asarray(arrays["bias"], np.float64), np.asarray(arrays["factors"], np.float64)
        if (mu.shape != (1,) or bias.ndim != 1 or factors.ndim != 2 or factors.shape[0] != bias.shape[0]
                or factors.shape[1] < 1 or not (np.isfinite(mu).all() and np.isfinite(bias).all()
                                                and np.isfinite(factors).all())):
            raise ValueError("item factors must be a finite mean, a bias vector and a factor matrix of one length")
        centre = None
        if "centre" in arrays:
            centre = np.asarray(arrays["centre"], np.float64).reshape(-1)
            if centre.shape != (1 + factors.shape[1],) or not np.isfinite(centre).all():
                raise ValueError("item factors: the centre must be a finite user half (1 + rank values)")
        return cls(float(np.clip(mu[0], 1.0, 5.0)), bias, factors, centre)


def release_arrays(model: ItemFactors, reg: float, prior: float = 0.0) -> dict[str, np.ndarray]:
    """What is released and stored (`item_factors.npz`, messages, a device's serving context): the item half and
    the penalty devices must fit their user half with (per rating, and the prior count: `fit_user`)."""
    return {**model.to_arrays(), "reg": np.array([reg], np.float32), "prior": np.array([prior], np.float32)}


def read_release(arrays) -> tuple[ItemFactors, float, float]:
    """`release_arrays`' inverse, (item half, penalty, prior count), refused (ValueError) when a field is missing,
    misshapen or non-finite, the penalty is not a finite positive number or the prior count not a finite one >= 0.
    A release without a prior count (written before it existed) has none."""
    reg = float(np.asarray(arrays["reg"]).reshape(-1)[0])
    if not 0.0 < reg < float("inf"):
        raise ValueError(f"item factors: the penalty must be finite and > 0, got {reg}")
    prior = float(np.asarray(arrays["prior"]).reshape(-1)[0]) if "prior" in arrays else 0.0
    if not 0.0 <= prior < float("inf"):
        raise ValueError(f"item factors: the prior count must be finite and >= 0, got {prior}")
    fields = {k: np.asarray(arrays[k]) for k in ("mu", "bias", "factors", "centre") if k in arrays}
    return ItemFactors.from_arrays(fields), reg, prior


def _known(items: np.ndarray, ratings: np.ndarray, n_items: int) -> tuple[np.ndarray, np.ndarray]:
    """0-based indices and ratings of the rows a device can use: movies in the catalogue, finite ratings (clipped
    to the scale), each movie once (its last rating)."""
    items, ratings = np.asarray(items, np.int64).reshape(-1), np.asarray(ratings, np.float64).reshape(-1)
    keep = (items >= 1) & (items <= n_items) & np.isfinite(ratings)
    items, ratings = items[keep] - 1, np.clip(ratings[keep], 1.0, 5.0)
    _, last = np.unique(items[::-1], return_index=True)  # first occurrence in the reversed order: the last rating
    last = len(items) - 1 - last
    return items[last], ratings[last]


def fit_user(items: np.ndarray, ratings: np.ndarray, model: ItemFactors, reg: float, prior: float = 0.0
             ) -> tuple[float, np.ndarray]:
    """The device's own (b_u, p_u): ridge regression of its residuals r - mu - b_i on [1, q_i], with the per-rating
    penalty of centralised MF (reg x its number of ratings) plus `prior` ratings' worth more. The prior count is what
    exact minimisation lacks against classical MF, whose early-stopped gradient descent grows a light user's factors
    only as far as their few ratings pull them. The penalty pulls toward the released population centre (the mean
    user half), or zero without one. No ratings: that centre (`zero_user`)."""
    idx, r = _known(items, ratings, len(model.bias))
    if len(idx) == 0:
        return zero_user(model)
    x = np.hstack([np.ones((len(idx), 1)), model.factors[idx]])
    y = r - model.mu - model.bias[idx]
    lam = reg * (len(idx) + prior)
    centre = np.zeros(x.shape[1]) if model.centre is None else model.centre
    theta = np.linalg.solve(x.T @ x + lam * np.eye(x.shape[1]), x.T @ y + lam * centre)
    return float(theta[0]), theta[1:]


def out_of_fold(items: np.ndarray, ratings: np.ndarray, model: ItemFactors, reg: float, prior: float = 0.0,
                folds: int = 5, seed: int = 0) -> np.ndarray:
    """MF's prediction for each of one user's ratings from user factors fitted on the other folds of them (folds
    drawn from `seed`, the user id on a device): the base a residual target is measured against without the
    in-sample fit having absorbed the rating's own residual."""
    items, ratings = np.asarray(items), np.asarray(ratings)
    fold = np.random.default_rng(seed).integers(0, folds, size=len(items))
    out = np.empty(len(items))
    for f in range(folds):
        held = fold == f
        if held.any():
            out[held] = predict(fit_user(items[~held], ratings[~held], model, reg, prior), items[held], model)
    return out


def zero_user(model: ItemFactors) -> tuple[float, np.ndarray]:
    """The user half of someone with no ratings: the released population centre, or zero (the item half alone)
    for a release without one."""
    if model.centre is None:
        return 0.0, np.zeros(model.rank)
    return float(model.centre[0]), model.centre[1:].copy()


def user_half(items: np.ndarray, ratings: np.ndarray, model: ItemFactors, reg: float, prior: float = 0.0
              ) -> np.ndarray:
    """One device's answer to the population-centre query: its own (b_u, p_u) as one vector, fitted against the
    item half (and its centre, if any), clipped to `USER_HALF_BOUND`. A device with no ratings answers zeros
    (counted among those asked, as an empty answer is everywhere else)."""
    if len(_known(items, ratings, len(model.bias))[0]) == 0:
        return np.zeros(1 + model.rank)
    b_u, p_u = fit_user(items, ratings, model, reg, prior)
    return clip({"half": np.concatenate([[b_u], p_u])}, USER_HALF_BOUND)["half"]


def predict(user: tuple[float, np.ndarray], items: np.ndarray, model: ItemFactors) -> np.ndarray:
    """mu + b_u + b_i + p_u . q_i, clipped to the scale; movies outside the catalogue get the user's part only."""
    b_u, p_u = user
    items = np.asarray(items, np.int64).reshape(-1)
    known = (items >= 1) & (items <= len(model.bias))
    idx = items[known] - 1
    item_part = np.zeros(len(items))
    item_part[known] = model.bias[idx] + model.factors[idx] @ p_u
    return np.clip(model.mu + b_u + item_part, 1.0, 5.0)


def contribution(items: np.ndarray, ratings: np.ndarray, model: ItemFactors, reg: float, prior: float = 0.0
                 ) -> dict[str, np.ndarray]:
    """One device's answer: the gradient of its own loss, sum over its ratings of (r - prediction)^2 plus
    reg (b_i^2 + |q_i|^2), with respect to (mu, b, Q), at its freshly fitted user half. Dense over the catalogue
    (zero outside the movies it rated) so that every answer has the same shape, as secure aggregation needs."""
    n_items, rank = model.factors.shape
    out = {"mu": np.zeros(1), "bias": np.zeros(n_items), "factors": np.zeros((n_items, rank))}
    idx, r = _known(items, ratings, n_items)
    if len(idx) == 0:
        return out
    b_u, p_u = fit_user(idx + 1, r, model, reg, prior)
    err = model.mu + b_u + model.bias[idx] + model.factors[idx] @ p_u - r  # unclipped: the loss is smooth
    out["mu"][0] = 2.0 * err.sum()
    out["bias"][idx] = 2.0 * err + 2.0 * reg * model.bias[idx]
    out["factors"][idx] = 2.0 * err[:, None] * p_u[None, :] + 2.0 * reg * model.factors[idx]
    return out


def norm(arrays: dict[str, np.ndarray]) -> float:
    return math.sqrt(sum(float(np.sum(np.asarray(a, np.float64) ** 2)) for a in arrays.values()))


def clip(arrays: dict[str, np.ndarray], bound: float) -> dict[str, np.ndarray]:
    """Scaled to L2 norm <= `bound` as a whole (the user-level sensitivity of the sum); within it, unchanged."""
    total = norm(arrays)
    scale = 1.0 if total <= bound else bound / total
    return {k: np.asarray(v, np.float64) * scale for k, v in arrays.items()}


def cohort_size(devices: int, fraction: float) -> int:
    """How many of `devices` one item-factors round asks: ceil(fraction x devices), at least two (a sum of one
    device's gradient would be that device's) and at most all of them. `fraction` must be in (0, 1]."""
    if not 0.0 < fraction <= 1.0:  # also refuses NaN
        raise ValueError(f"item-factors fraction must be in (0, 1], got {fraction!r}")
    return min(devices, max(2, math.ceil(fraction * devices - 1e-9)))


@dataclass
class ItemFactorTrainer:
    """The coordinator's side: Adam on the item half from the (clipped, noised) sum of the devices' gradients.

    `ratings` divides the summed gradient before the step: the number of ratings it sums over makes it the
    mean-loss gradient of centralised MF (the LM-free measurement passes that); the coordinator, which does not know
    it, passes the device count. Adam's step is invariant to that scale (up to its eps), so `lr` means the same thing
    either way, and the same as in `simulations.classical.MatrixFactorization`."""

    model: ItemFactors
    lr: float = 0.02
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    step_count: int = 0
    _m: dict[str, np.ndarray] = field(default_factory=dict)
    _v: dict[str, np.ndarray] = field(default_factory=dict)

    def step(self, summed: dict[str, np.ndarray], ratings: float) -> ItemFactors:
        self.step_count += 1
        b1, b2 = self.betas
        params = {"mu": np.array([self.model.mu]), "bias": self.model.bias, "factors": self.model.factors}
        new = {}
        for k, p in params.items():
            g = np.asarray(summed[k], np.float64) / max(ratings, 1.0)
            self._m[k] = b1 * self._m.get(k, 0.0) + (1 - b1) * g
            self._v[k] = b2 * self._v.get(k, 0.0) + (1 - b2) * g * g
            m_hat = self._m[k] / (1 - b1 ** self.step_count)
            v_hat = self._v[k] / (1 - b2 ** self.step_count)
            new[k] = p - self.lr * m_hat / (np.sqrt(v_hat) + self.eps)
        self.model = ItemFactors(float(np.clip(new["mu"][0], 1.0, 5.0)), new["bias"], new["factors"])
        return self.model
