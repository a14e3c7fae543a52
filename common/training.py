"""Local LoRA training on one user's ratings, with packed shared-prefix sequences.

One packed row = the user's prefix (instruction + profile) followed by the suffixes of several movies. A
"tree" attention mask lets every movie block see the prefix and itself only, and each block's position ids
restart where the prefix ends, so each block's final hidden state is exactly what inference computes for
(prefix + that movie) alone. The prefix is therefore encoded once per row instead of once per rating, and
training and evaluation see the same computation. Loss is taken on five logits per movie, nothing else.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
import warnings
from dataclasses import dataclass

import numpy as np
import torch

from common.config import DeviceDP, TrainConfig
from common.privacy import PrivacyLedger
from common.scoring import RatingHead, base_prior_logits, decoder, rating_loss


@dataclass
class PackedRow:
    prefix: list[int]
    suffixes: list[list[int]]
    ratings: list[float]
    bases: list[float] | None = None  # each movie's base prediction when the adapter learns a correction to it

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
    bases: torch.Tensor | None = None  # [N] base predictions the logits correct (`common.scoring.base_prior_logits`)


def pack(rows: list[PackedRow], pad_id: int = 0) -> PackedBatch:
    """Rows padded on the right to the longest row only; padding is masked out of every real token."""
    if len({r.bases is None for r in rows}) > 1:
        raise ValueError("either every row carries base predictions or none does")
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
    bases = None if rows[0].bases is None else torch.tensor([b for r in rows for b in r.bases], dtype=torch.float32)
    return PackedBatch(ids, mask, pos, torch.tensor(which), torch.tensor(where),
                       torch.tensor(target, dtype=torch.float32), sum(len(r) for r in rows), bases)


def packed_rating_logits(model: torch.nn.Module, head: RatingHead, batch: PackedBatch) -> torch.Tensor:
    device = next(model.parameters()).device
    hidden = decoder(model)(
        input_ids=batch.input_ids.to(device),
        attention_mask=batch.attention_mask.to(device),
        position_ids=batch.position_ids.to(device),
    ).last_hidden_state
    logits = head.logits(model, hidden[batch.rows.to(device), batch.positions.to(device)])
    return logits if batch.bases is None else logits + base_prior_logits(batch.bases.to(device))


def make_rows(prefix: list[int], suffixes: list[list[int]], ratings: np.ndarray, cfg: TrainConfig,
              rng: np.random.Generator, bases: np.ndarray | None = None) -> list[PackedRow]:
    """`cfg.rows_per_step` rows of `cfg.items_per_row` movies drawn without replacement within a row."""
    rows = []
    for _ in range(cfg.rows_per_step):
        pick = rng.choice(len(suffixes), size=min(cfg.items_per_row, len(suffixes)), replace=False)
        rows.append(_row(prefix, suffixes, ratings, bases, pick))
    return rows


def _row(prefix, suffixes, ratings, bases, pick) -> PackedRow:
    return PackedRow(prefix, [suffixes[i] for i in pick], [float(ratings[i]) for i in pick],
                     None if bases is None else [float(bases[i]) for i in pick])


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
    bases: np.ndarray | None = None,
) -> dict[str, float]:
    """Run `cfg.steps` optimiser steps on the trainable (LoRA) parameters; returns training metrics. With `bases`
    (one base prediction per example) the adapter learns a correction to them (`base_prior_logits`)."""
    if len(suffixes) == 0:
        raise ValueError("no training ratings")
    rng = np.random.default_rng(cfg.seed)
    torch.manual_seed(cfg.seed)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = optimizer or torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    model.train()
    losses, tokens, start = [], 0, time.perf_counter()
    for _ in range(cfg.steps):
        batch = pack(make_rows(prefix, suffixes, ratings, cfg, rng, bases), pad_id)
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


def hashed_records(items, n_records: int, key: bytes) -> list[list[int]]:
    """The DP unit on a device: `n_records` records, each rating in the one its item id hashes to (HMAC-SHA256).

    A rating's record depends on its own item id only, never on the other ratings or on how many there are, so
    adding or removing one rating changes exactly one record (a partition by position in a shuffled list, as
    before, moved most ratings whenever one was added). Returns each record's example indices; some may be empty.
    """
    records: list[list[int]] = [[] for _ in range(n_records)]
    for i, item in enumerate(items):
        digest = hmac.new(key, str(int(item)).encode(), hashlib.sha256).digest()
        records[int.from_bytes(digest[:8], "big") % n_records].append(i)
    return records


def dp_sample_rate(records: int, cfg: TrainConfig) -> float:
    """The rate at which a DP step samples each record (1 / batches per pass, as Opacus accounts it). It depends on
    the public record count only, so it says nothing about how many ratings a device holds."""
    return 1 / -(-records // cfg.rows_per_step)


def _draw(record: list[int], size: int, rng: np.random.Generator) -> list[int]:
    """Up to `size` of a record's examples, at random when it holds more: a function of that record alone (and of
    independent randomness), so the row's clipped gradient keeps the record-level sensitivity."""
    if len(record) <= size:
        return record
    return [record[i] for i in sorted(rng.choice(len(record), size=size, replace=False))]


