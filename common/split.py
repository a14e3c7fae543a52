"""Per-user temporal train/test split."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from common.config import SplitConfig


@dataclass
class Split:
    train: pd.DataFrame
    test: pd.DataFrame

    @property
    def users(self) -> np.ndarray:
        return np.sort(self.test["user"].unique())


def temporal_split(ratings: pd.DataFrame, cfg: SplitConfig = SplitConfig()) -> Split:
    """Each kept user's oldest floor(train_frac * n) ratings (at least one) train, the rest test.

    Users are kept by their rating count, then (if `cfg.users`) a fixed seeded sample of them.

    Ties in time are broken by item id so the split never depends on file order.
    """
    counts = ratings.groupby("user")["item"].transform("size")
    keep = counts >= max(cfg.min_ratings, 2)
    if cfg.max_ratings is not None:
        keep &= counts <= cfg.max_ratings
    if cfg.users is not None:
        keep &= ratings["user"].isin(sample_users(ratings.loc[keep, "user"].unique(), cfg.users, seed=0))
    df = ratings[keep].sort_values(["user", "ts", "item"], kind="stable").reset_index(drop=True)
    if df.empty:
        raise ValueError(f"no user satisfies {cfg}")
    n = df.groupby("user")["item"].transform("size").to_numpy()
    rank = df.groupby("user").cumcount().to_numpy()
    n_train = np.clip(np.floor(cfg.train_frac * n).astype(int), 1, n - 1)
    is_train = rank < n_train
    return Split(train=df[is_train].reset_index(drop=True), test=df[~is_train].reset_index(drop=True))


def sample_users(users: np.ndarray, n: int | None, seed: int) -> np.ndarray:
    """A fixed, seeded sample of `n` users (all of them when n is None or too large).

    The evaluation sample: the simulation's devices and the baseline rows derive the same one from it.
    """
    if n is None or n >= len(users):
        return np.sort(users)
    return np.sort(np.random.default_rng(seed).choice(np.sort(users), size=n, replace=False))


def validation_split(train: pd.DataFrame, fraction: float) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Each user's latest `fraction` of training ratings (by time, ties by item) as validation, the rest to fit;
    users with fewer than 5 training ratings keep them all. Tuning happens here, never on test ratings."""
    if fraction <= 0:
        return train, train.iloc[:0]
    df = train.sort_values(["user", "ts", "item"], kind="stable").reset_index(drop=True)
    n = df.groupby("user")["item"].transform("size").to_numpy()
    rank = df.groupby("user").cumcount().to_numpy()
    is_val = (n >= 5) & (rank >= n - np.maximum(1, np.floor(fraction * n).astype(int)))
    return df[~is_val].reset_index(drop=True), df[is_val].reset_index(drop=True)
