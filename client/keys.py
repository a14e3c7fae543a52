"""Key-encryption-key (KEK) providers for the device's encrypted store.

- `PassphraseKey`: scrypt over a passphrase; salt and cost parameters are stored beside the store (not secret).
  Costs below `common.envelope.SCRYPT_FLOOR` are refused whatever their source: `kdf.json` is not authenticated
  (it must be read before any key exists), so a weakened copy must not be able to lower the cost of the next wrap.
  The store also compares these parameters with those recorded (under the HMAC) in its user keys' headers.
- `RawKey`: 32 raw bytes from a key file (the bytes themselves, or hex / base64 text) or an environment variable
  (hex or base64), for daemons.
- `KeyringKey`: a random key kept in the OS keyring, when the `keyring` package is installed.

Every missing or malformed source raises `KeySourceError`.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import stat
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from common.envelope import SALT_BYTES, key_check, scrypt_cost_problem


KEY_ENV = "PERSONAFL_STORE_KEY"
KDF_FILE = "kdf.json"


class KeySourceError(ValueError):
    """A key source that is missing or malformed."""


@dataclass(frozen=True)
class PassphraseKey:
    passphrase: str = field(repr=False)
    salt: bytes
    n: int = 2**15
    r: int = 8
    p: int = 1

    def __post_init__(self) -> None:
        # Checked here, so no KEK is ever derived with a weak cost (every derivation goes through `key()`).
        problem = scrypt_cost_problem(self.n, self.r, self.p)
        if problem:
            raise KeySourceError(problem)
        if not isinstance(self.salt, bytes) or not SALT_BYTES[0] <= len(self.salt) <= SALT_BYTES[1]:
            raise KeySourceError(f"the scrypt salt must be {SALT_BYTES[0]}..{SALT_BYTES[1]} bytes")

    @classmethod
    def for_store(cls, root: Path, passphrase: str) -> "PassphraseKey":
        """Salt and parameters from `root/kdf.json`, created (owner-only) with a fresh salt the first time."""
        path = Path(root) / KDF_FILE
        if not os.path.lexists(path):
            key = cls(passphrase, os.urandom(16))
            if key.record(root, replace=False):
                return key
        return cls.from_descriptor(_read_kdf(path), passphrase)

    @classmethod
    def from_descriptor(cls, params: object, passphrase: str) -> "PassphraseKey":
        """From a descriptor dict (`kdf.json`'s content); KeySourceError unless it is exactly a valid one."""
        if not isinstance(params, dict) or set(params) != {"kind", "salt", "n", "r", "p"} or \
                params["kind"] != "scrypt" or not isinstance(params["salt"], str):
            raise KeySourceError("kdf parameters must be exactly {kind: scrypt, salt, n, r, p}")
        try:
            salt = base64.b64decode(params["salt"], validate=True)
        except (binascii.Error, ValueError):
            raise KeySourceError("the kdf salt is not valid base64") from None
        return cls(passphrase, salt, params["n"], params["r"], params["p"])

    def record(self, root: Path, replace: bool = True) -> bool:
        """Write this key's parameters to `root/kdf.json` (0600, complete or absent). With replace=False, only if
        no file is there yet (two processes enrolling at once must not end up with two salts): returns whether
        this call's parameters are the ones on disk."""
        root = Path(root)
        root.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd, tmp = tempfile.mkstemp(dir=root, prefix=f".{KDF_FILE}.", suffix=".tmp")  # created 0600
        try:
            with os.fdopen(fd, "w") as f:
                f.write(json.dumps(self.descriptor))
                f.flush()
                os.fsync(f.fileno())
            if replace:
                os.replace(tmp, root / KDF_FILE)
            else:
                try:
                    os.link(tmp, root / KDF_FILE)  # atomic create-if-absent
                except FileExistsError:
                    return False
        finally:
            if os.path.lexists(tmp):
                os.unlink(tmp)
        # Durable before any key is wrapped with it: a salt lost in a crash would leave the store unreadable.
        dir_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
        return True

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
        """A key file holding the 32 key bytes themselves, or 64 hex digits / base64 text (a newline allowed)."""
        try:
            data = Path(path).read_bytes()
        except FileNotFoundError:
            raise KeySourceError(f"key file {path} not found") from None
        except OSError as e:
            raise KeySourceError(f"key file {path} cannot be read: {e.strerror or e}") from None
        # Unambiguous: hex and base64 texts of a 32-byte key are 64 and 44 characters, never exactly 32 bytes.
        if len(data) == 32:
            return cls(data)
        try:
            text = data.decode("ascii")
        except UnicodeDecodeError:
            raise KeySourceError(f"key file {path} is neither 32 raw bytes nor hex / base64 text") from None
        return cls.parse(text)

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
        try:
            return RawKey.parse(stored).raw
        except KeySourceError:
            raise KeySourceError(f"keyring entry {self.service}/{self.name} is not a 32-byte key") from None

    @property
    def descriptor(self) -> dict:
        return {"kind": "keyring", "service": self.service, "name": self.name}


def _read_kdf(path: Path) -> object:
    try:
        if not stat.S_ISREG(os.lstat(path).st_mode):  # a FIFO would block the read forever; a link, lead anywhere
            raise KeySourceError(f"{path} is not a regular file")
        return json.loads(Path(path).read_bytes().decode("utf-8"))
    except OSError as e:
        raise KeySourceError(f"{path} cannot be read: {e.strerror or e}") from None
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise KeySourceError(f"{path} is not valid JSON: {e}") from None


def describe(provider) -> str:
    """For status output: the provider kind and its key-check value, never the key."""
    return f"{provider.descriptor['kind']} (check {key_check(provider.key())})"
