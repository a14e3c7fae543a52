import time

import pytest
import torch

from common.assets import AssetError
from common.model import SMOLLM2, load_base_model, pick_device, tiny_model, tiny_tokenizer
from tests.conftest import REAL_CACHE


def test_tiny_model_is_deterministic_and_small():
    tok = tiny_tokenizer()
    a, b = tiny_model(len(tok)), tiny_model(len(tok))
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert sum(p.numel() for p in a.parameters()) < 200_000
    assert tok.decode(tok("Movie: Heat (1995)")["input_ids"]) == "Movie: Heat (1995)"


def test_any_hf_model_directory_works_as_base(tmp_path):
    model, tok = load_base_model("tiny")
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    again, tok2 = load_base_model(str(tmp_path / "m"))
    ids = torch.tensor([tok("Heat (1995)")["input_ids"]])
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, again(ids).logits)
    assert tok2.chat_template == tok.chat_template


def test_bad_base_model_is_a_clear_error(tmp_path):
    with pytest.raises(AssetError, match="unknown base model"):
        load_base_model("not-a-model")
    (tmp_path / "empty").mkdir()
    with pytest.raises(AssetError, match="no config.json"):
        load_base_model(str(tmp_path / "empty"))


def test_device_defaults_to_cuda_only_when_present():
    assert pick_device().type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert pick_device("cpu").type == "cpu"


@pytest.mark.skipif(not (REAL_CACHE / "models" / SMOLLM2 / "model.safetensors").exists(),
                    reason="real SmolLM2 not cached (run the README's main command once)")
def test_real_smollm2_reloads_fast(monkeypatch):
    monkeypatch.setenv("PERSONAFL_CACHE", str(REAL_CACHE))
    start = time.perf_counter()
    model, tok = load_base_model(SMOLLM2)
    elapsed = time.perf_counter() - start
    assert next(model.parameters()).dtype == torch.float32
    assert model.config.num_hidden_layers == 30 and "quantization_config" not in model.config.to_dict()
    print(f"SmolLM2 reload: {elapsed:.2f}s")
