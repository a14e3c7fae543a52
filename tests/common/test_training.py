import numpy as np
import pytest
import torch

from common.adapters import adapter_arrays, add_lora
from opacus.accountants import RDPAccountant

from common.config import DeviceDP, LoraSettings, TrainConfig
from common.model import load_base_model
from common.privacy import BudgetExhausted, PrivacyLedger
from common.scoring import RatingHead, expected_rating, predict_with_prefix, rating_loss
from common.training import (PackedRow, fixed_records, pack, packed_rating_logits, train_local, train_local_dp)


@pytest.fixture
def peft_tiny():
    model, tok = load_base_model("tiny")
    peft_model = add_lora(model, LoraSettings(rank=4))
    with torch.no_grad():  # a non-zero adapter, so the check covers LoRA too
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
    return peft_model, RatingHead(tok)


def test_packed_rows_equal_separate_inference(peft_tiny):
    model, head = peft_tiny
    prefix, suffixes = [5, 6, 7, 8, 9], [[10, 11, 12], [13, 14], [15, 16, 17, 18]]
    batch = pack([PackedRow(prefix, suffixes, [1, 2, 3]), PackedRow(prefix[:3], suffixes[:1], [4])])
    assert batch.input_ids.shape == (2, 5 + 3 + 2 + 4)  # padded to the longest row only
    assert batch.tokens == 14 + 6
    with torch.no_grad():
        packed = expected_rating(packed_rating_logits(model, head, batch)).numpy()
    separate = np.concatenate([predict_with_prefix(model, head, prefix, suffixes),
                               predict_with_prefix(model, head, prefix[:3], suffixes[:1])])
    np.testing.assert_allclose(packed, separate, atol=1e-5)


def test_local_training_moves_predictions_towards_the_ratings(peft_tiny):
    model, head = peft_tiny
    prefix, suffixes = [5, 6, 7, 8, 9], [[10, 11, 12], [13, 14], [15, 16, 17, 18], [19, 20]]
    ratings = np.array([5.0, 5.0, 1.0, 1.0])
    before_pred = predict_with_prefix(model, head, prefix, suffixes)
    before = adapter_arrays(model)
    metrics = train_local(model, head, prefix, suffixes, ratings, TrainConfig(steps=30, lr=1e-2, items_per_row=4, rows_per_step=1))
    after_pred = predict_with_prefix(model, head, prefix, suffixes)
    assert np.abs(after_pred - ratings).mean() < np.abs(before_pred - ratings).mean() - 0.2
    after = adapter_arrays(model)
    assert any(not np.allclose(before[k], after[k]) for k in before)
    base_params = [n for n, p in model.named_parameters() if p.requires_grad and "lora_" not in n]
    assert base_params == []  # only LoRA weights are trainable
    assert metrics["train_loss_last"] < metrics["train_loss"]  # the last step is below the run's mean loss
    assert metrics["tokens_per_s"] > 0 and metrics["train_tokens"] == 30 * (5 + 3 + 2 + 4 + 2)


def test_training_refuses_an_empty_history(peft_tiny):
    model, head = peft_tiny
    with pytest.raises(ValueError, match="no training ratings"):
        train_local(model, head, [1, 2], [], np.array([]), TrainConfig())


def _heldout_loss(model, head, prefix, suffixes, ratings) -> float:
    with torch.no_grad():
        batch = pack([PackedRow(prefix, suffixes, list(ratings))])
        return float(rating_loss(packed_rating_logits(model, head, batch), batch.ratings))


def test_dp_sgd_changes_the_adapter_and_lowers_held_out_loss(peft_tiny):
    """Opacus issue #820 reports silently corrupted LoRA weights with some peft versions: check both effects."""
    model, head = peft_tiny
    model.eval()  # as a shared device runtime is after scoring: DP training must still run
    rng = np.random.default_rng(0)
    prefix = [5, 6, 7, 8, 9]
    suffixes = [list(rng.integers(20, 200, 4)) for _ in range(32)]
    ratings = np.full(32, 5.0)  # a learnable, general preference: held-out movies are liked too
    train_s, test_s = suffixes[:24], suffixes[24:]
    before_loss = _heldout_loss(model, head, prefix, test_s, ratings[24:])
    before = adapter_arrays(model)
    ledger = PrivacyLedger(budget=float("inf"), delta=1e-5)
    cfg = TrainConfig(steps=25, lr=1e-2, items_per_row=4, rows_per_step=2)
    metrics = train_local_dp(model, head, prefix, train_s, ratings[:24], cfg, DeviceDP(0.5, 1.0, 1e-5, 10.0), ledger,
                             noise_seed=0)
    after = adapter_arrays(model)
    assert any(not np.allclose(before[k], after[k]) for k in before)
    assert all(np.isfinite(v).all() for v in after.values())
    assert _heldout_loss(model, head, prefix, test_s, ratings[24:]) < before_loss - 0.1
    # 24 examples in fixed records of 4 -> 6 records, 2 per step: every record is sampled at rate 1/3.
    assert metrics["sample_rate"] == pytest.approx(1 / 3) and ledger.history == [(0.5, 1 / 3, 25)]
    reference = RDPAccountant()
    reference.history = [(0.5, 1 / 3, 25)]
    assert metrics["epsilon"] == pytest.approx(reference.get_epsilon(1e-5))


def test_dp_training_refuses_what_the_budget_cannot_afford_and_changes_nothing(peft_tiny):
    model, head = peft_tiny
    prefix, suffixes, ratings = [5, 6, 7], [[10, 11], [12, 13], [14, 15], [16, 17]], np.array([1.0, 2, 3, 4])
    ledger = PrivacyLedger(budget=1.0, delta=1e-5)
    before = adapter_arrays(model)
    with pytest.raises(BudgetExhausted, match="budget exhausted"):
        train_local_dp(model, head, prefix, suffixes, ratings, TrainConfig(steps=50, items_per_row=1, rows_per_step=1),
                       DeviceDP(0.5, 1.0, 1e-5, 1.0), ledger)
    assert ledger.history == [] and all(np.array_equal(before[k], v) for k, v in adapter_arrays(model).items())


def test_fixed_records_partition_every_example_once_and_do_not_depend_on_the_round():
    records = fixed_records(10, 4, seed=3)
    assert sorted(i for r in records for i in r) == list(range(10)) and [len(r) for r in records] == [4, 4, 2]
    assert fixed_records(10, 4, seed=3) == records
