"""ONNX Runtime serving agrees with the torch + peft reference path on the tiny model."""

import numpy as np
import pytest
import torch

from client.onnx_serving import EagerGraphs, OnnxScorer, export
from common.adapters import adapter_arrays, add_lora, load_adapter_arrays
from common.config import LoraSettings
from common.model import load_base_model
from common.scoring import RatingHead, predict_with_prefix


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    return export("tiny", LoraSettings(), tmp_path_factory.mktemp("onnx") / "tiny")


def _adapter(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return adapter_arrays(model)


def test_ort_matches_torch_for_two_adapters_swapped_in_memory(exported):
    base, tok = load_base_model("tiny")
    model = add_lora(base, LoraSettings()).eval()
    head = RatingHead(tok)
    scorer = OnnxScorer(exported)
    rng = np.random.default_rng(0)
    prefix = list(rng.integers(10, 300, 40))
    suffixes = [list(rng.integers(10, 300, int(n))) for n in rng.integers(3, 12, 37)]
    outputs = []
    for seed in (1, 2):
        arrays = _adapter(model, seed)
        load_adapter_arrays(model, arrays)
        reference = predict_with_prefix(model, head, prefix, suffixes)
        ort = scorer.predict(prefix, suffixes, arrays)
        assert np.abs(ort - reference).max() < 1e-3
        outputs.append(ort)
    assert np.abs(outputs[0] - outputs[1]).max() > 1e-3  # the adapter input really changes the result
    # One movie, and a one-token suffix (padded to the graph's minimum width), agree too.
    for few in ([suffixes[0]], [[42], suffixes[1]]):
        np.testing.assert_allclose(scorer.predict(prefix, few, arrays), predict_with_prefix(model, head, prefix, few),
                                   atol=1e-3)
    with pytest.raises(ValueError, match="do not match"):
        scorer.predict(prefix, suffixes, {"x": np.zeros(3, np.float32)})


def test_the_export_graphs_run_eagerly_agree_with_the_reference_path():
    """The suffix graph's shared-prefix attention (one matmul per kv head over every candidate) is exact."""
    base, tok = load_base_model("tiny")
    model = add_lora(base, LoraSettings()).eval()
    arrays = _adapter(model, 3)
    rng = np.random.default_rng(1)
    prefix = list(rng.integers(10, 300, 25))
    suffixes = [list(rng.integers(10, 300, int(n))) for n in rng.integers(1, 9, 11)]
    np.testing.assert_allclose(EagerGraphs(model, tok).predict(prefix, suffixes, arrays, batch_size=4),
                               predict_with_prefix(model, RatingHead(tok), prefix, suffixes), atol=1e-5)


def test_export_is_cached(exported):
    assert export("tiny", LoraSettings(), exported) == exported
    assert {"prefix.onnx", "suffix.onnx", "lora.json"} <= {p.name for p in exported.iterdir()}
