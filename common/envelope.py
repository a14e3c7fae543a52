"""Encrypted envelope for per-user adapters and device state (file format version 1).

Layout of a file:

    magic "PFLV" | format version (1 byte) | header length (4 bytes, big-endian) | header (UTF-8 JSON) | ciphertext

The header holds the binding (user id, adapter id, version), the key-encryption key's descriptor (KDF kind and
parameters, key-check value), the data key wrapped with the KEK (AES-256-GCM), and the payload nonce. The payload
is AES-256-GCM under a fresh random 256-bit data key and 96-bit nonce. Both the wrap and the payload take as
associated data the format version and the binding, so a file copied to another user or another version, or
rolled back to an older one, fails to open. The header itself is not associated data of the payload: rotating
the KEK rewrites only the header (a re-wrapped data key), never the payload. The header carries an HMAC under the
data key over all its other fields, so no header byte can change unnoticed either.

Every failure is a distinct `EnvelopeError` subclass, and nothing here writes to disk.
"""

from __future__ import annotations

import base64
import hmac
import json
import os
import struct
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

MAGIC = b"PFLV"
FORMAT_VERSION = 1
_PREFIX = struct.Struct(">4sBI")
_TAG = 16


class EnvelopeError(Exception):
    """Base class: an envelope that cannot be opened. Nothing was changed on disk."""


class UnknownFormatError(EnvelopeError):
    """Not one of our files, or a format version this code does not know."""


class TruncatedError(EnvelopeError):
    """The file ends before its header or its authentication tag."""


class WrongKeyError(EnvelopeError):
    """The key-encryption key (passphrase, key file, keyring entry) is not the one the file was written with."""


class BindingError(EnvelopeError):
    """The file belongs to another user, adapter or version (copied, renamed or rolled back)."""


class TamperedError(EnvelopeError):
    """Header or ciphertext was modified: authentication failed."""


@dataclass(frozen=True)
class Binding:
    user: str
    adapter: str
    version: int

    def aad(self) -> bytes:
        return json.dumps({"f": FORMAT_VERSION, "u": self.user, "a": self.adapter, "v": self.version},
                          sort_keys=True).encode()


def key_check(kek: bytes) -> str:
    """A short MAC of a constant: tells a wrong KEK from a tampered file without revealing the key."""
    return hmac.new(kek, b"personafl key check", "sha256").hexdigest()[:16]


def _b64(b: bytes) -> str:
    return base64.b64encode(b).decode()


def _unb64(s: str) -> bytes:
    return base64.b64decode(s, validate=True)


def seal(payload: bytes, binding: Binding, kek: bytes, kek_descriptor: dict) -> bytes:
    data_key = AESGCM.generate_key(bit_length=256)
    wrap_nonce, nonce = os.urandom(12), os.urandom(12)
    header = {
        "binding": {"user": binding.user, "adapter": binding.adapter, "version": binding.version},
        "kek": {**kek_descriptor, "check": key_check(kek)},
        "wrap": "AES-256-GCM",
        "wrap_nonce": _b64(wrap_nonce),
        "wrapped_key": _b64(AESGCM(kek).encrypt(wrap_nonce, data_key, binding.aad())),
        "nonce": _b64(nonce),
    }
    return _pack(header, AESGCM(data_key).encrypt(nonce, payload, binding.aad()), data_key)


def _header_mac(header: dict, data_key: bytes) -> str:
    body = json.dumps({k: v for k, v in header.items() if k != "mac"}, sort_keys=True).encode()
    return hmac.new(data_key, body, "sha256").hexdigest()


def _pack(header: dict, ciphertext: bytes, data_key: bytes) -> bytes:
    # Every header byte is authenticated: fields the decryption does not use (KDF descriptor) included.
    header = {**header, "mac": _header_mac(header, data_key)}
    raw = json.dumps(header, sort_keys=True).encode()
    return _PREFIX.pack(MAGIC, FORMAT_VERSION, len(raw)) + raw + ciphertext


def read_header(blob: bytes) -> tuple[dict, bytes]:
    """(header, ciphertext) of an envelope; checks framing only, not authenticity."""
    if len(blob) < _PREFIX.size:
        raise TruncatedError("file is shorter than the envelope prefix")
    magic, version, length = _PREFIX.unpack_from(blob)
    if magic != MAGIC:
        raise UnknownFormatError("not a PersonaFL encrypted file (bad magic)")
    if version != FORMAT_VERSION:
        raise UnknownFormatError(f"format version {version} is not supported (this code reads {FORMAT_VERSION})")
    end = _PREFIX.size + length
    if len(blob) < end + _TAG:
        raise TruncatedError(f"file holds {len(blob)} bytes, its header alone needs {end} plus a {_TAG}-byte tag")
    try:
        header = json.loads(blob[_PREFIX.size:end].decode())
        header["binding"], header["kek"], header["wrapped_key"], header["nonce"]  # noqa: B018 - presence check
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise TamperedError(f"header is not valid: {e}") from e
    return header, blob[end:]


def _check_binding(header: dict, expected: Binding) -> None:
    b = header["binding"]
    found = Binding(str(b.get("user")), str(b.get("adapter")), b.get("version"))
    if found != expected:
        raise BindingError(f"file is bound to {found}, expected {expected}")


def unwrap(header: dict, binding: Binding, kek: bytes) -> bytes:
    """The data key of a file, after checking KEK and binding."""
    _check_binding(header, binding)
    if not hmac.compare_digest(str(header["kek"].get("check", "")), key_check(kek)):
        raise WrongKeyError("wrong key: the key-check value does not match this key-encryption key")
    try:
        data_key = AESGCM(kek).decrypt(_unb64(header["wrap_nonce"]), _unb64(header["wrapped_key"]), binding.aad())
    except (InvalidTag, ValueError, TypeError) as e:
        raise TamperedError("wrapped data key failed authentication") from e
    if not hmac.compare_digest(str(header.get("mac", "")), _header_mac(header, data_key)):
        raise TamperedError("header failed authentication")
    return data_key


def open_sealed(blob: bytes, binding: Binding, kek: bytes) -> bytes:
    header, ciphertext = read_header(blob)
    data_key = unwrap(header, binding, kek)
    try:
        return AESGCM(data_key).decrypt(_unb64(header["nonce"]), ciphertext, binding.aad())
    except (InvalidTag, ValueError, TypeError) as e:
        raise TamperedError("ciphertext failed authentication") from e


def rewrap(blob: bytes, binding: Binding, old_kek: bytes, new_kek: bytes, new_descriptor: dict) -> bytes:
    """Same payload bytes, data key wrapped under a new KEK."""
    header, ciphertext = read_header(blob)
    data_key = unwrap(header, binding, old_kek)
    wrap_nonce = os.urandom(12)
    header = {**header, "kek": {**new_descriptor, "check": key_check(new_kek)}, "wrap_nonce": _b64(wrap_nonce),
              "wrapped_key": _b64(AESGCM(new_kek).encrypt(wrap_nonce, data_key, binding.aad()))}
    return _pack(header, ciphertext, data_key)
