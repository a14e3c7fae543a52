"""Persona adapter versions on the coordinator's disk, in PEFT format, each with a JSON manifest.

Only persona-level artefacts are ever written here: an adapter is the mean of several devices' updates.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from common.adapters import lora_config
from common.config import LoraSettings
from common.files import atomic_directory


class PersonaStore:
    def __init__(self, root: Path, lora: LoraSettings, base_model: str):
        self.root = Path(root)
        self.lora = lora
        self.base_model = base_model

    def path(self, persona: int, round_: int) -> Path:
        return self.root / f"p{persona}" / f"r{round_:04d}"

    def release(self, round_: int, persona: int, arrays: dict[str, np.ndarray], devices: int, metrics: dict,
                privacy: dict | None = None) -> Path:
        """Write one persona version atomically: a complete PEFT directory or nothing."""
        target = self.path(persona, round_)
        with atomic_directory(target) as tmp:
            config = lora_config(self.lora)
            config.base_model_name_or_path = self.base_model
            config.save_pretrained(tmp)
            save_file({k: np.ascontiguousarray(v, np.float32) for k, v in arrays.items()},
                      str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
            manifest = {"persona": persona, "round": round_, "contributing_devices": devices,
                        "base_model": self.base_model, "created": time.time(),
                        "train_metrics": {k: float(v) for k, v in metrics.items()},
                        "privacy": privacy or {"dp": False}}
            (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
        return target

    def versions(self, persona: int) -> list[Path]:
        return sorted((self.root / f"p{persona}").glob("r[0-9]*"))
