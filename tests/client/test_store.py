import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from client.keys import KeySourceError, PassphraseKey, RawKey
from client.store import CRASH_ENV, EncryptedStore, StoreError
from common.adapters import add_lora
from common.config import LoraSettings
from common.envelope import (BindingError, EnvelopeError, TamperedError, TruncatedError, UnknownFormatError,
                             WrongKeyError)
from common.model import load_base_model

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def adapter() -> dict[str, torch.Tensor]:
    """A real peft LoRA state dict (non-zero B) from the tiny model."""
    from peft import get_peft_model_state_dict

    model = add_lora(load_base_model("tiny")[0], LoraSettings(rank=4))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_()
    return {k: v.clone() for k, v in get_peft_model_state_dict(model).items()}


def _same(a, b) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_round_trip_of_a_real_adapter(tmp_path, adapter):
    store = EncryptedStore(tmp_path, RawKey.generate())
    assert store.put_adapter("u1", "personal", adapter) == 1
    assert _same(store.get_adapter("u1", "personal"), adapter)
    raw = (tmp_path / "users/u1/personal/v000001.pfl").read_bytes()
    assert b"lora_A" not in raw and adapter[sorted(adapter)[0]].numpy().tobytes()[:32] not in raw


def _flip_everywhere(path: Path):
    """One flipped byte in each region: prefix, header fields (binding, kek, wrapped key, nonces), body, tag."""
    data = path.read_bytes()
    header_end = 9 + int.from_bytes(data[5:9], "big")
    header = data[9:header_end].decode()
    offsets = [0, 4, 6]
    for field in ('"binding"', '"check"', '"nonce"', '"wrap_nonce"', '"wrapped_key"', '"salt"', '"kind"'):
        at = header.find(field)
        if at >= 0:
            offsets.append(9 + at + len(field) + 4)
    offsets += [header_end, header_end + (len(data) - header_end) // 2, len(data) - 1]
    for off in offsets:
        flipped = bytearray(data)
        flipped[off] ^= 0x01
        yield off, bytes(flipped)


def test_a_flipped_byte_anywhere_is_detected(tmp_path, adapter):
    store = EncryptedStore(tmp_path, RawKey.generate())
    store.put_adapter("u1", "personal", adapter)
    path = tmp_path / "users/u1/personal/v000001.pfl"
    original = path.read_bytes()
    for off, data in _flip_everywhere(path):
        path.write_bytes(data)
        with pytest.raises(EnvelopeError):
            store.get_adapter("u1", "personal")
    path.write_bytes(original)
    assert _same(store.get_adapter("u1", "personal"), adapter)  # nothing else was damaged


def test_distinct_errors(tmp_path, adapter):
    key = RawKey.generate()
    store = EncryptedStore(tmp_path, key)
    store.put_adapter("alice", "personal", adapter)
    store.put_adapter("bob", "personal", adapter)
    alice = tmp_path / "users/alice/personal/v000001.pfl"
    original = alice.read_bytes()

    with pytest.raises(WrongKeyError):
        EncryptedStore(tmp_path, RawKey.generate()).get_adapter("alice", "personal")
    # Copied to another user: bob's key opens it? No: the binding names alice.
    bob = tmp_path / "users/bob/personal/v000001.pfl"
    bob_original = bob.read_bytes()
    bob.write_bytes(original)
    with pytest.raises(BindingError):
        store.get_adapter("bob", "personal")
    bob.write_bytes(bob_original)
    # Rolled back: version 1 renamed to version 2.
    store.put_adapter("alice", "personal", adapter)
    (tmp_path / "users/alice/personal/v000002.pfl").write_bytes(original)
    with pytest.raises(BindingError):
        store.get_adapter("alice", "personal")
    alice.write_bytes(original[:40])
    with pytest.raises(TruncatedError):
        store.get_adapter("alice", "personal", version=1)
    alice.write_bytes(b"PFLV\x07" + original[5:])
    with pytest.raises(UnknownFormatError, match="format version 7"):
        store.get_adapter("alice", "personal", version=1)
    alice.write_bytes(original[:-1] + bytes([original[-1] ^ 1]))
    with pytest.raises(TamperedError):
        store.get_adapter("alice", "personal", version=1)
    with pytest.raises(StoreError, match="nothing stored"):
        store.get_adapter("carol", "personal")
    with pytest.raises(StoreError, match="invalid user id"):
        store.put_adapter("../etc", "personal", adapter)


def test_passphrase_kek_and_rotation(tmp_path, adapter):
    store = EncryptedStore(tmp_path, PassphraseKey.for_store(tmp_path, "correct horse"))
    store.put_adapter("u1", "personal", adapter)
    store.put_bytes("u1", "ledger", b'{"epsilon": 1.5}')
    payload_before = (tmp_path / "users/u1/personal/v000001.pfl").read_bytes()

    with pytest.raises(WrongKeyError):
        EncryptedStore(tmp_path, PassphraseKey.for_store(tmp_path, "wrong horse")).get_bytes("u1", "ledger")
    wrong = EncryptedStore(tmp_path, PassphraseKey.for_store(tmp_path, "wrong horse"))
    with pytest.raises(WrongKeyError):
        wrong.rotate(RawKey.generate())  # a wrong old key changes nothing
    new_key = RawKey.generate()
    assert store.rotate(new_key) == 1
    assert (tmp_path / "users/u1/personal/v000001.pfl").read_bytes() == payload_before  # payload not re-encrypted
    reopened = EncryptedStore(tmp_path, new_key)
    assert _same(reopened.get_adapter("u1", "personal"), adapter)
    assert reopened.get_bytes("u1", "ledger") == b'{"epsilon": 1.5}'
    with pytest.raises(WrongKeyError):
        EncryptedStore(tmp_path, PassphraseKey.for_store(tmp_path, "correct horse")).get_bytes("u1", "ledger")


def test_keeps_n_versions_for_rollback(tmp_path):
    store = EncryptedStore(tmp_path, RawKey.generate(), keep_versions=2)
    for i in range(4):
        store.put_bytes("u1", "state", f"v{i}".encode())
    assert store.versions("u1", "state") == [3, 4]
    assert store.get_bytes("u1", "state", version=3) == b"v2"


def test_forget_me_crypto_shreds(tmp_path, adapter):
    key = RawKey.generate()
    store = EncryptedStore(tmp_path, key)
    store.put_adapter("u1", "personal", adapter)
    store.put_bytes("u1", "ledger", b"x")
    store.put_bytes("u2", "ledger", b"y")
    saved_copy = (tmp_path / "users/u1/personal/v000001.pfl").read_bytes()  # e.g. a backup
    report = store.forget("u1")
    assert report["user_key_destroyed"] and report["files_deleted"] == 3 and report["bytes_deleted"] > 0
    assert not (tmp_path / "users/u1").exists() and store.get_bytes("u2", "ledger") == b"y"
    # The surviving copy cannot be opened: a new user key is not the destroyed one.
    store.put_bytes("u1", "other", b"z")
    (tmp_path / "users/u1/personal").mkdir()
    (tmp_path / "users/u1/personal/v000001.pfl").write_bytes(saved_copy)
    with pytest.raises(WrongKeyError):
        store.get_adapter("u1", "personal")


def test_key_sources(tmp_path, monkeypatch):
    key = RawKey.generate()
    (tmp_path / "k").write_text(key.raw.hex())
    assert RawKey.from_file(tmp_path / "k").raw == key.raw
    monkeypatch.setenv("PERSONAFL_STORE_KEY", __import__("base64").b64encode(key.raw).decode())
    assert RawKey.from_env().raw == key.raw
    with pytest.raises(KeySourceError):
        RawKey.parse("too short")
    with pytest.raises(KeySourceError):
        RawKey.from_file(tmp_path / "missing")


_CHILD = """
import sys
from client.keys import RawKey
from client.store import EncryptedStore
store = EncryptedStore(sys.argv[1], RawKey(bytes.fromhex(sys.argv[2])))
store.put_bytes("u1", "personal", b"new version")
"""


def test_sigkill_between_write_and_rename_keeps_the_previous_version(tmp_path):
    key = RawKey.generate()
    store = EncryptedStore(tmp_path, key)
    store.put_bytes("u1", "personal", b"old version")
    env = {**os.environ, CRASH_ENV: "before-rename", "PYTHONPATH": str(ROOT)}
    child = subprocess.run([sys.executable, "-c", _CHILD, str(tmp_path), key.raw.hex()], env=env, cwd=ROOT)
    assert child.returncode == -9  # killed by SIGKILL mid-write
    assert any(p.name.endswith(".tmp") for p in (tmp_path / "users/u1/personal").iterdir())  # the torn write
    assert store.versions("u1", "personal") == [1]
    assert store.get_bytes("u1", "personal") == b"old version"
    assert store.put_bytes("u1", "personal", b"after crash") == 2 and store.get_bytes("u1", "personal") == b"after crash"
