"""Rating prediction from a causal LM: five logits, never the full vocabulary.

The predicted rating is the expected value of softmax over the logits of the tokens "1".."5" at the
position that precedes the answer. Those five logits are the final hidden state times five rows of the
LM head, so we run the decoder only (no `lm_head` over ~50k tokens) and multiply by a 5 x hidden matrix.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from transformers import PreTrainedModel, PreTrainedTokenizerBase

RATING_TOKENS = ("1", "2", "3", "4", "5")
_RATING_VALUES = torch.arange(1, 6, dtype=torch.float32)


def rating_token_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    ids = []
    for digit in RATING_TOKENS:
        encoded = tokenizer(digit, add_special_tokens=False)["input_ids"]
        if len(encoded) != 1:
            raise ValueError(f"tokenizer splits rating {digit!r} into {encoded}; need one token per digit")
        ids.append(encoded[0])
    return ids


def _causal_lm(model: torch.nn.Module) -> PreTrainedModel:
    # A peft PeftModel wraps the transformers model; LoRA layers are injected in place inside it.
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def decoder(model: torch.nn.Module) -> torch.nn.Module:
    """The transformer body that returns final (normed) hidden states."""
    return _causal_lm(model).get_decoder()


class RatingHead:
    """Five rows of a model's LM head, read live so training of the head (if any) is seen."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase):
        self.token_ids = torch.tensor(rating_token_ids(tokenizer))

    def logits(self, model: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [N, H] -> logits [N, 5]."""
        head = _causal_lm(model).get_output_embeddings()
        ids = self.token_ids.to(head.weight.device)
        logits = hidden @ head.weight[ids].T
        if getattr(head, "bias", None) is not None:
            logits = logits + head.bias[ids]
        return logits


def expected_rating(logits: torch.Tensor) -> torch.Tensor:
    return torch.softmax(logits.float(), dim=-1) @ _RATING_VALUES.to(logits.device)


def base_prior_logits(base: torch.Tensor, sd: float = 1.0, iterations: int = 40) -> torch.Tensor:
    """Log-probabilities [N, 5] of a discretised normal over 1..5 whose *expected rating equals* `base` [N].

    Added to the LM's five logits, they make the adapter learn a correction to a base predictor (the user+item bias
    model) instead of the whole rating, as boosting starts from a base margin: where the LM's logits are flat the
    prediction is exactly the base, so the adapter's capacity goes to what the base misses. The normal's centre is
    found by bisection (the expected value grows monotonically with it); bases are clipped into (1, 5), where a
    centre exists.
    """
    values = _RATING_VALUES.to(base.device)
    target = base.float().clamp(1.01, 4.99)[:, None]
    # the centre that reaches an expected rating of 1.01 (or 4.99) lies within 10 sd^2 of the end of the scale
    low, high = torch.full_like(target, 1.0 - 10 * sd * sd), torch.full_like(target, 5.0 + 10 * sd * sd)
    for _ in range(iterations):
        mid = (low + high) / 2
        mean = torch.softmax(-((values - mid) ** 2) / (2 * sd * sd), dim=-1) @ values
        above = mean[:, None] > target
        high, low = torch.where(above, mid, high), torch.where(above, low, mid)
    return torch.log_softmax(-((values - (low + high) / 2) ** 2) / (2 * sd * sd), dim=-1)


def rating_nll(logits: torch.Tensor, ratings: torch.Tensor) -> torch.Tensor:
    """Per-rating cross-entropy over the five digit logits against the true (rounded) rating."""
    return F.cross_entropy(logits.float(), (ratings.round().long() - 1).clamp(0, 4), reduction="none")


def rating_loss(logits: torch.Tensor, ratings: torch.Tensor, mse_weight: float = 0.0) -> torch.Tensor:
    """Mean cross-entropy over the five digit logits against the true (rounded) rating, optionally + MSE."""
    loss = rating_nll(logits, ratings).mean()
    if mse_weight:
        loss = loss + mse_weight * F.mse_loss(expected_rating(logits), ratings.float())
    return loss


@torch.no_grad()
def encode_prefix(model: torch.nn.Module, prefix_ids: Sequence[int]):
    """The key/value cache of a prompt prefix (left untouched by `predict_with_prefix`, so it can be kept)."""
    device = next(model.parameters()).device
    return decoder(model)(input_ids=torch.tensor([list(prefix_ids)], device=device), use_cache=True).cache


@torch.no_grad()
def predict_with_prefix(
    model: torch.nn.Module,
    head: RatingHead,
    prefix_ids: Sequence[int],
    suffixes: Sequence[Sequence[int]],
    batch_size: int = 32,
    pad_id: int = 0,
    cache=None,
    base: Sequence[float] | None = None,
) -> np.ndarray:
    """Expected ratings for several items that share one prompt prefix.

    The prefix runs once (or not at all when its `cache` from `encode_prefix` is given); its key/value cache is
    reused for every batch of suffixes. Suffixes are sorted by length and right-padded only to their batch's
    longest, and the causal mask keeps padding from affecting the real tokens before it, so the hidden state at
    each suffix's last token is exact. With `base` (one base prediction per suffix) the adapter's logits are a
    correction to it (`base_prior_logits`), as it was trained.
    """
    device = next(model.parameters()).device
    body = decoder(model)
    cache = encode_prefix(model, prefix_ids) if cache is None else cache
    out = np.empty(len(suffixes), dtype=np.float64)
    order = sorted(range(len(suffixes)), key=lambda i: len(suffixes[i]))
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        lengths = torch.tensor([len(suffixes[i]) for i in idx], device=device)
        batch = torch.full((len(idx), int(lengths.max())), pad_id, dtype=torch.long, device=device)
        for row, i in enumerate(idx):
            batch[row, : len(suffixes[i])] = torch.tensor(suffixes[i], device=device)
        batch_cache = copy.deepcopy(cache)
        batch_cache.batch_repeat_interleave(len(idx))
        hidden = body(input_ids=batch, cache=batch_cache, use_cache=True).last_hidden_state
        last = hidden[torch.arange(len(idx), device=device), lengths - 1]
        logits = head.logits(model, last)
        if base is not None:
            logits = logits + base_prior_logits(torch.tensor([base[i] for i in idx], device=device))
        out[idx] = expected_rating(logits).cpu().numpy()
    return out
