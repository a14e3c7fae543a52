"""On-device serving with ONNX Runtime: the fp32 base exported once, the personal adapter fed as an input.

The exported graph computes the rating logits of a *packed* prompt: the user's prefix followed by many movie
suffixes under the tree attention mask of `common.training.pack`, so the prefix is encoded once per request and
only five logits per movie are formed. Every LoRA matrix is a slice of one flat float32 input (`lora`), so an
adapter decrypted in memory is swapped in per request: no re-export, no plaintext file. The graph is cached under
the user cache directory, keyed by base model and LoRA shape; torch + peft (`client.device`) is the reference
path and the two agree (tested).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from torch.func import functional_call

from common.adapters import add_lora
from common.assets import cache_root
from common.config import LoraSettings
from common.files import atomic_directory
from common.model import load_base_model
from common.scoring import RatingHead, _causal_lm, decoder, expected_rating
from common.training import PackedRow, pack


def _state_key(parameter_name: str) -> str:
    """peft parameter name -> the adapter state-dict key our adapters use (adapter name dropped)."""
    return parameter_name.replace(".default", "")


class _ScoringGraph(torch.nn.Module):
    def __init__(self, peft_model, head: RatingHead):
        super().__init__()
        self.body = decoder(peft_model)
        prefix = next(n for n, m in peft_model.named_modules() if m is self.body) + "."
        lora = [(n, p) for n, p in peft_model.named_parameters() if "lora_" in n]
        self.names = [n[len(prefix):] for n, _ in lora]  # relative to the body, for functional_call
        self.keys = [_state_key(n) for n, _ in lora]
        self.shapes = [tuple(p.shape) for _, p in lora]
        self.register_buffer("rows", _causal_lm(peft_model).get_output_embeddings().weight[head.token_ids].detach())

    def forward(self, input_ids, position_ids, mask, rows, positions, lora):
        params, offset = {}, 0
        for name, shape in zip(self.names, self.shapes):
            size = int(np.prod(shape))
            params[name] = lora[offset:offset + size].reshape(shape)
            offset += size
        hidden = functional_call(self.body, params, args=(), kwargs=dict(
            input_ids=input_ids, attention_mask=mask, position_ids=position_ids)).last_hidden_state
        return hidden[rows, positions] @ self.rows.T


def export(base_model: str, lora: LoraSettings, target: Path | None = None) -> Path:
    """Export (once) the scoring graph for a base model and LoRA shape; returns its directory."""
    key = hashlib.sha256(json.dumps([base_model, asdict(lora)], sort_keys=True).encode()).hexdigest()[:16]
    target = Path(target or cache_root() / "onnx" / f"{Path(base_model).name}-{key}")
    if (target / "model.onnx").exists():
        return target
    model, tokenizer = load_base_model(base_model, device="cpu")
    peft_model = add_lora(model, lora).eval()
    graph = _ScoringGraph(peft_model, RatingHead(tokenizer)).eval()
    batch = pack([PackedRow(list(range(10, 40)), [list(range(50, 60)), list(range(70, 75))], [3.0, 4.0]),
                  PackedRow(list(range(10, 40)), [list(range(80, 86))], [2.0])])
    flat = torch.zeros(sum(int(np.prod(s)) for s in graph.shapes))
    length, count = torch.export.Dim("length", min=4, max=8192), torch.export.Dim("count", min=1, max=4096)
    rows = torch.export.Dim("rows", min=1, max=1024)
    with atomic_directory(target) as tmp, torch.no_grad():
        torch.onnx.export(graph, (batch.input_ids, batch.position_ids, batch.attention_mask, batch.rows,
                                  batch.positions, flat),
                          str(tmp / "model.onnx"), input_names=["input_ids", "position_ids", "mask", "rows",
                                                                "positions", "lora"],
                          output_names=["logits"], dynamo=True, external_data=True,
                          dynamic_shapes=({0: rows, 1: length}, {0: rows, 1: length},
                                          {0: rows, 2: length, 3: length}, {0: count}, {0: count}, None))
        (tmp / "lora.json").write_text(json.dumps({"keys": graph.keys, "shapes": graph.shapes}))
    return target


class OnnxScorer:
    def __init__(self, directory: Path, threads: int | None = None):
        import onnxruntime as ort

        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(Path(directory) / "model.onnx"), options,
                                            providers=["CPUExecutionProvider"])
        layout = json.loads((Path(directory) / "lora.json").read_text())
        self.keys, self.shapes = layout["keys"], [tuple(s) for s in layout["shapes"]]

    def flatten(self, arrays: dict[str, np.ndarray]) -> np.ndarray:
        """The adapter as the graph's flat input; a missing, extra or mis-shaped tensor is an error."""
        if set(arrays) != set(self.keys):
            raise ValueError(f"adapter keys do not match the exported graph ({len(set(arrays) ^ set(self.keys))} "
                             "differ)")
        for k, shape in zip(self.keys, self.shapes):
            if tuple(arrays[k].shape) != shape:
                raise ValueError(f"adapter tensor {k} has shape {arrays[k].shape}, expected {shape}")
        return np.concatenate([np.asarray(arrays[k], np.float32).ravel() for k in self.keys])

    def predict(self, prefix: list[int], suffixes: list[list[int]], arrays: dict[str, np.ndarray],
                flat: np.ndarray | None = None, items_per_row: int = 16) -> np.ndarray:
        """Expected ratings of every suffix after one shared prefix, in one forward pass over packed rows of
        `items_per_row` movies each (attention is dense per row: short rows keep its quadratic cost small)."""
        rows = [PackedRow(list(prefix), [list(s) for s in suffixes[i:i + items_per_row]],
                          [0.0] * len(suffixes[i:i + items_per_row])) for i in range(0, len(suffixes), items_per_row)]
        batch = pack(rows)
        logits = self.session.run(None, {
            "input_ids": batch.input_ids.numpy(), "position_ids": batch.position_ids.numpy(),
            "mask": batch.attention_mask.numpy(), "rows": batch.rows.numpy(), "positions": batch.positions.numpy(),
            "lora": self.flatten(arrays) if flat is None else flat})[0]
        return expected_rating(torch.from_numpy(logits)).numpy().astype(np.float64)
