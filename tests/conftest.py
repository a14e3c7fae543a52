"""Small MovieLens-like data written by the tests, in all three on-disk formats."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import settings

from common.assets import cache_root

# The suite is derandomised by default: a run that lands must be a run anyone can repeat, and one unlucky draw
# must not block a submission. `HYPOTHESIS_PROFILE=explore pytest ...` searches fresh cases;
# anything it finds becomes a fixed `@example` or a fix.
settings.register_profile("repeatable", derandomize=True, database=None, print_blob=True)
settings.register_profile("explore", derandomize=False, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "repeatable"))

GENRES = ["Action", "Comedy", "Drama", "Horror", "Romance", "Sci-Fi"]
OCCUPATIONS = ["writer", "engineer", "student"]


def make_data(n_users: int = 12, n_items: int = 40, per_user: int = 25, seed: int = 0):
    """Ratings from a known low-rank-plus-bias model, so learners have something real to find."""
    rng = np.random.default_rng(seed)
    bu, bi = rng.normal(0, 0.6, n_users), rng.normal(0, 0.6, n_items)
    pu, qi = rng.normal(0, 0.7, (n_users, 2)), rng.normal(0, 0.7, (n_items, 2))
    rows = []
    for u in range(n_users):
        for k, i in enumerate(rng.choice(n_items, per_user, replace=False)):
            r = np.clip(np.round(3.5 + bu[u] + bi[i] + pu[u] @ qi[i] + rng.normal(0, 0.3)), 1, 5)
            rows.append((u + 1, int(i) + 1, int(r), 880_000_000 + 1000 * k + u))
    ratings = pd.DataFrame(rows, columns=["user", "item", "rating", "ts"])
    items = pd.DataFrame({
        "item": np.arange(1, n_items + 1),
        "title": [f"Movie {i}" if i % 5 else f"Classic {i}, The" for i in range(1, n_items + 1)],
        "year": 1980 + np.arange(n_items) % 20,
        "genres": [tuple(sorted({GENRES[i % 6], GENRES[(i * 7) % 6]})) for i in range(n_items)],
    })
    users = pd.DataFrame({
        "user": np.arange(1, n_users + 1),
        "age": 18 + np.arange(n_users) * 3,
        "gender": ["M" if u % 2 else "F" for u in range(n_users)],
        "occupation": [OCCUPATIONS[u % 3] for u in range(n_users)],
    })
    return ratings, items, users


def write_grouplens_100k(root: Path, ratings, items, users) -> Path:
    from common.data import ML100K_GENRES
    root.mkdir(parents=True, exist_ok=True)
    ratings.to_csv(root / "u.data", sep="\t", header=False, index=False)
    with open(root / "u.item", "w", encoding="latin-1") as f:
        for _, it in items.iterrows():
            flags = "|".join("1" if g in it["genres"] else "0" for g in ML100K_GENRES)
            f.write(f"{it['item']}|{it['title']} ({it['year']})|01-Jan-{it['year']}||http://x|{flags}\n")
    with open(root / "u.user", "w") as f:
        for _, us in users.iterrows():
            f.write(f"{us['user']}|{us['age']}|{us['gender']}|{us['occupation']}|12345\n")
    return root


def write_grouplens_1m(root: Path, ratings, items, users) -> Path:
    from common.data import ML1M_OCCUPATIONS
    root.mkdir(parents=True, exist_ok=True)
    codes = {"writer": 20, "engineer": 17, "student": 4}
    with open(root / "ratings.dat", "w") as f:
        for r in ratings.itertuples():
            f.write(f"{r.user}::{r.item}::{r.rating}::{r.ts}\n")
    with open(root / "movies.dat", "w", encoding="latin-1") as f:
        for _, it in items.iterrows():
            f.write(f"{it['item']}::{it['title']} ({it['year']})::{'|'.join(it['genres'])}\n")
    with open(root / "users.dat", "w") as f:
        for _, us in users.iterrows():
            f.write(f"{us['user']}::{us['gender']}::{us['age']}::{codes[us['occupation']]}::12345\n")
    assert ML1M_OCCUPATIONS[20] == "writer"
    return root


def write_atomic(root: Path, ratings, items, users) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    name = root.name
    with open(root / f"{name}.inter", "w") as f:
        f.write("user_id:token\titem_id:token\trating:float\ttimestamp:float\n")
        for r in ratings.itertuples():
            f.write(f"{r.user}\t{r.item}\t{r.rating}\t{r.ts}\n")
    with open(root / f"{name}.item", "w") as f:
        f.write("item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq\n")
        for _, it in items.iterrows():
            f.write(f"{it['item']}\t{it['title']}\t{it['year']}\t{' '.join(it['genres'])}\n")
    with open(root / f"{name}.user", "w") as f:
        f.write("user_id:token\tage:token\tgender:token\toccupation:token\tzip_code:token\n")
        for _, us in users.iterrows():
            f.write(f"{us['user']}\t{us['age']}\t{us['gender']}\t{us['occupation']}\t12345\n")
    return root


@pytest.fixture
def raw_data():
    return make_data()


@pytest.fixture
def ml100k_dir(tmp_path, raw_data) -> Path:
    return write_grouplens_100k(tmp_path / "ml-100k-grouplens", *raw_data)


# The user's real asset cache, read before any test redirects it.
REAL_CACHE = cache_root()


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch):
    """Tests use an empty cache of their own; only the optional real-model test points at REAL_CACHE."""
    monkeypatch.setenv("PERSONAFL_CACHE", str(tmp_path / "cache"))
