"""On-device serving with ONNX Runtime: the fp32 base exported once, the personal adapter fed as an input.

Two graphs, as the torch path (`common.scoring.predict_with_prefix`) does it: `prefix.onnx` encodes the user's
profile prefix once and returns every layer's keys and values; `suffix.onnx` scores a batch of movie suffixes
attending to them, forming only five logits per movie. So a 100-movie ranking encodes the prefix once, not once
per packed row. Every LoRA matrix is a slice of one flat float32 input (`lora`) of both graphs, so an adapter
decrypted in memory is swapped in per request: no re-export, no plaintext file. The graphs are cached under the
user cache directory, keyed by base model and LoRA shape; torch + peft (`client.device`) is the reference path
and the two agree (tested).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from torch.func import functional_call
from transformers import DynamicCache

from common.adapters import add_lora
from common.assets import cache_root
from common.config import LoraSettings
from common.files import atomic_directory
from common.model import load_base_model
from common.scoring import RatingHead, _causal_lm, decoder, expected_rating

FORMAT = "kv-2"  # part of the cache key: a changed graph layout is exported afresh


def _state_key(parameter_name: str) -> str:
    """peft parameter name -> the adapter state-dict key our adapters use (adapter name dropped)."""
    return parameter_name.replace(".default", "")


class _WithLoraInput(torch.nn.Module):
    """The decoder body with its LoRA matrices read from one flat input instead of its parameters."""

    def __init__(self, peft_model):
        super().__init__()
        self.body = decoder(peft_model)
        prefix = next(n for n, m in peft_model.named_modules() if m is self.body) + "."
        lora = [(n, p) for n, p in peft_model.named_parameters() if "lora_" in n]
        self.names = [n[len(prefix):] for n, _ in lora]  # relative to the body, for functional_call
        self.keys = [_state_key(n) for n, _ in lora]
        self.shapes = [tuple(p.shape) for _, p in lora]

    def run(self, lora: torch.Tensor, **kwargs):
        params, offset = {}, 0
        for name, shape in zip(self.names, self.shapes):
            size = int(np.prod(shape))
            params[name] = lora[offset:offset + size].reshape(shape)
            offset += size
        return functional_call(self.body, params, args=(), kwargs=kwargs)


class _PrefixGraph(_WithLoraInput):
    def forward(self, input_ids, lora):
        """[1, P] prefix -> past [layers, 2 (keys, values), 1, kv heads, P, head dim]."""
        cache = self.run(lora, input_ids=input_ids, use_cache=True).past_key_values
        return torch.stack([torch.stack([layer.keys, layer.values]) for layer in cache.layers])


class _SuffixGraph(_WithLoraInput):
    def __init__(self, peft_model, head: RatingHead):
        super().__init__(peft_model)
        self.register_buffer("rows", _causal_lm(peft_model).get_output_embeddings().weight[head.token_ids].detach())

    def forward(self, input_ids, past, last, lora):
        """[N, S] right-padded suffixes after the prefix in `past`; `last` [N] each one's final real token ->
        [N, 5] rating logits. Padding comes after every real token, so the causal mask keeps it out."""
        n, s, p = input_ids.shape[0], input_ids.shape[1], past.shape[4]
        cache = DynamicCache(ddp_cache_data=[(past[i, 0].expand(n, -1, -1, -1), past[i, 1].expand(n, -1, -1, -1))
                                             for i in range(past.shape[0])])
        positions = (torch.arange(s) + p).unsqueeze(0).expand(n, s)
        mask = torch.cat([torch.ones(s, p, dtype=torch.bool), torch.ones(s, s, dtype=torch.bool).tril()], 1)
        hidden = self.run(lora, input_ids=input_ids, attention_mask=mask[None, None].expand(n, 1, s, p + s),
                          position_ids=positions, past_key_values=cache, use_cache=True).last_hidden_state
        return hidden[torch.arange(n), last] @ self.rows.T


def export(base_model: str, lora: LoraSettings, target: Path | None = None) -> Path:
    """Export (once) the prefix and suffix graphs for a base model and LoRA shape; returns their directory."""
    key = hashlib.sha256(json.dumps([base_model, asdict(lora), FORMAT], sort_keys=True).encode()).hexdigest()[:16]
    target = Path(target or cache_root() / "onnx" / f"{Path(base_model).name}-{key}")
    if (target / "suffix.onnx").exists():
        return target
    model, tokenizer = load_base_model(base_model, device="cpu")
    peft_model = add_lora(model, lora).eval()
    prefix_graph, suffix_graph = _PrefixGraph(peft_model).eval(), _SuffixGraph(peft_model, RatingHead(tokenizer)).eval()
    flat = torch.zeros(sum(int(np.prod(s)) for s in prefix_graph.shapes))
    prefix_ids = torch.arange(10, 40).unsqueeze(0)
    suffix_ids = torch.arange(50, 74).reshape(3, 8)
    length = torch.export.Dim("length", min=2, max=8192)
    count, width = torch.export.Dim("count", min=1, max=4096), torch.export.Dim("width", min=2, max=1024)
    with atomic_directory(target) as tmp, torch.no_grad():
        past = prefix_graph(prefix_ids, flat)
        torch.onnx.export(prefix_graph, (prefix_ids, flat), str(tmp / "prefix.onnx"), input_names=["input_ids", "lora"],
                          output_names=["past"], dynamo=True, external_data=True,
                          dynamic_shapes=({1: length}, None))
        torch.onnx.export(suffix_graph, (suffix_ids, past, torch.tensor([7, 5, 2]), flat), str(tmp / "suffix.onnx"),
                          input_names=["input_ids", "past", "last", "lora"], output_names=["logits"], dynamo=True,
                          external_data=True, dynamic_shapes=({0: count, 1: width}, {4: length}, {0: count}, None))
        (tmp / "lora.json").write_text(json.dumps({"keys": prefix_graph.keys, "shapes": prefix_graph.shapes}))
    return target


class OnnxScorer:
    def __init__(self, directory: Path, threads: int | None = None):
        import onnxruntime as ort

        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        self.prefix, self.suffix = (ort.InferenceSession(str(Path(directory) / name), options,
                                                         providers=["CPUExecutionProvider"])
                                    for name in ("prefix.onnx", "suffix.onnx"))
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
                flat: np.ndarray | None = None, batch_size: int = 32) -> np.ndarray:
        """Expected ratings of every suffix after one shared prefix: the prefix is encoded once, then suffixes
        sorted by length are scored in batches padded only to their batch's longest."""
        flat = self.flatten(arrays) if flat is None else flat
        return self.score(self.encode_prefix(prefix, flat), suffixes, flat, batch_size)

    def encode_prefix(self, prefix: list[int], flat: np.ndarray) -> np.ndarray:
        """Every layer's keys and values for `prefix` under the adapter `flat` (a caller may keep them while
        neither changes)."""
        return self.prefix.run(None, {"input_ids": np.asarray([prefix], np.int64), "lora": flat})[0]

    def score(self, past: np.ndarray, suffixes: list[list[int]], flat: np.ndarray,
              batch_size: int = 32) -> np.ndarray:
        """Expected ratings of `suffixes` after the prefix encoded in `past` (by the same adapter `flat`)."""
        out = np.empty(len(suffixes), np.float64)
        order = sorted(range(len(suffixes)), key=lambda i: len(suffixes[i]))
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            # The graph's suffix width is at least 2 (a dimension of 1 would be specialised away at export).
            ids = np.zeros((len(idx), max(2, max(len(suffixes[i]) for i in idx))), np.int64)
            for row, i in enumerate(idx):
                ids[row, :len(suffixes[i])] = suffixes[i]
            last = np.asarray([len(suffixes[i]) - 1 for i in idx], np.int64)
            logits = self.suffix.run(None, {"input_ids": ids, "past": past, "last": last, "lora": flat})[0]
            out[idx] = expected_rating(torch.from_numpy(logits)).numpy()
        return out
