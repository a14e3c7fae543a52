"""Key-encryption-key (KEK) providers for the device's encrypted store.

- `PassphraseKey`: scrypt over a passphrase; salt and cost parameters are stored beside the store (not secret).
- `RawKey`: 32 raw bytes from a key file or an environment variable (hex or base64), for daemons.
- `KeyringKey`: a random key kept in the OS keyring, when the `keyring` package is installed.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from common.envelope import key_check


KEY_ENV = "PERSONAFL_STORE_KEY"


class KeySourceError(ValueError):
    """A key source that is missing or malformed."""


@dataclass(frozen=True)
class PassphraseKey:
    passphrase: str = field(repr=False)
    salt: bytes
    n: int = 2**15
    r: int = 8
    p: int = 1

    @classmethod
    def for_store(cls, root: Path, passphrase: str) -> "PassphraseKey":
        """Salt and parameters from `root/kdf.json`, created with a fresh salt the first time."""
        path = Path(root) / "kdf.json"
        if path.exists():
            params = json.loads(path.read_text())
            return cls(passphrase, base64.b64decode(params["salt"]), params["n"], params["r"], params["p"])
        key = cls(passphrase, os.urandom(16))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(key.descriptor))
        return key

    @property
    def descriptor(self) -> dict:
        return {"kind": "scrypt", "salt": base64.b64encode(self.salt).decode(), "n": self.n, "r": self.r, "p": self.p}

    def key(self) -> bytes:
        if not self.passphrase:
            raise KeySourceError("empty passphrase")
        return Scrypt(salt=self.salt, length=32, n=self.n, r=self.r, p=self.p).derive(self.passphrase.encode())


@dataclass(frozen=True)
class RawKey:
    raw: bytes = field(repr=False)

    def __post_init__(self) -> None:
        if len(self.raw) != 32:
            raise KeySourceError(f"a raw key must be 32 bytes, got {len(self.raw)}")

    @classmethod
    def parse(cls, text: str) -> "RawKey":
        text = text.strip()
        for decode in (bytes.fromhex, lambda t: base64.b64decode(t, validate=True)):
            try:
                raw = decode(text)
            except (ValueError, binascii.Error):
                continue
            if len(raw) == 32:
                return cls(raw)
        raise KeySourceError("key must be 32 bytes written as 64 hex digits or base64")

    @classmethod
    def from_file(cls, path: Path) -> "RawKey":
        try:
            return cls.parse(Path(path).read_text())
        except FileNotFoundError:
            raise KeySourceError(f"key file {path} not found") from None

    @classmethod
    def from_env(cls, var: str = KEY_ENV) -> "RawKey":
        if not os.environ.get(var):
            raise KeySourceError(f"environment variable {var} is not set")
        return cls.parse(os.environ[var])

    @classmethod
    def generate(cls) -> "RawKey":
        return cls(os.urandom(32))

    @property
    def descriptor(self) -> dict:
        return {"kind": "raw"}

    def key(self) -> bytes:
        return self.raw


@dataclass(frozen=True)
class KeyringKey:
    service: str = "personafl"
    name: str = "store-kek"

    def key(self) -> bytes:
        try:
            import keyring
        except ImportError:
            raise KeySourceError("the keyring package is not installed; use a passphrase or a key file") from None
        stored = keyring.get_password(self.service, self.name)
        if stored is None:
            stored = base64.b64encode(os.urandom(32)).decode()
            keyring.set_password(self.service, self.name, stored)
        return base64.b64decode(stored)

    @property
    def descriptor(self) -> dict:
        return {"kind": "keyring", "service": self.service, "name": self.name}


def describe(provider) -> str:
    """For status output: the provider kind and its key-check value, never the key."""
    return f"{provider.descriptor['kind']} (check {key_check(provider.key())})"
