"""The encrypted device store against plain files: time to store and load a real-sized adapter.

    python -m bench.vault [--base-model smollm2-135m] [--repeats 20]

The adapter has the real shapes (SmolLM2-135M, rank 8 on q_proj/v_proj: 460,800 fp32 parameters, 1.8 MB) but
random values: it is nobody's data, so writing it unencrypted for the comparison is allowed. Rows: the store's
put (serialise, AES-256-GCM under a fresh data key wrapped by the user key, atomic write with fsync) and get (read,
verify, decrypt, deserialise); safetensors save/load of the same tensors to a plain file, once without fsync (what
a naive app does) and once with; and the in-memory AEAD alone.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save, save_file

from client.keys import RawKey
from client.store import EncryptedStore
from common.adapters import adapter_arrays, add_lora
from common.config import FederationConfig
from common.envelope import Binding, open_sealed, seal
from common.model import load_base_model


def _time(fn, repeats: int) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats * 1e3


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base-model", default=FederationConfig().base_model)
    p.add_argument("--repeats", type=int, default=20)
    args = p.parse_args(argv)

    cfg = FederationConfig(base_model=args.base_model)
    rng = np.random.default_rng(0)
    shapes = {k: v.shape for k, v in adapter_arrays(add_lora(load_base_model(cfg.base_model)[0], cfg.lora)).items()}
    tensors = {k: torch.from_numpy(rng.normal(0, 0.02, s).astype(np.float32)) for k, s in shapes.items()}
    size = sum(t.numel() for t in tensors.values())
    key = RawKey.generate()
    with tempfile.TemporaryDirectory() as tmp:
        store = EncryptedStore(Path(tmp) / "store", key, keep_versions=2)
        plain = Path(tmp) / "plain.safetensors"

        def save_synced():
            save_file(tensors, str(plain))
            with open(plain, "rb+") as f:
                os.fsync(f.fileno())

        payload = save(tensors)
        binding = Binding("u", "adapter", 1)
        sealed = seal(payload, binding, key.key(), key.descriptor)
        loaded = store.get_adapter("u", "adapter", store.put_adapter("u", "adapter", tensors))
        assert all(torch.equal(loaded[k], tensors[k]) for k in tensors)
        rows = [("encrypted store: put (encrypt + atomic write + fsync)",
                 _time(lambda: store.put_adapter("u", "adapter", tensors), args.repeats)),
                ("encrypted store: get (read + decrypt + deserialise)",
                 _time(lambda: store.get_adapter("u", "adapter"), args.repeats)),
                ("plain safetensors: save, no fsync", _time(lambda: save_file(tensors, str(plain)), args.repeats)),
                ("plain safetensors: save + fsync", _time(save_synced, args.repeats)),
                ("plain safetensors: load", _time(lambda: load_file(str(plain)), args.repeats)),
                ("AEAD only, in memory: seal", _time(lambda: seal(payload, binding, key.key(), key.descriptor),
                                                     args.repeats)),
                ("AEAD only, in memory: open", _time(lambda: open_sealed(sealed, binding, key.key()), args.repeats))]
    print(f"adapter: {len(tensors)} tensors, {size:,} parameters, {len(payload) / 1e6:.2f} MB; "
          f"{args.repeats} repeats each, {os.cpu_count()} CPU cores")
    print("| operation | ms |")
    print("|---|---:|")
    for name, ms in rows:
        print(f"| {name} | {ms:.2f} |")


if __name__ == "__main__":
    main()
