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

A wrong key must be told from a damaged file, and the HMAC cannot do that (it needs the data key, which a wrong KEK
cannot unwrap). So the header also carries `digest`, a plain SHA-256 of its other fields: it detects accidental
damage (a flipped bit in the key-check value, say) without any key, and only a header whose digest holds and
whose key check differs is reported as `WrongKeyError`. The digest is no security measure (anyone can recompute
it); authenticity still rests on the wrap's GCM tag and the HMAC. Files written before the digest existed are
still read: for them a key that opens the wrap but not the HMAC is `TamperedError`, and a key whose check differs
and that cannot open the wrap is `WrongKeyError`.

Every header field is checked for presence, JSON type and size before use, and scrypt descriptors for a cost
floor (a header that lowers the KDF cost is refused), so every malformed input is an `EnvelopeError` subclass.
Nothing here writes to disk.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
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
    """Header or ciphertext was modified or damaged: a malformed field, a failed digest or authentication."""


# scrypt cost bounds, enforced wherever a passphrase KEK is derived or a descriptor is read. The floor is RFC 7914's
# interactive-use figure (n=2^14, r=8, p=1): below it a key-check value or a wrapped key lets a passphrase be
# guessed at a high rate (n=2, r=1 fell in under a second). The ceiling keeps a hostile descriptor from asking for
# more memory than a device has (scrypt needs 128 * n * r bytes; at most 1 GiB).
SCRYPT_FLOOR = {"n": 2**14, "r": 8, "p": 1}
SCRYPT_CEILING = {"n": 2**20, "r": 32, "p": 16}
SCRYPT_MAX_MEMORY = 2**30
SALT_BYTES = (16, 64)
KEK_KINDS = {"scrypt": {"salt", "n", "r", "p"}, "raw": set(), "keyring": {"service", "name"}, "user-key": set()}


def scrypt_cost_problem(n: object, r: object, p: object) -> str | None:
    """Why these scrypt parameters must not be used, or None if they are within the floor and ceiling."""
    for name, value in (("n", n), ("r", r), ("p", p)):
        if not _is_int(value):
            return f"scrypt {name} must be an integer, got {value!r}"
        if not SCRYPT_FLOOR[name] <= value <= SCRYPT_CEILING[name]:
            return (f"scrypt {name}={value} is outside [{SCRYPT_FLOOR[name]}, {SCRYPT_CEILING[name]}]: "
                    "a weaker cost would let the passphrase be guessed from a key-check value")
    if n & (n - 1):
        return f"scrypt n={n} is not a power of two"
    if 128 * n * r > SCRYPT_MAX_MEMORY:
        return f"scrypt n={n}, r={r} needs more than {SCRYPT_MAX_MEMORY} bytes of memory"
    return None


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class _Malformed(ValueError):
    """A header field of the wrong shape; TamperedError when read, ValueError when about to be written."""


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


def _b64_field(obj: dict, name: str, sizes: tuple[int, int]) -> bytes:
    value = obj.get(name)
    if not isinstance(value, str):
        raise _Malformed(f"{name} must be a base64 string, got {type(value).__name__}")
    try:
        raw = _unb64(value)
    except (binascii.Error, ValueError) as e:
        raise _Malformed(f"{name} is not valid base64: {e}") from None
    if not sizes[0] <= len(raw) <= sizes[1]:
        raise _Malformed(f"{name} holds {len(raw)} bytes, expected {sizes[0]}..{sizes[1]}")
    return raw


def _hex_field(obj: dict, name: str, length: int) -> None:
    value = obj.get(name)
    if not (isinstance(value, str) and len(value) == length and all(c in "0123456789abcdef" for c in value)):
        raise _Malformed(f"{name} must be {length} lowercase hex digits")


def _exact_keys(obj: object, what: str, required: set[str], optional: frozenset = frozenset()) -> dict:
    if not isinstance(obj, dict):
        raise _Malformed(f"{what} must be a JSON object, got {type(obj).__name__}")
    missing, extra = required - obj.keys(), obj.keys() - required - optional
    if missing or extra:
        raise _Malformed(f"{what}: missing fields {sorted(missing)}, unknown fields {sorted(extra)}")
    return obj


def check_kek_descriptor(kek: object) -> None:
    """Raises ValueError (`_Malformed`) unless `kek` is a well-formed descriptor of a known kind, costs in bounds."""
    kind = kek.get("kind") if isinstance(kek, dict) else None
    if not isinstance(kind, str) or kind not in KEK_KINDS:
        raise _Malformed(f"kek.kind must be one of {sorted(KEK_KINDS)}, got {kind!r}")
    _exact_keys(kek, f"kek ({kind})", KEK_KINDS[kind] | {"kind"}, frozenset({"check"}))
    if kind == "scrypt":
        _b64_field(kek, "salt", SALT_BYTES)
        problem = scrypt_cost_problem(kek["n"], kek["r"], kek["p"])
        if problem:
            raise _Malformed(problem)
    elif kind == "keyring" and not all(isinstance(kek[f], str) and 0 < len(kek[f]) <= 256 for f in ("service", "name")):
        raise _Malformed("kek.service and kek.name must be non-empty strings")


