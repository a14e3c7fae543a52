import numpy as np
import pytest
import torch

from common.adapters import adapter_arrays, add_lora
from common.config import LoraSettings, TrainConfig
from common.model import load_base_model
from common.scoring import RatingHead, expected_rating, predict_with_prefix
from common.training import PackedRow, pack, packed_rating_logits, train_local


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
