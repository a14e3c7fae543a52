import numpy as np
import pytest
import torch

from common.adapters import adapter_arrays, add_lora
from opacus.accountants import RDPAccountant

from common.config import DeviceDP, LoraSettings, TrainConfig
from common.model import load_base_model
from common.privacy import BudgetExhausted, PrivacyLedger
from common.scoring import RatingHead, expected_rating, predict_with_prefix, rating_loss
import common.training as training
from common.training import (PackedRow, dp_sample_rate, hashed_records, pack, packed_rating_logits, train_local,
                             train_local_dp)
from hypothesis import given, settings, strategies as st


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


def test_packed_bases_add_the_same_prior_as_scoring_and_residual_training_learns_the_correction(peft_tiny):
    model, head = peft_tiny
    prefix, suffixes = [5, 6, 7, 8, 9], [[10, 11, 12], [13, 14], [15, 16, 17, 18], [19, 20]]
    bases = np.array([2.0, 4.5, 3.0, 1.5])
    batch = pack([PackedRow(prefix, suffixes[:3], [1, 2, 3], list(bases[:3])),
                  PackedRow(prefix, suffixes[3:], [4], list(bases[3:]))])
    with torch.no_grad():
        packed = expected_rating(packed_rating_logits(model, head, batch)).numpy()
    np.testing.assert_allclose(packed, predict_with_prefix(model, head, prefix, suffixes, base=bases), atol=1e-5)
    with pytest.raises(ValueError, match="every row"):
        pack([PackedRow(prefix, suffixes[:1], [1], [2.0]), PackedRow(prefix, suffixes[1:2], [2])])
    # ratings one above the base everywhere: residual training moves predictions up from the bases
    ratings = np.clip(bases + 1, 1, 5)
    before = predict_with_prefix(model, head, prefix, suffixes, base=bases)
    train_local(model, head, prefix, suffixes, ratings, TrainConfig(steps=30, lr=1e-2, items_per_row=4,
                                                                    rows_per_step=1), bases=bases)
    after = predict_with_prefix(model, head, prefix, suffixes, base=bases)
    assert np.abs(after - ratings).mean() < np.abs(before - ratings).mean() - 0.2


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
    metrics = train_local_dp(model, head, prefix, train_s, ratings[:24], cfg,
                             DeviceDP(0.5, 1.0, 1e-5, 10.0, records=6, seed=0), ledger)
    after = adapter_arrays(model)
    assert any(not np.allclose(before[k], after[k]) for k in before)
    assert all(np.isfinite(v).all() for v in after.values())
    assert _heldout_loss(model, head, prefix, test_s, ratings[24:]) < before_loss - 0.1
    # 6 hashed records, 2 rows per step: every record is sampled at rate 1/3.
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


@settings(max_examples=60, deadline=None)
@given(items=st.lists(st.integers(1, 5000), unique=True, min_size=0, max_size=60), new=st.integers(5001, 9000),
       n_records=st.integers(1, 20))
def test_adding_a_rating_changes_only_its_own_record(items, new, n_records):
    """The privacy unit is a record; a rating must live in one record whatever else the device holds."""
    before = hashed_records(items, n_records, b"7")
    after = hashed_records(items + [new], n_records, b"7")
    assert sorted(i for r in before for i in r) == list(range(len(items)))  # a partition
    changed = [k for k in range(n_records) if before[k] != after[k]]
    assert len(changed) == 1 and after[changed[0]] == before[changed[0]] + [len(items)]
    assert hashed_records(items, n_records, b"7") == before  # fixed across rounds


def test_dp_sample_rate_does_not_depend_on_how_many_ratings_a_device_holds():
    cfg = TrainConfig(rows_per_step=2)
    assert dp_sample_rate(16, cfg) == 1 / 8 and dp_sample_rate(5, cfg) == 1 / 3


def _dp_run(peft_tiny, dp, monkeypatch):
    """A DP run from fixed weights after the run's public seed reset the global RNGs; returns the rows every step
    packed (which records Poisson sampling drew) and the trained weights."""
    from common.adapters import load_adapter_arrays

    model, head = peft_tiny
    start = adapter_arrays(model)
    rng = np.random.default_rng(1)
    suffixes = [list(rng.integers(20, 200, 3)) for _ in range(16)]
    cfg = TrainConfig(steps=8, lr=1e-2, items_per_row=2, rows_per_step=1, seed=0)
    real_pack = training.pack

    def run():
        seen = []
        monkeypatch.setattr(training, "pack", lambda rows, pad_id=0: seen.append(
            sorted(tuple(map(tuple, r.suffixes)) for r in rows)) or real_pack(rows, pad_id))
        load_adapter_arrays(model, start)
        torch.manual_seed(cfg.seed)  # what the run's public seed does to the global RNGs (train_local reseeds)
        np.random.seed(cfg.seed)
        train_local_dp(model, head, [5, 6, 7], suffixes, np.full(16, 4.0), cfg, dp,
                       PrivacyLedger(float("inf"), 1e-5), items=range(100, 116), record_key=b"u")
        monkeypatch.setattr(training, "pack", real_pack)
        return seen, adapter_arrays(model)
    return run


def test_dp_sampling_and_noise_cannot_be_replayed_from_the_public_seed(peft_tiny, monkeypatch):
    """Amplification by sampling needs the draws to be secret: knowing the run's seed must not reveal them."""
    run = _dp_run(peft_tiny, DeviceDP(0.5, 1.0, 1e-5, 10.0, records=4), monkeypatch)
    (rows_a, a), (rows_b, b) = run(), run()
    assert rows_a != rows_b  # 8 steps at rate 1/4 over 4 records: equal by chance with probability ~1e-7
    assert any(not np.allclose(a[k], b[k]) for k in a)


def test_reproducible_mode_replays_sampling_and_noise_exactly(peft_tiny, monkeypatch):
    run = _dp_run(peft_tiny, DeviceDP(0.5, 1.0, 1e-5, 10.0, records=4, seed=3), monkeypatch)
    (rows_a, a), (rows_b, b) = run(), run()
    assert rows_a == rows_b and all(np.array_equal(a[k], b[k]) for k in a)


def test_secure_mode_uses_opacus_secure_noise(peft_tiny, monkeypatch):
    from opacus.optimizers import optimizer as dp_optimizer

    modes, real = [], dp_optimizer._generate_noise
    monkeypatch.setattr(dp_optimizer, "_generate_noise", lambda *a, **k: modes.append(k.get("secure_mode")) or
                        real(*a, **k))
    _, after = _dp_run(peft_tiny, DeviceDP(0.5, 1.0, 1e-5, 10.0, records=4, secure_mode=True), monkeypatch)()
    assert modes and all(modes) and all(np.isfinite(v).all() for v in after.values())
    with pytest.raises(ValueError, match="secure"):
        from common.config import FederationConfig
        FederationConfig(dp_secure_mode=True, reproducible=True)