def _validate(header: object) -> None:
    """Every field present, of its JSON type and size; raises `_Malformed` naming the first that is not."""
    header = _exact_keys(header, "header", _REQUIRED, frozenset({"digest"}))
    b = _exact_keys(header["binding"], "binding", {"user", "adapter", "version"})
    if not (isinstance(b["user"], str) and isinstance(b["adapter"], str) and _is_int(b["version"])
            and b["version"] >= 0):
        raise _Malformed("binding must hold strings user, adapter and a non-negative integer version")
    check_kek_descriptor(header["kek"])
    _hex_field(header["kek"], "check", 16)
    if header["wrap"] != "AES-256-GCM":
        raise _Malformed(f"unknown key wrap {header['wrap']!r}")
    _b64_field(header, "wrap_nonce", (12, 12))
    _b64_field(header, "nonce", (12, 12))
    _b64_field(header, "wrapped_key", (32 + _TAG, 32 + _TAG))
    _hex_field(header, "mac", 64)
    if "digest" in header:
        _hex_field(header, "digest", 64)


_REQUIRED = {"binding", "kek", "wrap", "wrap_nonce", "wrapped_key", "nonce", "mac"}


def seal(payload: bytes, binding: Binding, kek: bytes, kek_descriptor: dict) -> bytes:
    """Encrypt `payload` for `binding` under a fresh data key wrapped by `kek`. ValueError on a bad descriptor."""
    check_kek_descriptor({k: v for k, v in kek_descriptor.items() if k != "check"})
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
    # "digest" is left out so that files written before it existed keep their MAC.
    body = json.dumps({k: v for k, v in header.items() if k not in ("mac", "digest")}, sort_keys=True).encode()
    return hmac.new(data_key, body, "sha256").hexdigest()


def _header_digest(header: dict) -> str:
    return hashlib.sha256(json.dumps({k: v for k, v in header.items() if k != "digest"}, sort_keys=True).encode()
                          ).hexdigest()


def _pack(header: dict, ciphertext: bytes, data_key: bytes) -> bytes:
    # Every header byte is authenticated: fields the decryption does not use (KDF descriptor) included.
    header = {k: v for k, v in header.items() if k not in ("mac", "digest")}
    header["mac"] = _header_mac(header, data_key)
    header["digest"] = _header_digest(header)
    _validate(header)  # never write what the reader would refuse
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
        header = json.loads(blob[_PREFIX.size:end].decode("utf-8"), object_pairs_hook=_no_duplicates,
                            parse_constant=_no_constants)
        _validate(header)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:  # JSONDecodeError and _Malformed are ValueErrors
        raise TamperedError(f"header is not valid: {e}") from None
    if "digest" in header and not hmac.compare_digest(header["digest"], _header_digest(header)):
        raise TamperedError("header is damaged: its digest does not match its fields")
    return header, blob[end:]


def _no_duplicates(pairs: list) -> dict:
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        raise ValueError(f"duplicate header field among {sorted(keys)}")
    return dict(pairs)


def _no_constants(name: str) -> None:
    raise ValueError(f"{name} is not valid in a header")


def _check_binding(header: dict, expected: Binding) -> None:
    b = header["binding"]
    found = Binding(b["user"], b["adapter"], b["version"])
    if found != expected:
        raise BindingError(f"file is bound to {found}, expected {expected}")


def unwrap(header: dict, binding: Binding, kek: bytes) -> bytes:
    """The data key of a file (a header from `read_header`), after checking binding and KEK.

    The wrap is tried first: a key that opens it is the right key, whatever the check field says (a damaged check
    is then caught by the HMAC). Only a key that cannot open it and whose check differs is a wrong key; one whose
    check matches means the wrap itself is damaged.
    """
    _check_binding(header, binding)
    right_check = hmac.compare_digest(header["kek"]["check"], key_check(kek))
    try:
        data_key = AESGCM(kek).decrypt(_unb64(header["wrap_nonce"]), _unb64(header["wrapped_key"]), binding.aad())
    except InvalidTag:
        if right_check:
            raise TamperedError("wrapped data key failed authentication") from None
        raise WrongKeyError("wrong key: the key-check value does not match this key-encryption key") from None
    if not hmac.compare_digest(header["mac"], _header_mac(header, data_key)):
        raise TamperedError("header failed authentication")
    if not right_check:  # unreachable unless the writer was faulty: the HMAC covers the check
        raise TamperedError("the key-check value does not match the key that opened the wrap")
    return data_key


def open_sealed(blob: bytes, binding: Binding, kek: bytes) -> bytes:
    header, ciphertext = read_header(blob)
    data_key = unwrap(header, binding, kek)
    try:
        return AESGCM(data_key).decrypt(_unb64(header["nonce"]), ciphertext, binding.aad())
    except InvalidTag:
        raise TamperedError("ciphertext failed authentication") from None


def rewrap(blob: bytes, binding: Binding, old_kek: bytes, new_kek: bytes, new_descriptor: dict) -> bytes:
    """Same payload bytes, data key wrapped under a new KEK. ValueError on a bad new descriptor."""
    check_kek_descriptor({k: v for k, v in new_descriptor.items() if k != "check"})
    header, ciphertext = read_header(blob)
    data_key = unwrap(header, binding, old_kek)
    wrap_nonce = os.urandom(12)
    header = {**header, "kek": {**new_descriptor, "check": key_check(new_kek)}, "wrap_nonce": _b64(wrap_nonce),
              "wrapped_key": _b64(AESGCM(new_kek).encrypt(wrap_nonce, data_key, binding.aad()))}
    return _pack(header, ciphertext, data_key)
