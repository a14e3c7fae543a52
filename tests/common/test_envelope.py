"""Attack suite for the envelope format: every hostile input is a documented EnvelopeError, never anything else,
and a wrong key is told from a damaged file (issue #15)."""

import base64
import hashlib
import json
import os
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from common import envelope
from common.envelope import (Binding, BindingError, EnvelopeError, TamperedError, TruncatedError, UnknownFormatError,
                             WrongKeyError, key_check, open_sealed, read_header, rewrap, seal)

KEK = bytes(range(32))
OTHER = bytes(range(1, 33))
BINDING = Binding("alice", "personal", 3)
PAYLOAD = b"adapter bytes " * 20
SALT = base64.b64encode(b"s" * 16).decode()
FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(scope="module")
def sealed() -> bytes:
    return seal(PAYLOAD, BINDING, KEK, {"kind": "raw"})


def _split(blob: bytes) -> tuple[dict, bytes]:
    length = int.from_bytes(blob[5:9], "big")
    return json.loads(blob[9:9 + length]), blob[9 + length:]


def _pack(header, ciphertext: bytes, fix_digest: bool = True) -> bytes:
    """A blob with a well-framed prefix around `header` (any JSON), the digest recomputed so that the field checks,
    not the digest, are what must catch a bad field."""
    if fix_digest and isinstance(header, dict) and "digest" in header:
        header = dict(header)
        header["digest"] = hashlib.sha256(json.dumps({k: v for k, v in header.items() if k != "digest"},
                                                     sort_keys=True).encode()).hexdigest()
    raw = json.dumps(header, sort_keys=True).encode()
    return struct.pack(">4sBI", b"PFLV", 1, len(raw)) + raw + ciphertext


def _opens_or_documented_error(blob: bytes, kek: bytes = KEK) -> EnvelopeError | None:
    try:
        open_sealed(blob, BINDING, kek)
    except EnvelopeError as e:  # any other exception type fails the test
        return e
    return None


def test_round_trip_and_wrong_key(sealed):
    assert open_sealed(sealed, BINDING, KEK) == PAYLOAD
    with pytest.raises(WrongKeyError):
        open_sealed(sealed, BINDING, OTHER)
    with pytest.raises(BindingError):
        open_sealed(sealed, Binding("bob", "personal", 3), KEK)


def _flip_in_field(blob: bytes, needle: bytes, skip: int) -> bytes:
    at = blob.index(needle) + skip
    out = bytearray(blob)
    out[at] ^= 0x01
    return bytes(out)


def test_a_damaged_check_value_read_with_the_right_key_is_tampered_not_wrong_key(sealed):
    # Issue #15: one flipped bit in kek.check was reported as WrongKeyError.
    damaged = _flip_in_field(sealed, b'"check": "', len(b'"check": "') + 3)
    with pytest.raises(TamperedError):
        open_sealed(damaged, BINDING, KEK)


def test_a_damaged_check_value_in_a_file_without_digest_is_still_tampered(sealed):
    # Files written before the digest existed: the key opens the wrap, so the HMAC (not the check) decides.
    header, ct = _split(sealed)
    del header["digest"]
    old = _pack(header, ct)
    assert open_sealed(old, BINDING, KEK) == PAYLOAD
    with pytest.raises(WrongKeyError):
        open_sealed(old, BINDING, OTHER)
    header["kek"]["check"] = "0" * 16 if header["kek"]["check"] != "0" * 16 else "1" * 16
    with pytest.raises(TamperedError):
        open_sealed(_pack(header, ct), BINDING, KEK)


def test_a_flipped_bit_in_a_field_name_is_tampered(sealed):
    # Issue #15: `wrap_nonce` -> `wrap_nonbe` raised KeyError.
    with pytest.raises(TamperedError):
        open_sealed(_flip_in_field(sealed, b'"wrap_nonce"', 8), BINDING, KEK)


@pytest.mark.parametrize("field,value", [("kek", "x"), ("binding", []), ("binding", {"user": ["alice"]}),
                                         ("mac", 5), ("wrap_nonce", None), ("nonce", "é"), ("kek", {"kind": "raw",
                                                                                                    "check": "é"})])
def test_header_fields_of_the_wrong_type_are_tampered(sealed, field, value):
    # Issue #15: "kek": "x" and "binding": [] raised AttributeError.
    header, ct = _split(sealed)
    header[field] = value
    with pytest.raises(TamperedError):
        open_sealed(_pack(header, ct), BINDING, KEK)


@FAST
@given(data=st.data())
def test_any_single_bit_flip_is_detected_and_never_called_a_wrong_key(sealed, data):
    bit = data.draw(st.integers(0, len(sealed) * 8 - 1))
    out = bytearray(sealed)
    out[bit // 8] ^= 1 << (bit % 8)
    error = _opens_or_documented_error(bytes(out))
    assert error is not None and not isinstance(error, WrongKeyError), (bit, error)


@FAST
@given(data=st.data())
def test_any_burst_of_damage_is_a_documented_error(sealed, data):
    start = data.draw(st.integers(0, len(sealed) - 1))
    junk = data.draw(st.binary(min_size=1, max_size=24))
    out = bytearray(sealed)
    out[start:start + len(junk)] = junk
    if bytes(out) != sealed:
        assert _opens_or_documented_error(bytes(out)) is not None
        assert _opens_or_documented_error(bytes(out), OTHER) is not None


@FAST
@given(cut=st.integers(0, 10_000))
def test_every_truncation_is_a_documented_error(sealed, cut):
    cut %= len(sealed)
    error = _opens_or_documented_error(sealed[:cut])
    assert isinstance(error, (TruncatedError, TamperedError)), (cut, error)


@FAST
@given(blob=st.binary(max_size=300))
def test_arbitrary_bytes_are_a_documented_error(blob):
    assert _opens_or_documented_error(blob) is not None
    assert _opens_or_documented_error(b"PFLV\x01" + blob) is not None


_json = st.recursive(st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False)
                     | st.text(max_size=20),
                     lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner,
                                                                                  max_size=4), max_leaves=12)


