"""Score a user's held-out ratings with a language model (base, or base + adapter)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from common.config import PromptConfig, ScoringConfig
from common.memory import catalogue_embeddings, recalled_text
from common.prompt import PromptBuilder, movie_text, user_profile
from common.scoring import RatingHead, predict_with_prefix


def predict_users(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    items: pd.DataFrame,
    train: pd.DataFrame,
    test: pd.DataFrame,
    users: np.ndarray | list[int],
    prompt: PromptConfig = PromptConfig(),
    scoring: ScoringConfig = ScoringConfig(),
    progress: bool = True,
    memory_items: int = 0,
) -> pd.DataFrame:
    """Predicted ratings for every test row of `users`: the test rows with a `pred` column added.

    Each user's profile comes from their training ratings only; their prefix is encoded once. With
    `memory_items`, each movie's prompt also recalls that many of the user's most similar training ratings.
    """
    builder = PromptBuilder(tokenizer, prompt)
    head = RatingHead(tokenizer)
    suffix_cache: dict[int, list[int]] = {}
    train_by_user = dict(tuple(train.groupby("user")))
    test_by_user = dict(tuple(test[test["user"].isin(users)].groupby("user")))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    embeddings = catalogue_embeddings(items) if memory_items > 0 else None
    parts = []
    for user in tqdm(list(users), desc="SLM scoring", unit="user", disable=not progress):
        rows = test_by_user.get(user)
        if rows is None:
            continue
        history = train_by_user.get(user, train.iloc[:0])
        profile = user_profile(history, items, prompt)
        suffixes = []
        for item in rows["item"]:
            if memory_items > 0:  # depends on the user: not cached
                memory = recalled_text(item, history, items, embeddings, memory_items)
                suffixes.append(builder.suffix_ids(movie_text(items.loc[item]), memory))
                continue
            if item not in suffix_cache:
                suffix_cache[item] = builder.suffix_ids(movie_text(items.loc[item]))
            suffixes.append(suffix_cache[item])
        pred = predict_with_prefix(model, head, builder.prefix_ids(profile), suffixes,
                                   batch_size=scoring.batch_size, pad_id=pad_id)
        parts.append(rows.assign(pred=pred))
    if not parts:
        raise ValueError("none of the requested users has test ratings")
    return pd.concat(parts, ignore_index=True)
