"""Local LoRA training on one user's ratings, with packed shared-prefix sequences.

One packed row = the user's prefix (instruction + profile) followed by the suffixes of several movies. A
"tree" attention mask lets every movie block see the prefix and itself only, and each block's position ids
restart where the prefix ends, so each block's final hidden state is exactly what inference computes for
(prefix + that movie) alone. The prefix is therefore encoded once per row instead of once per rating, and
training and evaluation see the same computation. Loss is taken on five logits per movie, nothing else.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from common.config import TrainConfig
from common.scoring import RatingHead, decoder, rating_loss


@dataclass
class PackedRow:
    prefix: list[int]
    suffixes: list[list[int]]
    ratings: list[float]

    def __len__(self) -> int:
        return len(self.prefix) + sum(map(len, self.suffixes))


@dataclass
class PackedBatch:
    input_ids: torch.Tensor  # [B, L]
    attention_mask: torch.Tensor  # [B, 1, L, L] bool, True = may attend
    position_ids: torch.Tensor  # [B, L]
    rows: torch.Tensor  # [N] batch row of each rating
    positions: torch.Tensor  # [N] position whose hidden state predicts each rating
    ratings: torch.Tensor  # [N]
    tokens: int  # real (unpadded) tokens


def pack(rows: list[PackedRow], pad_id: int = 0) -> PackedBatch:
    """Rows padded on the right to the longest row only; padding is masked out of every real token."""
    length = max(len(r) for r in rows)
    ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), 1, length, length), dtype=torch.bool)
    pos = torch.zeros((len(rows), length), dtype=torch.long)
    which, where, target = [], [], []
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    for b, row in enumerate(rows):
        p = len(row.prefix)
        ids[b, :p] = torch.tensor(row.prefix)
        pos[b, :p] = torch.arange(p)
        mask[b, 0, :p, :p] = causal[:p, :p]
        start = p
        for suffix, rating in zip(row.suffixes, row.ratings):
            end = start + len(suffix)
            ids[b, start:end] = torch.tensor(suffix)
            pos[b, start:end] = torch.arange(p, p + len(suffix))
            mask[b, 0, start:end, :p] = True
            mask[b, 0, start:end, start:end] = causal[: end - start, : end - start]
            which.append(b), where.append(end - 1), target.append(rating)
            start = end
        # Padding attends to itself so no softmax row is empty; nothing real attends to it.
        mask[b, 0, start:, start:] = causal[: length - start, : length - start]
    return PackedBatch(ids, mask, pos, torch.tensor(which), torch.tensor(where),
                       torch.tensor(target, dtype=torch.float32), sum(len(r) for r in rows))


def packed_rating_logits(model: torch.nn.Module, head: RatingHead, batch: PackedBatch) -> torch.Tensor:
    device = next(model.parameters()).device
    hidden = decoder(model)(
        input_ids=batch.input_ids.to(device),
        attention_mask=batch.attention_mask.to(device),
        position_ids=batch.position_ids.to(device),
    ).last_hidden_state
    return head.logits(model, hidden[batch.rows.to(device), batch.positions.to(device)])


def make_rows(prefix: list[int], suffixes: list[list[int]], ratings: np.ndarray, cfg: TrainConfig,
              rng: np.random.Generator) -> list[PackedRow]:
    """`cfg.rows_per_step` rows of `cfg.items_per_row` movies drawn without replacement within a row."""
    rows = []
    for _ in range(cfg.rows_per_step):
        pick = rng.choice(len(suffixes), size=min(cfg.items_per_row, len(suffixes)), replace=False)
        rows.append(PackedRow(prefix, [suffixes[i] for i in pick], [float(ratings[i]) for i in pick]))
    return rows


def flops_per_token(model: torch.nn.Module, training: bool) -> float:
    """~2N FLOPs per token forward over the N non-embedding weights; training with a frozen base adds ~2N
    for input gradients (weight gradients only for the tiny LoRA matrices). Attention scores are ignored."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    embed = base.get_input_embeddings().weight.numel()
    n = sum(p.numel() for p in base.parameters()) - embed
    return (4.0 if training else 2.0) * n


def train_local(
    model: torch.nn.Module,
    head: RatingHead,
    prefix: list[int],
    suffixes: list[list[int]],
    ratings: np.ndarray,
    cfg: TrainConfig,
    optimizer: torch.optim.Optimizer | None = None,
    pad_id: int = 0,
) -> dict[str, float]:
    """Run `cfg.steps` optimiser steps on the trainable (LoRA) parameters; returns training metrics."""
    if len(suffixes) == 0:
        raise ValueError("no training ratings")
    rng = np.random.default_rng(cfg.seed)
    torch.manual_seed(cfg.seed)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = optimizer or torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    model.train()
    losses, tokens, start = [], 0, time.perf_counter()
    for _ in range(cfg.steps):
        batch = pack(make_rows(prefix, suffixes, ratings, cfg, rng), pad_id)
        logits = packed_rating_logits(model, head, batch)
        loss = rating_loss(logits, batch.ratings.to(logits.device), cfg.mse_weight)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        tokens += batch.tokens
    model.eval()
    seconds = time.perf_counter() - start
    return {
        "train_loss": float(np.mean(losses)),
        "train_loss_last": losses[-1],
        "train_tokens": float(tokens),
        "train_seconds": seconds,
        "tokens_per_s": tokens / seconds,
        "gflops_per_s": tokens * flops_per_token(model, training=True) / seconds / 1e9,
    }