def _paths(obj, prefix=()):
    yield prefix
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _paths(v, prefix + (k,))


@FAST
@given(data=st.data(), value=_json)
def test_any_header_field_replaced_by_any_json_is_a_documented_error(sealed, data, value):
    header, ct = _split(sealed)
    path = data.draw(st.sampled_from([p for p in _paths(header) if p and p != ("digest",)]))
    target = header
    for key in path[:-1]:
        target = target[key]
    if target[path[-1]] == value:
        return
    target[path[-1]] = value
    for kek in (KEK, OTHER):
        error = _opens_or_documented_error(_pack(header, ct), kek)
        assert error is not None, (path, value)


@FAST
@given(data=st.data(), name=st.text(min_size=1, max_size=12), value=_json)
def test_stray_deleted_or_renamed_header_fields_are_tampered(sealed, data, name, value):
    header, ct = _split(sealed)
    field = data.draw(st.sampled_from(sorted(header)))
    action = data.draw(st.sampled_from(["delete", "rename", "add"]))
    if action == "add":
        if name in header:
            return
        header[name] = value
    else:
        moved = header.pop(field)
        if action == "rename" and name not in header and name != field:
            header[name] = moved
    if set(header) == {"binding", "kek", "wrap", "wrap_nonce", "wrapped_key", "nonce", "mac"}:
        # Only the digest went: a file from before the digest existed, still readable.
        assert _opens_or_documented_error(_pack(header, ct)) is None
        assert isinstance(_opens_or_documented_error(_pack(header, ct), OTHER), WrongKeyError)
        return
    for kek in (KEK, OTHER):
        error = _opens_or_documented_error(_pack(header, ct), kek)
        assert isinstance(error, TamperedError), (field, action, name, error)


def test_hostile_json_is_tampered(sealed):
    _, ct = _split(sealed)
    for raw in (b"[" * 100_000 + b"]" * 100_000, b'{"mac": NaN}', b'{"mac": 1, "mac": 2}', b"\xff\xfe",
                b'{"binding": {"version": 1' + b"0" * 5000 + b"}}", b"null", b'"header"'):
        with pytest.raises(TamperedError):
            open_sealed(struct.pack(">4sBI", b"PFLV", 1, len(raw)) + raw + ct, BINDING, KEK)
    with pytest.raises(UnknownFormatError):
        open_sealed(b"PFLX" + sealed[4:], BINDING, KEK)


def test_boolean_or_float_versions_are_not_a_version(sealed):
    header, ct = _split(sealed)
    for v in (3.0, True):
        header["binding"]["version"] = v
        with pytest.raises(TamperedError):
            open_sealed(_pack(header, ct), Binding("alice", "personal", int(v)), KEK)


@pytest.mark.parametrize("n,r,p", [(2, 1, 1), (2**13, 8, 1), (2**14, 7, 1), (2**14, 8, 0), (3 * 2**14, 8, 1),
                                   (2**30, 8, 1), ("16384", 8, 1), (2**14, 8.0, 1)])
def test_a_weak_or_absurd_scrypt_descriptor_is_refused_on_write_and_read(sealed, n, r, p):
    assert envelope.scrypt_cost_problem(n, r, p)
    weak = {"kind": "scrypt", "salt": SALT, "n": n, "r": r, "p": p}
    with pytest.raises(ValueError):
        seal(PAYLOAD, BINDING, KEK, weak)
    with pytest.raises(ValueError):
        rewrap(sealed, BINDING, KEK, OTHER, weak)
    header, ct = _split(sealed)
    header["kek"] = {**weak, "check": key_check(KEK)}
    with pytest.raises(TamperedError, match="scrypt"):
        open_sealed(_pack(header, ct), BINDING, KEK)


def test_a_floor_descriptor_is_accepted_and_rewrap_keeps_the_payload(sealed):
    ok = {"kind": "scrypt", "salt": SALT, **envelope.SCRYPT_FLOOR}
    assert envelope.scrypt_cost_problem(**envelope.SCRYPT_FLOOR) is None
    moved = rewrap(sealed, BINDING, KEK, OTHER, ok)
    assert open_sealed(moved, BINDING, OTHER) == PAYLOAD and _split(moved)[1] == _split(sealed)[1]
    assert read_header(moved)[0]["kek"]["n"] == envelope.SCRYPT_FLOOR["n"]
    with pytest.raises(WrongKeyError):
        open_sealed(moved, BINDING, KEK)


def test_sealing_twice_differs():
    a, b = (seal(PAYLOAD, BINDING, KEK, {"kind": "raw"}) for _ in range(2))
    assert a != b and os.urandom(1) is not None