def _row_mean_loss(logits: torch.Tensor, batch: PackedBatch, rows: int, mse_weight: float) -> torch.Tensor:
    """Mean over rows of each row's mean rating loss: Opacus' "mean" reduction then yields per-record gradients."""
    target = batch.ratings.to(logits.device)
    which = batch.rows.to(logits.device)
    per_row = [rating_loss(logits[which == b], target[which == b], mse_weight) for b in range(rows)]
    return torch.stack(per_row).mean()


def train_local_dp(
    model: torch.nn.Module,
    head: RatingHead,
    prefix: list[int],
    suffixes: list[list[int]],
    ratings: np.ndarray,
    cfg: TrainConfig,
    dp: DeviceDP,
    ledger: PrivacyLedger,
    pad_id: int = 0,
    items=None,
    record_key: bytes = b"",
    bases: np.ndarray | None = None,
) -> dict[str, float]:
    """DP-SGD (Opacus, hooks mode on the LoRA layers) over the device's `dp.records` hashed records.

    `items` are the examples' item ids (default: their positions), hashed with `record_key` into records. Each step
    Poisson-samples records at rate `cfg.rows_per_step / dp.records`, packs up to `cfg.items_per_row` of a sampled
    record's ratings (drawn at random when it holds more) into one row, clips every row's gradient to
    `dp.max_grad_norm` and adds Gaussian noise (`dp.noise_multiplier` x that norm); `bases` as in `train_local`. The ledger is checked before
    anything runs (raises `BudgetExhausted`) and charged with Opacus' accountant history afterwards.

    Sampling, noise and the draw within a record come from one generator: seeded from `secrets` (never from the
    run's public seed) unless `dp.seed` is set, the simulations' reproducible mode. With `dp.secure_mode` the noise
    is Opacus' secure_mode noise.
    """
    from opacus import PrivacyEngine
    from torch.utils.data import DataLoader, TensorDataset

    if len(suffixes) == 0:
        raise ValueError("no training ratings")
    records = hashed_records(range(len(suffixes)) if items is None else items, dp.records, record_key)
    loader_rng = torch.Generator()
    loader = DataLoader(TensorDataset(torch.arange(dp.records)), batch_size=cfg.rows_per_step, generator=loader_rng)
    sample_rate = dp_sample_rate(dp.records, cfg)
    assert sample_rate == 1 / len(loader)  # what Opacus' make_private accounts with
    ledger.check(dp.noise_multiplier, sample_rate, cfg.steps)

    # 63 secret bits: the coordinator, who knows every public seed, cannot replay which records were drawn.
    seed = dp.seed if dp.seed is not None else secrets.randbits(63)
    loader_rng.manual_seed(seed)  # Opacus' DP data loader takes the original loader's generator for Poisson draws
    within = np.random.default_rng(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    model.train()  # Opacus refuses a module in eval mode (a shared runtime is left in eval after scoring)
    with warnings.catch_warnings():
        if dp.secure_mode or dp.seed is not None:
            # Opacus warns at construction that its secure RNG is off. Here it is either turned on just below (our
            # secretly seeded generator) or off on purpose: a seeded, reproducible simulation. A deployed device
            # without secure mode still gets the warning.
            warnings.filterwarnings("ignore", message="Secure RNG turned off", category=UserWarning)
        engine = PrivacyEngine(accountant="rdp")
    noise_generator = loader_rng
    if dp.secure_mode:
        # Opacus' secure_mode wants torchcsprng, which has no build for torch 2.x: its secure noise path runs on our
        # secretly seeded generator instead (engine attributes make_private reads; the loader uses it too).
        engine.secure_mode, engine.secure_rng, noise_generator = True, loader_rng, None
    hooks, optimizer, dp_loader = engine.make_private(
        module=model, optimizer=torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0), data_loader=loader,
        noise_multiplier=dp.noise_multiplier, max_grad_norm=dp.max_grad_norm, poisson_sampling=True,
        grad_sample_mode="hooks", wrap_model=False, noise_generator=noise_generator)
    model.train()
    losses, tokens, steps, start = [], 0, 0, time.perf_counter()
    try:
        while steps < cfg.steps:
            for (index,) in dp_loader:
                if steps == cfg.steps:
                    break
                optimizer.zero_grad(set_to_none=True)
                # An empty record adds a zero gradient to the sum: leaving it out of the batch is the same release.
                picked = [_draw(records[r], cfg.items_per_row, within) for r in index.tolist() if records[r]]
                if not picked:  # Poisson drew no (non-empty) record: the step is noise only
                    for p in params:
                        p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)
                else:
                    rows = [_row(prefix, suffixes, ratings, bases, rec) for rec in picked]
                    batch = pack(rows, pad_id)
                    loss = _row_mean_loss(packed_rating_logits(model, head, batch), batch, len(rows), cfg.mse_weight)
                    loss.backward()
                    losses.append(loss.item())
                    tokens += batch.tokens
                optimizer.step()
                steps += 1
    finally:
        hooks.cleanup()
        model.eval()
    ledger.record(engine.accountant.history)
    seconds = time.perf_counter() - start
    return {
        "train_loss": float(np.mean(losses)) if losses else float("nan"),
        "train_tokens": float(tokens),
        "train_seconds": seconds,
        "tokens_per_s": tokens / seconds,
        "gflops_per_s": tokens * flops_per_token(model, training=True) / seconds / 1e9,
        "epsilon": ledger.spent,
        "sample_rate": sample_rate,
    }
