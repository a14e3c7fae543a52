"""Classical rating predictors: global mean, user+item bias, biased matrix factorisation.

All share `fit(train) -> self` and `predict(users, items) -> np.ndarray`, clipped to 1..5. Users or items
unseen in training fall back to the parts of the model they do have.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch


def _clip(x: np.ndarray) -> np.ndarray:
    return np.clip(x, 1.0, 5.0)


@dataclass
class GlobalMean:
    mu: float = 0.0

    def fit(self, train: pd.DataFrame) -> "GlobalMean":
        self.mu = float(train["rating"].mean())
        return self

    def predict(self, users, items) -> np.ndarray:
        return np.full(len(users), self.mu)


@dataclass
class Biases:
    """r ~ mu + b_user + b_item, fitted by alternating ridge updates (Koren's baseline predictor)."""

    reg_user: float = 5.0
    reg_item: float = 10.0
    iters: int = 15
    mu: float = 0.0
    bu: dict = field(default_factory=dict)
    bi: dict = field(default_factory=dict)

    def fit(self, train: pd.DataFrame) -> "Biases":
        self.mu = float(train["rating"].mean())
        u, i, r = train["user"].to_numpy(), train["item"].to_numpy(), train["rating"].to_numpy() - self.mu
        bu = pd.Series(0.0, index=np.unique(u))
        bi = pd.Series(0.0, index=np.unique(i))
        for _ in range(self.iters):
            res = pd.Series(r - bu.loc[u].to_numpy())
            g = res.groupby(i)
            bi = g.sum() / (g.size() + self.reg_item)
            res = pd.Series(r - bi.loc[i].to_numpy())
            g = res.groupby(u)
            bu = g.sum() / (g.size() + self.reg_user)
        self.bu, self.bi = bu.to_dict(), bi.to_dict()
        return self

    def predict(self, users, items) -> np.ndarray:
        return _clip(self.mu + np.array([self.bu.get(u, 0.0) for u in users])
                     + np.array([self.bi.get(i, 0.0) for i in items]))


@dataclass
class ItemBias(Biases):
    """mu + b_item only (Koren's item bias, regularised as in `Biases`): what a recommender can say to a user it
    knows nothing about, the cold-start baseline a persona adapter must beat."""

    reg_user: float = 0.0

    def fit(self, train: pd.DataFrame) -> "ItemBias":
        self.mu = float(train["rating"].mean())
        g = (train["rating"] - self.mu).groupby(train["item"])
        self.bu, self.bi = {}, (g.sum() / (g.size() + self.reg_item)).to_dict()
        return self


@dataclass
class MatrixFactorization:
    """r ~ mu + b_u + b_i + p_u . q_i, full-batch Adam with L2 on the factors used by each rating."""

    rank: int = 32
    reg: float = 0.05
    epochs: int = 300
    lr: float = 0.02
    seed: int = 0

    def fit(self, train: pd.DataFrame, valid: pd.DataFrame | None = None) -> "MatrixFactorization":
        """Train; with `valid`, keep the epoch count with the lowest validation RMSE."""
        # Multi-threaded scatter-add in the gather backward sums in a varying order; pin it for reproducibility.
        was = torch.are_deterministic_algorithms_enabled()
        torch.use_deterministic_algorithms(True)
        try:
            return self._fit(train, valid)
        finally:
            torch.use_deterministic_algorithms(was)

    def _fit(self, train: pd.DataFrame, valid: pd.DataFrame | None) -> "MatrixFactorization":
        self._users = {u: k for k, u in enumerate(np.unique(train["user"]))}
        self._items = {i: k for k, i in enumerate(np.unique(train["item"]))}
        gen = torch.Generator().manual_seed(self.seed)
        n_u, n_i = len(self._users), len(self._items)
        self.mu = float(train["rating"].mean())
        self.P = (0.01 * torch.randn(n_u, self.rank, generator=gen)).requires_grad_()
        self.Q = (0.01 * torch.randn(n_i, self.rank, generator=gen)).requires_grad_()
        self.bu = torch.zeros(n_u, requires_grad=True)
        self.bi = torch.zeros(n_i, requires_grad=True)
        u, i = self._index(train["user"], train["item"])
        r = torch.tensor(train["rating"].to_numpy(), dtype=torch.float32)
        opt = torch.optim.Adam([self.P, self.Q, self.bu, self.bi], lr=self.lr)
        if valid is not None:
            vu, vi = self._index(valid["user"], valid["item"])
            vr = valid["rating"].to_numpy()
        best = (float("inf"), self.epochs)
        for epoch in range(1, self.epochs + 1):
            opt.zero_grad()
            p, q = self.P[u], self.Q[i]
            pred = self.mu + self.bu[u] + self.bi[i] + (p * q).sum(1)
            l2 = (p.pow(2).sum(1) + q.pow(2).sum(1) + self.bu[u] ** 2 + self.bi[i] ** 2).mean()
            ((pred - r).pow(2).mean() + self.reg * l2).backward()
            opt.step()
            if valid is not None and epoch % 10 == 0:
                err = float(np.sqrt(np.mean((self._predict(vu, vi) - vr) ** 2)))
                if err < best[0]:
                    best = (err, epoch)
        self.best_valid_rmse, self.best_epochs = best[0], best[1]
        return self

    def _index(self, users, items) -> tuple[torch.Tensor, torch.Tensor]:
        return (torch.tensor([self._users.get(x, -1) for x in users]),
                torch.tensor([self._items.get(x, -1) for x in items]))

    def predict(self, users, items) -> np.ndarray:
        return self._predict(*self._index(users, items))

    @torch.no_grad()
    def _predict(self, u: torch.Tensor, i: torch.Tensor) -> np.ndarray:
        known_u, known_i = u >= 0, i >= 0
        uu, ii = u.clamp(min=0), i.clamp(min=0)
        pred = torch.full((len(u),), self.mu)
        pred += torch.where(known_u, self.bu[uu], 0.0) + torch.where(known_i, self.bi[ii], 0.0)
        pred += torch.where(known_u & known_i, (self.P[uu] * self.Q[ii]).sum(1), 0.0)
        return _clip(pred.numpy().astype(np.float64))


def out_of_fold(train: pd.DataFrame, fit, folds: int = 5, seed: int = 0) -> np.ndarray:
    """Each training row's prediction by a model that never saw it (`fit(ratings) -> model`, fitted once per fold
    on the other folds' rows), in `train`'s row order. A base for an adapter to correct must be scored this way on
    training rows: in-sample, a flexible model (MF) has already absorbed most of their residual, so the adapter
    would learn to correct errors far smaller than the ones it meets on new ratings."""
    fold = np.random.default_rng(seed).integers(0, folds, size=len(train))
    out = np.full(len(train), np.nan)
    for f in range(folds):
        held = fold == f
        if held.any():
            rows = train[held]
            out[held] = fit(train[~held]).predict(rows["user"].to_numpy(), rows["item"])
    return out


def tune_mf(train: pd.DataFrame, valid_frac: float = 0.1, seed: int = 0,
            grid: tuple[tuple[int, float], ...] = ((32, 0.1), (32, 0.15), (32, 0.2))
            ) -> MatrixFactorization:
    """Pick (rank, reg, epochs) on each user's newest `valid_frac` of training ratings, then refit on all."""
    df = train.sort_values(["user", "ts", "item"], kind="stable")
    n = df.groupby("user")["item"].transform("size").to_numpy()
    is_valid = df.groupby("user").cumcount().to_numpy() >= np.ceil((1 - valid_frac) * n)
    fit_part, valid = df[~is_valid], df[is_valid]
    scored = [(MatrixFactorization(rank=k, reg=reg, seed=seed).fit(fit_part, valid), k, reg) for k, reg in grid]
    best, k, reg = min(scored, key=lambda s: s[0].best_valid_rmse)
    return MatrixFactorization(rank=k, reg=reg, epochs=best.best_epochs, seed=seed).fit(train)
