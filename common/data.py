"""MovieLens loaders: the ML-100K copy inside the recbole wheel, GroupLens ML-100K and ML-1M directories.

Every loader returns the same `MovieLens` frames so the rest of the code never sees a file format:
ratings(user, item, rating, ts), items(title, year, genres) indexed by item, users(age, gender,
occupation) indexed by user.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from common.assets import AssetError, cache_root, extract, fetch_wheel, sha256_file

# Files of the recbole wheel's ML-100K, checked every time they are loaded.
RECBOLE_ML100K_SHA256 = {
    "ml-100k.inter": "4edb74e2a81178c2ba9ff381495f754f996c4aea351b1272ca36b43da0935eff",
    "ml-100k.item": "51d7cdf777ce5c0f5b32c1d947a4a81fe07d75e78abbe761e0cd4d0756064532",
    "ml-100k.user": "4f670007d9cfbeb9807e757209af1555b9bcc186bde25e767f67cb67c6dd5972",
}

ML100K_GENRES = (
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary",
    "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller",
    "War", "Western",
)

# ML-1M users.dat stores occupations as codes (see its README).
ML1M_OCCUPATIONS = (
    "other", "academic/educator", "artist", "clerical/admin", "college/grad student",
    "customer service", "doctor/health care", "executive/managerial", "farmer", "homemaker",
    "K-12 student", "lawyer", "programmer", "retired", "sales/marketing", "scientist",
    "self-employed", "technician/engineer", "tradesman/craftsman", "unemployed", "writer",
)


@dataclass
class MovieLens:
    name: str
    ratings: pd.DataFrame  # columns user, item, rating (float), ts (int)
    items: pd.DataFrame  # index item; columns title, year (Int64, may be NA), genres (tuple[str])
    users: pd.DataFrame  # index user; columns age (int), gender, occupation

    def __post_init__(self) -> None:
        missing_items = set(self.ratings["item"].unique()) - set(self.items.index)
        if missing_items:
            raise AssetError(f"{self.name}: {len(missing_items)} rated items have no metadata")
        bad = ~self.ratings["rating"].between(1, 5)
        if bad.any():
            raise AssetError(f"{self.name}: {int(bad.sum())} ratings outside 1..5")


def load_movielens(source: str | Path) -> MovieLens:
    """Load `ml-100k` (fetched and cached) or a local directory in recbole, GroupLens 100K or 1M format."""
    if str(source) == "ml-100k":
        return _load_atomic(_recbole_ml100k(), "ml-100k")
    path = Path(source).expanduser()
    if not path.is_dir():
        raise AssetError(
            f"unknown dataset {str(source)!r}: expected 'ml-100k' or a MovieLens directory "
            f"(ml-100k.inter, u.data or ratings.dat)"
        )
    if (path / "u.data").exists():
        return _load_grouplens_100k(path)
    if (path / "ratings.dat").exists():
        return _load_grouplens_1m(path)
    if list(path.glob("*.inter")):
        return _load_atomic(path, path.name)
    raise AssetError(f"{path} holds no MovieLens files (ml-100k.inter, u.data or ratings.dat)")


def _recbole_ml100k() -> Path:
    root = cache_root() / "data" / "ml-100k"
    if not root.exists():
        extract(fetch_wheel("recbole"), "recbole/dataset_example/ml-100k/", root)
    for name, expected in RECBOLE_ML100K_SHA256.items():
        f = root / name
        if not f.exists() or sha256_file(f) != expected:
            raise AssetError(f"{f} is missing or corrupt; delete {root} and run again to re-extract it")
    return root


def _read(path: Path, **kwargs) -> pd.DataFrame:
    if not path.exists():
        raise AssetError(f"missing data file {path}")
    try:
        return pd.read_csv(path, **kwargs)
    except (ValueError, pd.errors.ParserError, UnicodeDecodeError) as e:
        raise AssetError(f"cannot parse {path}: {e}") from e


def _ratings(df: pd.DataFrame, path: Path) -> pd.DataFrame:
    try:
        out = pd.DataFrame({
            "user": df.iloc[:, 0].astype("int64"),
            "item": df.iloc[:, 1].astype("int64"),
            "rating": df.iloc[:, 2].astype("float64"),
            "ts": df.iloc[:, 3].astype("int64"),
        })
    except (ValueError, TypeError, IndexError) as e:
        raise AssetError(f"malformed ratings in {path}: {e}") from e
    if out.empty:
        raise AssetError(f"no ratings in {path}")
    return out


def _load_atomic(root: Path, name: str) -> MovieLens:
    """RecBole atomic files: tab-separated with typed headers (`user_id:token` ...)."""
    stem = root / name
    inter = _read(stem.with_suffix(".inter"), sep="\t")
    item = _read(stem.with_suffix(".item"), sep="\t", dtype=str, keep_default_na=False)
    user = _read(stem.with_suffix(".user"), sep="\t", dtype=str, keep_default_na=False)
    items = pd.DataFrame({
        "title": [_readable_title(t) for t in item.iloc[:, 1]],
        "year": pd.to_numeric(item.iloc[:, 2], errors="coerce").astype("Int64").array,
        "genres": [tuple(g for g in s.split() if g != "unknown") for s in item.iloc[:, 3]],
    }, index=pd.Index(item.iloc[:, 0].astype("int64"), name="item"))
    # Plain arrays below: Series would be aligned on their RangeIndex, not on the ids.
    users = pd.DataFrame({
        "age": user.iloc[:, 1].astype("int64").to_numpy(),
        "gender": user.iloc[:, 2].to_numpy(),
        "occupation": user.iloc[:, 3].to_numpy(),
    }, index=pd.Index(user.iloc[:, 0].astype("int64"), name="user"))
    return MovieLens(name, _ratings(inter, stem.with_suffix(".inter")), items, users)


def _load_grouplens_100k(root: Path) -> MovieLens:
    data = _read(root / "u.data", sep="\t", header=None)
    item = _read(root / "u.item", sep="|", header=None, encoding="latin-1", dtype=str,
                 keep_default_na=False)
    user = _read(root / "u.user", sep="|", header=None, dtype=str)
    if item.shape[1] < 5 + len(ML100K_GENRES):
        raise AssetError(f"{root / 'u.item'}: expected {5 + len(ML100K_GENRES)} columns")
    flags = item.iloc[:, 5:5 + len(ML100K_GENRES)].to_numpy() == "1"
    titles, years = zip(*(_split_title_year(t) for t in item.iloc[:, 1]))
    items = pd.DataFrame({
        "title": list(titles),
        "year": pd.array(years, dtype="Int64"),
        "genres": [tuple(g for g, on in zip(ML100K_GENRES, row) if on and g != "unknown") for row in flags],
    }, index=pd.Index(item.iloc[:, 0].astype("int64"), name="item"))
    users = pd.DataFrame({
        "age": user.iloc[:, 1].astype("int64").to_numpy(),
        "gender": user.iloc[:, 2].to_numpy(),
        "occupation": user.iloc[:, 3].to_numpy(),
    }, index=pd.Index(user.iloc[:, 0].astype("int64"), name="user"))
    return MovieLens(root.name, _ratings(data, root / "u.data"), items, users)


def _read_dat(path: Path) -> pd.DataFrame:
    # '::' separated; the python engine handles the multi-character separator.
    return _read(path, sep="::", header=None, engine="python", encoding="latin-1", dtype=str,
                 keep_default_na=False)


def _load_grouplens_1m(root: Path) -> MovieLens:
    data = _read_dat(root / "ratings.dat")
    movies = _read_dat(root / "movies.dat")
    user = _read_dat(root / "users.dat")
    titles, years = zip(*(_split_title_year(t) for t in movies.iloc[:, 1]))
    items = pd.DataFrame({
        "title": list(titles),
        "year": pd.array(years, dtype="Int64"),
        "genres": [tuple(g for g in s.split("|") if g) for s in movies.iloc[:, 2]],
    }, index=pd.Index(movies.iloc[:, 0].astype("int64"), name="item"))
    try:
        occupation = [ML1M_OCCUPATIONS[int(c)] for c in user.iloc[:, 3]]
    except (ValueError, IndexError) as e:
        raise AssetError(f"{root / 'users.dat'}: bad occupation code: {e}") from e
    users = pd.DataFrame({
        "age": user.iloc[:, 2].astype("int64").to_numpy(),
        "gender": user.iloc[:, 1].to_numpy(),
        "occupation": occupation,
    }, index=pd.Index(user.iloc[:, 0].astype("int64"), name="user"))
    return MovieLens(root.name, _ratings(data, root / "ratings.dat"), items, users)


_YEAR = re.compile(r"^(.*?)\s*\((\d{4})\)\s*$")


def _split_title_year(raw: str) -> tuple[str, int | None]:
    m = _YEAR.match(raw)
    if not m:
        return _readable_title(raw.strip()), None
    return _readable_title(m.group(1)), int(m.group(2))


def _readable_title(title: str) -> str:
    """'Usual Suspects, The' -> 'The Usual Suspects' (MovieLens moves articles to the end)."""
    m = re.match(r"^(.*), (The|A|An|La|Le|Les|Il|El|Das|Der|Die)$", title.strip())
    return f"{m.group(2)} {m.group(1)}" if m else title.strip()
