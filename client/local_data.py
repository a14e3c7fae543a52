"""A deployed device's own data: its owner's interactions file and sign-up answers, over the public catalogue.

The interactions file is either MovieLens `u.data` style (tab-separated `user item rating timestamp`, the user
column ignored) or JSONL (`{"item": 50, "rating": 4, "ts": 881250949}` per line). It is re-read when it changes
(size or modification time), so ratings the app appends reach the profile and the next training round.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import pandas as pd

from common.data import MovieLens, load_movielens

class LocalDataError(ValueError):
    """An interactions or profile file the device cannot use; the message names the file and line."""


@dataclass(frozen=True)
class Owner:
    """The device's user: their id (a local name, used for seeds and the store) and sign-up answers."""

    user: int
    age: int
    gender: str
    occupation: str


def read_interactions(path: Path, user: int = 0) -> pd.DataFrame:
    path = Path(path)
    if not path.exists():
        raise LocalDataError(f"interactions file {path} not found")
    rows = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                if line.startswith("{"):
                    d = json.loads(line)
                    rows.append((int(d["item"]), float(d["rating"]), int(d.get("ts", number))))
                else:
                    _, item, rating, ts = line.split("\t")[:4]
                    rows.append((int(item), float(rating), int(ts)))
            except (ValueError, KeyError, TypeError) as e:
                raise LocalDataError(f"{path}:{number}: cannot read {line[:60]!r} ({e})") from None
    df = pd.DataFrame(rows, columns=["item", "rating", "ts"])
    bad = ~df["rating"].between(1, 5)
    if bad.any():
        raise LocalDataError(f"{path}: {int(bad.sum())} ratings outside 1..5")
    # A re-rated movie keeps its newest rating.
    df = df.sort_values(["ts", "item"], kind="stable").drop_duplicates("item", keep="last")
    return df.assign(user=user)[["user", "item", "rating", "ts"]].reset_index(drop=True)


@lru_cache(maxsize=4)
def _catalogue(name: str) -> pd.DataFrame:
    return load_movielens(name).items


@lru_cache(maxsize=8)
def _cached(path: str, stamp: tuple, catalogue: str, owner: Owner) -> MovieLens:
    ratings = read_interactions(Path(path), owner.user)
    items = _catalogue(catalogue)
    unknown = sorted(set(ratings["item"]) - set(items.index))
    if unknown:
        raise LocalDataError(f"{path}: items {unknown[:5]} are not in the {catalogue} catalogue")
    users = pd.DataFrame({"age": [owner.age], "gender": [owner.gender], "occupation": [owner.occupation]},
                         index=pd.Index([owner.user], name="user"))
    return MovieLens(f"device:{Path(path).name}", ratings, items, users)


def device_data(path: Path, catalogue: str, owner: Owner) -> MovieLens:
    """The owner's data set, re-read whenever the file's size or modification time changes."""
    st = Path(path).stat() if Path(path).exists() else None
    stamp = (st.st_size, st.st_mtime_ns) if st else ()
    return _cached(str(path), stamp, catalogue, owner)


def split_own(ratings: pd.DataFrame, holdout: float = 0.0) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(training, held-out) ratings of the device's owner. On a device every rating is training data (and profile)
    unless the owner asks for an evaluation hold-out: then the newest `holdout` fraction is held out (the same
    oldest-train rule as the simulation, at least one rating on each side). Not the simulation's 60/40 split: that
    would put the newest ratings, the ones the app just recorded, out of the profile and out of training."""
    if not 0 <= holdout < 1:
        raise ValueError(f"the evaluation hold-out is a fraction in [0, 1), got {holdout}")
    df = ratings.sort_values(["ts", "item"], kind="stable").reset_index(drop=True)
    if holdout == 0 or len(df) < 2:
        return df, df.iloc[:0]
    n_train = int(np.clip(np.floor((1 - holdout) * len(df)), 1, len(df) - 1))
    return df.iloc[:n_train].reset_index(drop=True), df.iloc[n_train:].reset_index(drop=True)
