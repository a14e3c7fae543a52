"""LoRA adapters on the shared base: create, read/write their weights as arrays, save in PEFT format."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

from common.config import LoraSettings


def lora_config(s: LoraSettings) -> LoraConfig:
    return LoraConfig(r=s.rank, lora_alpha=s.alpha, lora_dropout=s.dropout, target_modules=list(s.targets),
                      bias="none", task_type="CAUSAL_LM")


def add_lora(model: torch.nn.Module, s: LoraSettings, seed: int = 0) -> PeftModel:
    """Wrap the base with a fresh LoRA adapter; B starts at zero, so it begins as the base model."""
    torch.manual_seed(seed)
    return get_peft_model(model, lora_config(s))


def adapter_arrays(model: PeftModel) -> dict[str, np.ndarray]:
    """The adapter's weights, in PEFT's key naming, as float32 numpy arrays (sorted keys)."""
    state = get_peft_model_state_dict(model)
    return {k: state[k].detach().cpu().float().numpy().copy() for k in sorted(state)}


def load_adapter_arrays(model: PeftModel, arrays: dict[str, np.ndarray]) -> None:
    """Overwrite the adapter's weights; any missing, extra or mis-shaped key is an error, not a partial load."""
    current = get_peft_model_state_dict(model)
    if set(arrays) != set(current):
        missing, extra = sorted(set(current) - set(arrays)), sorted(set(arrays) - set(current))
        raise ValueError(f"adapter keys do not match the model: missing {missing[:3]}, unexpected {extra[:3]}")
    for k, v in arrays.items():
        if tuple(v.shape) != tuple(current[k].shape):
            raise ValueError(f"adapter tensor {k} has shape {tuple(v.shape)}, expected {tuple(current[k].shape)}")
        if not np.isfinite(v).all():
            raise ValueError(f"adapter tensor {k} has NaN or Inf values")
    device = next(model.parameters()).device
    set_peft_model_state_dict(model, {k: torch.from_numpy(np.asarray(v, np.float32)).to(device) for k, v in arrays.items()})


def adapter_digest(arrays: dict[str, np.ndarray]) -> str:
    """A content digest of adapter weights (names and float32 values). A device records the digest of the persona
    version its personal adapter was derived from, and the coordinator names versions by it when it sends their
    serving blend weights (`client.client_app`'s "blend" query): the device is not told version numbers."""
    h = hashlib.sha256()
    for name in sorted(arrays):
        h.update(name.encode())
        h.update(np.ascontiguousarray(arrays[name], dtype=np.float32).tobytes())
    return h.hexdigest()


def save_adapter(model: PeftModel, arrays: dict[str, np.ndarray], directory: Path) -> Path:
    """Write `arrays` as a PEFT adapter directory (adapter_config.json + adapter_model.safetensors)."""
    load_adapter_arrays(model, arrays)
    model.save_pretrained(directory)
    return directory


def load_saved_adapter(model: PeftModel, directory: Path) -> dict[str, np.ndarray]:
    """Read a PEFT adapter directory's weights into arrays (through peft, so its format is what we trust)."""
    from peft.utils import load_peft_weights

    state = load_peft_weights(str(directory), device="cpu")
    return {k: v.float().numpy() for k, v in sorted(state.items())}
