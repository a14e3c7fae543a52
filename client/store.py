"""The device's encrypted store: per-user adapters and state, encrypted at rest, crash-safe, crypto-shreddable.

Key hierarchy: the KEK (passphrase / key file / keyring) wraps one random *user key* per user
(`users/<user>/user.key`); each stored version is sealed under a fresh data key wrapped by that user key.
- Rotation re-wraps the user keys only: no payload is decrypted or re-encrypted.
- Forget-me overwrites and deletes the user key, then deletes the user's files: whatever copies of the version
  files survive (backups, unreclaimed blocks) can no longer be decrypted.

Files: `users/<user>/<name>/v000001.pfl` ... in the `common.envelope` format. Writes go to a temporary file in the
same directory, are fsynced, renamed over, and the directory is fsynced; the previous version stays readable until
the new one is complete. Loading decrypts into memory only (safetensors from bytes), never to a temporary file.
"""

from __future__ import annotations

import os
import re
import signal
from pathlib import Path

import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from common.envelope import Binding, EnvelopeError, open_sealed, rewrap, seal

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_USER_KEY = "user-key"
# Test hook: the name of a write phase at which this process kills itself (crash-safety tests).
CRASH_ENV = "PERSONAFL_STORE_CRASH_AT"


class StoreError(Exception):
    """A request the store cannot satisfy (unknown user/version, bad name)."""


def _check_name(kind: str, value: str) -> str:
    if not _NAME.match(value):
        raise StoreError(f"invalid {kind} {value!r}: use letters, digits, '_', '.', '-' (max 64)")
    return value


def _crash_point(phase: str) -> None:
    if os.environ.get(CRASH_ENV) == phase:
        os.kill(os.getpid(), signal.SIGKILL)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    _crash_point("before-rename")
    os.replace(tmp, path)
    _fsync_dir(path.parent)


class EncryptedStore:
    def __init__(self, root: Path, keys, keep_versions: int = 3):
        """`keys`: a provider from `client.keys`; `keep_versions`: versions kept per (user, name) for rollback."""
        if keep_versions < 1:
            raise ValueError("keep_versions must be >= 1")
        self.root = Path(root)
        self.keys = keys
        self.keep_versions = keep_versions

    # --- layout --------------------------------------------------------------------------------------------
    def _user_dir(self, user: str) -> Path:
        return self.root / "users" / _check_name("user id", str(user))

    def _dir(self, user: str, name: str) -> Path:
        return self._user_dir(user) / _check_name("adapter name", name)

    def versions(self, user: str, name: str) -> list[int]:
        d = self._dir(user, name)
        return sorted(int(p.stem[1:]) for p in d.glob("v*.pfl")) if d.exists() else []

    def users(self) -> list[str]:
        base = self.root / "users"
        return sorted(p.name for p in base.iterdir() if p.is_dir()) if base.exists() else []

    # --- keys ----------------------------------------------------------------------------------------------
    def _user_key(self, user: str, create: bool) -> bytes:
        path = self._user_dir(user) / "user.key"
        binding = Binding(str(user), _USER_KEY, 0)
        if path.exists():
            return open_sealed(path.read_bytes(), binding, self.keys.key())
        if not create:
            raise StoreError(f"no data stored for user {user!r}")
        user_key = os.urandom(32)
        atomic_write(path, seal(user_key, binding, self.keys.key(), self.keys.descriptor))
        return user_key

    # --- bytes ---------------------------------------------------------------------------------------------
    def put_bytes(self, user: str, name: str, payload: bytes) -> int:
        """Store a new version; returns its number. Older versions beyond `keep_versions` are deleted."""
        user_key = self._user_key(user, create=True)
        existing = self.versions(user, name)
        version = (existing[-1] if existing else 0) + 1
        blob = seal(payload, Binding(str(user), name, version), user_key, {"kind": "user-key"})
        atomic_write(self._dir(user, name) / f"v{version:06d}.pfl", blob)
        for old in existing[: max(0, len(existing) + 1 - self.keep_versions)]:
            (self._dir(user, name) / f"v{old:06d}.pfl").unlink(missing_ok=True)
        return version

    def get_bytes(self, user: str, name: str, version: int | None = None) -> bytes:
        """Decrypt a version (default: the latest) into memory. Raises an EnvelopeError subclass on bad data."""
        available = self.versions(user, name)
        if not available:
            raise StoreError(f"nothing stored for user {user!r} under {name!r}")
        version = available[-1] if version is None else version
        if version not in available:
            raise StoreError(f"version {version} of {name!r} not kept (have {available})")
        path = self._dir(user, name) / f"v{version:06d}.pfl"
        return open_sealed(path.read_bytes(), Binding(str(user), name, version), self._user_key(user, create=False))

    # --- tensors (adapters) --------------------------------------------------------------------------------
    def put_adapter(self, user: str, name: str, tensors: dict[str, torch.Tensor]) -> int:
        return self.put_bytes(user, name, save_tensors({k: v.detach().cpu().contiguous() for k, v in tensors.items()}))

    def get_adapter(self, user: str, name: str, version: int | None = None) -> dict[str, torch.Tensor]:
        return load_tensors(self.get_bytes(user, name, version))

    # --- key management ------------------------------------------------------------------------------------
    def rotate(self, new_keys) -> int:
        """Re-wrap every user key under `new_keys`; payloads are untouched. Returns the number re-wrapped.

        All user keys are unwrapped with the old KEK before anything is written, so a wrong old key changes nothing.
        """
        old_kek, new_kek = self.keys.key(), new_keys.key()
        staged = []
        for user in self.users():
            path = self._user_dir(user) / "user.key"
            if path.exists():
                staged.append((path, rewrap(path.read_bytes(), Binding(user, _USER_KEY, 0), old_kek, new_kek,
                                            new_keys.descriptor)))
        for path, blob in staged:
            atomic_write(path, blob)
        self.keys = new_keys
        return len(staged)

    def forget(self, user: str) -> dict:
        """Crypto-shred a user: destroy their user key, then delete their files. Returns what was erased."""
        udir = self._user_dir(user)
        if not udir.exists():
            return {"user": str(user), "user_key_destroyed": False, "files_deleted": 0, "bytes_deleted": 0}
        key = udir / "user.key"
        destroyed = key.exists()
        if destroyed:
            with open(key, "r+b") as f:  # overwrite in place before unlinking
                size = f.seek(0, os.SEEK_END)
                f.seek(0)
                f.write(os.urandom(size))
                f.flush()
                os.fsync(f.fileno())
            key.unlink()
        files = [p for p in udir.rglob("*") if p.is_file()]
        size = sum(p.stat().st_size for p in files)
        for p in files:
            p.unlink()
        for d in sorted((p for p in udir.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
            d.rmdir()
        udir.rmdir()
        _fsync_dir(udir.parent)
        return {"user": str(user), "user_key_destroyed": destroyed, "files_deleted": len(files) + int(destroyed),
                "bytes_deleted": size}


__all__ = ["EncryptedStore", "StoreError", "EnvelopeError", "atomic_write", "CRASH_ENV"]
