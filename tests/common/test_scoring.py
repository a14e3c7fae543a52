import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from peft import LoraConfig, get_peft_model

from common.model import load_base_model
from common.scoring import (RatingHead, base_prior_logits, encode_prefix, expected_rating, predict_with_prefix,
                            rating_loss, rating_token_ids)


@pytest.fixture(scope="module")
def tiny():
    return load_base_model("tiny")


def _full_vocab_expected(model, head, ids):
    """Reference: the full-vocabulary logits of the last position, restricted to the five digits."""
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, -1]
    return float(torch.softmax(logits[head.token_ids], -1) @ torch.arange(1.0, 6.0))


def test_five_token_scoring_matches_full_vocabulary(tiny):
    model, tok = tiny
    head = RatingHead(tok)
    prefix = tok("<|im_start|>system\nA user profile.<|im_end|>\n", add_special_tokens=False)["input_ids"]
    suffixes = [tok(f"<|im_start|>user\nMovie: {t}<|im_end|>\n<|im_start|>assistant\n",
                    add_special_tokens=False)["input_ids"] for t in ["Heat", "Alien (1979) [Horror, Sci-Fi]", "Big", "X"]]
    got = predict_with_prefix(model, head, prefix, suffixes, batch_size=3)  # two batches, padded
    want = [_full_vocab_expected(model, head, prefix + s) for s in suffixes]
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert len(set(np.round(got, 6))) == len(got)  # different movies, different predictions


def test_a_kept_prefix_cache_gives_the_same_ratings_and_survives_reuse(tiny):
    model, tok = tiny
    head = RatingHead(tok)
    prefix = tok("<|im_start|>system\nA user profile.<|im_end|>\n", add_special_tokens=False)["input_ids"]
    suffixes = [tok(f"Movie: {t}", add_special_tokens=False)["input_ids"] for t in ["Heat", "Alien (1979)", "Big"]]
    cache = encode_prefix(model, prefix)
    fresh = predict_with_prefix(model, head, prefix, suffixes, batch_size=2)
    for _ in range(2):  # the kept cache is not consumed by a call
        np.testing.assert_allclose(predict_with_prefix(model, head, prefix, suffixes, batch_size=2, cache=cache),
                                   fresh, atol=1e-6)


def test_scoring_sees_the_adapter(tiny):
    model, tok = tiny
    head = RatingHead(tok)
    peft_model = get_peft_model(load_base_model("tiny")[0], LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    prefix, suffix = [5, 6, 7, 8], [[9, 10, 11]]
    before = predict_with_prefix(peft_model, head, prefix, suffix)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    after = predict_with_prefix(peft_model, head, prefix, suffix)
    assert abs(after[0] - before[0]) > 1e-4
    np.testing.assert_allclose(after, [_full_vocab_expected(peft_model, head, prefix + suffix[0])], atol=1e-5)


def test_rating_tokens_are_single_tokens(tiny):
    _, tok = tiny
    ids = rating_token_ids(tok)
    assert len(set(ids)) == 5 and [tok.decode([i]) for i in ids] == ["1", "2", "3", "4", "5"]


def test_expected_rating_and_loss():
    logits = torch.tensor([[10.0, 0, 0, 0, 0], [0, 0, 0, 0, 10.0], [0.0, 0, 0, 0, 0]])
    np.testing.assert_allclose(expected_rating(logits).numpy(), [1.0, 5.0, 3.0], atol=1e-3)
    ratings = torch.tensor([1.0, 5.0, 3.0])
    good = rating_loss(logits, ratings)
    bad = rating_loss(logits, torch.tensor([5.0, 1.0, 3.0]))
    assert good < bad
    assert rating_loss(logits, ratings, mse_weight=1.0) > good  # the uniform row adds squared error 0, CE > 0
    assert rating_loss(logits, torch.tensor([5.0, 1.0, 3.0]), mse_weight=1.0) > bad


def test_scoring_uses_the_cache_argument_not_the_deprecated_past_key_values(tiny):
    """transformers renamed `past_key_values` to `cache` and drops the old name in 5.40; the old name only logs a
    deprecation once per process, so the once-cache is cleared to see it however many tests ran before."""
    import logging

    from transformers.utils import logging as hf_logging

    model, tok = tiny
    seen: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    root = hf_logging.get_logger("transformers")
    hf_logging.warning_once.cache_clear()
    root.addHandler(handler)
    try:
        cache = encode_prefix(model, [5, 6, 7, 8])
        predict_with_prefix(model, RatingHead(tok), [5, 6, 7, 8], [[9, 10], [11]], cache=cache)
    finally:
        root.removeHandler(handler)
    assert not [m for m in seen if "past_key_values" in m], seen


@settings(deadline=None)
@given(st.lists(st.floats(min_value=-1e6, max_value=1e6, allow_nan=False), min_size=1, max_size=20),
       st.floats(min_value=0.3, max_value=3.0))
def test_the_base_prior_is_a_distribution_whose_expected_rating_is_the_base(bases, sd):
    base = torch.tensor(bases, dtype=torch.float64)
    logp = base_prior_logits(base, sd=sd)
    assert logp.shape == (len(bases), 5) and torch.isfinite(logp).all()
    np.testing.assert_allclose(logp.exp().sum(-1).numpy(), 1.0, atol=1e-5)
    # within (1, 5) the prior's mean is the base; outside it, the nearest rating it can reach
    np.testing.assert_allclose(expected_rating(logp).numpy(), base.clamp(1.01, 4.99).numpy(), atol=1e-3)


def test_a_flat_adapter_predicts_the_base_and_a_trained_one_corrects_it(tiny):
    model, tok = tiny
    head = RatingHead(tok)
    prefix, suffixes = [5, 6, 7, 8], [[9, 10, 11], [12, 13], [14]]
    base = [1.7, 3.2, 4.6]
    plain = predict_with_prefix(model, head, prefix, suffixes)
    with_base = predict_with_prefix(model, head, prefix, suffixes, base=base)
    # the same logits plus the prior: the LM's own preference moves the rating, by a bounded amount
    assert not np.allclose(with_base, plain) and not np.allclose(with_base, base)
    flat = _FlatHead(tok)
    np.testing.assert_allclose(predict_with_prefix(model, flat, prefix, suffixes, base=base), base, atol=1e-3)
    np.testing.assert_allclose(predict_with_prefix(model, flat, prefix, suffixes), 3.0, atol=1e-6)


class _FlatHead(RatingHead):
    """Five equal logits whatever the hidden state: an adapter that has learned no correction."""

    def logits(self, model, hidden):
        return torch.zeros(len(hidden), 5)
