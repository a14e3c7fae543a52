"""Typed configuration for the rating task, in one place."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SplitConfig:
    """Per-user temporal split: each user's oldest ratings train, newest test."""

    train_frac: float = 0.8
    min_ratings: int = 1  # users with fewer ratings are dropped
    max_ratings: int | None = None  # users with more ratings are dropped

    def __post_init__(self) -> None:
        if not 0.0 < self.train_frac < 1.0:
            raise ValueError(f"train_frac must be in (0, 1), got {self.train_frac}")
        if self.min_ratings < 1:
            raise ValueError(f"min_ratings must be >= 1, got {self.min_ratings}")
        if self.max_ratings is not None and self.max_ratings < self.min_ratings:
            raise ValueError("max_ratings must be >= min_ratings")


SPLIT_PRESETS: dict[str, SplitConfig] = {
    "default": SplitConfig(),
    # "Personas within Parameters" (arXiv 2509.09689): users with 100-200 ratings, 60/40 by time.
    "paper": SplitConfig(train_frac=0.6, min_ratings=100, max_ratings=200),
}


def split_preset(name: str) -> SplitConfig:
    try:
        return SPLIT_PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown split preset {name!r}; choose one of {sorted(SPLIT_PRESETS)}") from None


@dataclass(frozen=True)
class PromptConfig:
    """What goes into a user's short-term memory profile and the prompt around it."""

    top_genres: int = 3  # favourite and disliked genres listed
    min_genre_count: int = 3  # a genre needs this many ratings to count as liked/disliked
    recent_items: int = 5  # most recent rated movies listed with their rating
    use_chat_template: bool = True
    instruction: str = (
        "You predict how a user rates movies on a scale from 1 (hated it) to 5 (loved it). "
        "Answer with a single digit."
    )


@dataclass(frozen=True)
class ScoringConfig:
    """Batching of rating prediction and the training loss."""

    batch_size: int = 32  # rating items per forward pass
    mse_weight: float = 0.0  # loss = CE over the five digit logits + mse_weight * MSE(expected, true)


@dataclass(frozen=True)
class LoraSettings:
    """LoRA shape shared by every persona and personal adapter (they must be interchangeable)."""

    rank: int = 8
    alpha: int = 16
    dropout: float = 0.0
    targets: tuple[str, ...] = ("q_proj", "v_proj")


@dataclass(frozen=True)
class TrainConfig:
    """Local training on one device."""

    steps: int = 4  # optimiser steps per round
    rows_per_step: int = 2  # packed sequences per step (one user's profile + several movies each)
    items_per_row: int = 8  # rated movies packed behind one profile prefix
    lr: float = 3e-4
    mse_weight: float = 0.0
    seed: int = 0
