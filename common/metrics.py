"""Rating-error metrics and membership-inference attack metrics."""

from __future__ import annotations

import numpy as np


def rmse(pred: np.ndarray, true: np.ndarray) -> float:
    return float(np.sqrt(np.mean((np.asarray(pred, float) - np.asarray(true, float)) ** 2)))


def mae(pred: np.ndarray, true: np.ndarray) -> float:
    return float(np.mean(np.abs(np.asarray(pred, float) - np.asarray(true, float))))


def attack_auc(member_scores, nonmember_scores) -> float:
    """Probability that a random member scores above a random non-member (ties count half): the attack's AUC."""
    m, n = np.asarray(member_scores, float)[:, None], np.asarray(nonmember_scores, float)[None, :]
    return float((m > n).mean() + 0.5 * (m == n).mean())


def attack_advantage(member_scores, nonmember_scores) -> float:
    """max over thresholds of TPR - FPR (0: the attack learns nothing; 1: it always tells members apart)."""
    m, n = np.asarray(member_scores, float), np.asarray(nonmember_scores, float)
    thresholds = np.unique(np.concatenate([m, n]))
    return float(max(((m >= t).mean() - (n >= t).mean() for t in thresholds), default=0.0))
