"""Long-term memory: the user's past rated movies most similar to the movie being rated, recalled into its prompt.

The profile (short-term memory, `common.prompt.user_profile`) is the same for every movie; long-term memory is per
movie, so it goes into the movie's suffix. Similarity is cosine between all-MiniLM-L6-v2 embeddings of the movies'
texts (title, year, genres) — public catalogue data, embedded on the device; nothing about the user leaves it.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from common.personas import embed_profiles
from common.prompt import movie_text, rated_titles

_CATALOGUE: dict[str, object] = {}  # the last catalogue seen: its object, content key and embeddings


def catalogue_embeddings(items: pd.DataFrame) -> pd.Series:
    """Unit embedding per item id, computed once per catalogue in this process: the same object is a dictionary
    hit, and a re-read of the same catalogue (a device re-reads its data file as it grows) is not embedded again."""
    if _CATALOGUE.get("items") is items:
        return _CATALOGUE["embeddings"]
    texts = [movie_text(items.loc[i]) for i in items.index]
    key = hash((tuple(items.index), tuple(texts)))
    if _CATALOGUE.get("key") != key:
        _CATALOGUE.update(key=key, embeddings=pd.Series(list(embed_profiles(texts)), index=items.index))
    _CATALOGUE["items"] = items
    return _CATALOGUE["embeddings"]


def recall(item: int, history: pd.DataFrame, embeddings: pd.Series, k: int) -> pd.DataFrame:
    """Up to `k` rows of `history` (columns item, rating) most similar to `item`, most similar first; the item
    itself is never recalled (its rating is what is being predicted)."""
    history = history[history["item"] != item]
    if k <= 0 or history.empty:
        return history.iloc[:0]
    past = np.stack(embeddings.loc[history["item"]].to_numpy())
    similarity = past @ embeddings.loc[item]
    order = np.argsort(-similarity, kind="stable")[:k]
    return history.iloc[order]


def memory_text(recalled: pd.DataFrame, items: pd.DataFrame) -> str:
    """'Similar movies they rated: Alien (1979): 5/5; Aliens (1986): 4/5.' (empty when nothing is recalled)."""
    if recalled.empty:
        return ""
    return f"Similar movies they rated: {rated_titles(recalled, items)}."


def recalled_text(item: int, history: pd.DataFrame, items: pd.DataFrame, embeddings: pd.Series, k: int) -> str:
    """The long-term memory line for rating `item`: recall, then text."""
    return memory_text(recall(item, history, embeddings, k), items)
