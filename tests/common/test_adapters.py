import numpy as np
import pytest

from common.adapters import adapter_arrays, add_lora, load_adapter_arrays, load_saved_adapter, save_adapter
from common.config import LoraSettings
from common.model import load_base_model


@pytest.fixture
def peft_model():
    return add_lora(load_base_model("tiny")[0], LoraSettings(rank=4, targets=("q_proj", "v_proj")))


def test_fresh_adapter_is_a_no_op_and_covers_the_targets(peft_model):
    arrays = adapter_arrays(peft_model)
    assert len(arrays) == 2 * 2 * 2  # 2 layers x (q, v) x (A, B)
    assert all(np.all(v == 0) for k, v in arrays.items() if "lora_B" in k)


def test_peft_directory_round_trip(peft_model, tmp_path):
    arrays = {k: np.random.default_rng(0).normal(size=v.shape).astype(np.float32)
              for k, v in adapter_arrays(peft_model).items()}
    save_adapter(peft_model, arrays, tmp_path / "a")
    assert (tmp_path / "a" / "adapter_config.json").exists()
    back = load_saved_adapter(peft_model, tmp_path / "a")
    assert sorted(back) == sorted(arrays)
    for k in arrays:
        np.testing.assert_array_equal(back[k], arrays[k])


def test_bad_adapter_arrays_are_refused_without_partial_load(peft_model):
    good = adapter_arrays(peft_model)
    key = sorted(good)[0]
    for bad, message in [({**good, key: good[key][:1]}, "shape"), ({k: v for k, v in good.items() if k != key}, "keys"),
                         ({**good, key: np.full_like(good[key], np.inf)}, "NaN or Inf")]:
        with pytest.raises(ValueError, match=message):
            load_adapter_arrays(peft_model, bad)
    after = adapter_arrays(peft_model)
    assert all(np.array_equal(after[k], good[k]) for k in good)
