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
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from torch.func import functional_call
from transformers import AttentionInterface

from common.adapters import add_lora
from common.assets import cache_root
from common.config import LoraSettings
from common.files import atomic_directory
from common.model import load_base_model
from common.scoring import RatingHead, _causal_lm, base_prior_logits, decoder, expected_rating

FORMAT = "kv-3"  # part of the cache key: a changed graph layout is exported afresh
ATTENTION = "personafl_shared_prefix"


def shared_prefix_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, prefix=None, **kwargs):
    """Attention of n right-padded suffixes over one shared prefix, for the suffix graph.

    query [n, heads, s, d] and key/value [n, kv heads, s, d] are the suffixes'; `prefix` [layers, 2, 1, kv heads,
    p, d] the prefix's keys and values. The standard path copies the prefix once per suffix (and per query head
    of a group) to concatenate it with each suffix's keys; here every suffix query row of a kv head meets the one
    prefix in a single large matmul, and only the suffix-to-suffix part (causal; padding comes last) is per row.
    """
    n, heads, s, d = query.shape
    kv_heads = key.shape[1]
    g = heads // kv_heads  # query heads per kv head (grouped-query attention): head h reads kv head h // g
    prefix_keys, prefix_values = prefix[module.layer_idx, 0, 0], prefix[module.layer_idx, 1, 0]  # [kv heads, p, d]
    p = prefix_keys.shape[1]
    q = query.reshape(n, kv_heads, g * s, d).transpose(0, 1)  # [kv heads, n, g*s, d]
    to_prefix = (q.reshape(kv_heads, n * g * s, d) @ prefix_keys.transpose(1, 2)).reshape(kv_heads, n, g * s, p)
    to_suffix = q @ key.transpose(0, 1).transpose(2, 3)  # [kv heads, n, g*s, s]
    causal = torch.ones(s, s, dtype=torch.bool, device=query.device).tril().repeat(g, 1)
    to_suffix = to_suffix.masked_fill(~causal, torch.finfo(to_suffix.dtype).min)
    probs = torch.softmax(torch.cat([to_prefix, to_suffix], -1) * scaling, -1)
    out = (probs[..., :p].reshape(kv_heads, n * g * s, p) @ prefix_values).reshape(kv_heads, n, g * s, d) \
        + probs[..., p:] @ value.transpose(0, 1)
    return out.reshape(kv_heads, n, g, s, d).permute(1, 3, 0, 2, 4).reshape(n, s, heads, d), None


AttentionInterface.register(ATTENTION, shared_prefix_attention)


@contextmanager
def _attention(config, name: str):
    standard, config._attn_implementation = config._attn_implementation, name
    try:
        yield
    finally:
        config._attn_implementation = standard


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
        cache = self.run(lora, input_ids=input_ids, use_cache=True).cache
        return torch.stack([torch.stack([layer.keys, layer.values]) for layer in cache.layers])


class _SuffixGraph(_WithLoraInput):
    def __init__(self, peft_model, head: RatingHead):
        super().__init__(peft_model)
        self.config = _causal_lm(peft_model).config
        self.register_buffer("rows", _causal_lm(peft_model).get_output_embeddings().weight[head.token_ids].detach())

    def forward(self, input_ids, past, last, lora):
        """[N, S] right-padded suffixes after the prefix in `past`; `last` [N] each one's final real token ->
        [N, 5] rating logits, with `shared_prefix_attention` as the model's attention."""
        n, s, p = input_ids.shape[0], input_ids.shape[1], past.shape[4]
        positions = (torch.arange(s) + p).unsqueeze(0).expand(n, s)
        with _attention(self.config, ATTENTION):
            hidden = self.run(lora, input_ids=input_ids, position_ids=positions, prefix=past,
                              use_cache=False).last_hidden_state
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


class _GraphScorer:
    """Ratings from a prefix graph and a suffix graph (however they run), the adapter as one flat input."""

    keys: list[str]
    shapes: list[tuple[int, ...]]

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
        raise NotImplementedError

    def _logits(self, ids: np.ndarray, past: np.ndarray, last: np.ndarray, flat: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def score(self, past: np.ndarray, suffixes: list[list[int]], flat: np.ndarray,
              batch_size: int = 32, base: np.ndarray | None = None) -> np.ndarray:
        """Expected ratings of `suffixes` after the prefix encoded in `past` (by the same adapter `flat`); with
        `base`, of a residual adapter's correction to them (`common.scoring.base_prior_logits`)."""
        out = np.empty(len(suffixes), np.float64)
        order = sorted(range(len(suffixes)), key=lambda i: len(suffixes[i]))
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            # The graph's suffix width is at least 2 (a dimension of 1 would be specialised away at export).
            ids = np.zeros((len(idx), max(2, max(len(suffixes[i]) for i in idx))), np.int64)
            for row, i in enumerate(idx):
                ids[row, :len(suffixes[i])] = suffixes[i]
            last = np.asarray([len(suffixes[i]) - 1 for i in idx], np.int64)
            logits = torch.from_numpy(self._logits(ids, past, last, flat))
            if base is not None:
                logits = logits + base_prior_logits(torch.as_tensor(np.asarray(base)[idx]))
            out[idx] = expected_rating(logits).numpy()
        return out


class OnnxScorer(_GraphScorer):
    """The exported graphs in ONNX Runtime: the device's serving engine."""

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

    def encode_prefix(self, prefix: list[int], flat: np.ndarray) -> np.ndarray:
        return self.prefix.run(None, {"input_ids": np.asarray([prefix], np.int64), "lora": flat})[0]

    def _logits(self, ids, past, last, flat):
        return self.suffix.run(None, {"input_ids": ids, "past": past, "last": last, "lora": flat})[0]


class EagerGraphs(_GraphScorer):
    """The same two graphs run by torch eagerly, before export: what ONNX Runtime adds over torch on the very same
    computation (the benchmark's third column)."""

    def __init__(self, peft_model, tokenizer):
        self.prefix_graph = _PrefixGraph(peft_model).eval()
        self.suffix_graph = _SuffixGraph(peft_model, RatingHead(tokenizer)).eval()
        self.keys, self.shapes = self.prefix_graph.keys, self.prefix_graph.shapes

    @torch.no_grad()
    def encode_prefix(self, prefix, flat):
        return self.prefix_graph(torch.tensor([prefix]), torch.from_numpy(flat)).numpy()

    @torch.no_grad()
    def _logits(self, ids, past, last, flat):
        return self.suffix_graph(*(torch.from_numpy(a) for a in (ids, past, last, flat))).numpy()
