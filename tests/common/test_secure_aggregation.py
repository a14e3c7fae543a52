"""The device's side of the protocol refuses what would leak its secrets, and rejects malformed input with a
ProtocolError rather than any other exception."""

import numpy as np
import pytest
from flwr.app import ConfigRecord
from hypothesis import given, settings
from hypothesis import strategies as st

from common.secure_aggregation import Participant, ProtocolError, load_public, prg

VEC = np.arange(8, dtype=np.uint32)


def _parties(n=4, threshold=3):
    parties = {i: Participant(i, VEC.copy(), threshold) for i in range(1, n + 1)}
    keys = {i: p.advertise() for i, p in parties.items()}
    return parties, keys


def test_masks_cancel_in_the_sum_and_hide_each_vector():
    parties, keys = _parties()
    shares = {i: p.share(keys) for i, p in parties.items()}
    ys = {i: p.mask({s: shares[s][i] for s in parties}) for i, p in parties.items()}
    for y in ys.values():
        assert not np.array_equal(y, VEC)
    # Without the self-masks the pairwise masks cancel: the sum is the vectors' sum plus each device's PRG(b).
    total = np.sum(list(ys.values()), axis=0, dtype=np.uint32)
    for p in parties.values():
        total -= prg(p.seed, VEC.size)
    np.testing.assert_array_equal(total, 4 * VEC)


def test_stages_run_in_order_and_once():
    parties, keys = _parties()
    p = parties[1]
    with pytest.raises(ProtocolError):
        p.mask({})
    p.share(keys)
    with pytest.raises(ProtocolError):
        p.share(keys)


@pytest.mark.parametrize("tamper", ["own-key", "duplicate", "too-few", "minority"])
def test_key_lists_that_would_leak_are_refused(tamper):
    parties, keys = _parties()
    if tamper == "own-key":  # the coordinator substitutes its own key for this device's
        keys[1] = keys[2]
    elif tamper == "duplicate":  # two participants with one key: whoever holds it unmasks the other
        keys[3] = keys[4]
    elif tamper == "minority":  # 2 of 4 could be two halves told different stories
        parties[1] = Participant(1, VEC.copy(), 2)
        keys[1] = parties[1].advertise()
    else:
        keys = {1: keys[1], 2: keys[2]}
    with pytest.raises(ProtocolError):
        parties[1].share(keys)


def test_unmask_never_reveals_both_secrets_of_one_device():
    parties, keys = _parties()
    shares = {i: p.share(keys) for i, p in parties.items()}
    for i, p in parties.items():
        p.mask({s: shares[s][i] for s in parties})
    with pytest.raises(ProtocolError, match="both"):
        parties[1].unmask([1, 2, 3], [3, 4])
    with pytest.raises(ProtocolError, match="threshold"):
        parties[2].unmask([1, 2], [3, 4])
    with pytest.raises(ProtocolError, match="masked with"):
        parties[3].unmask([1, 2, 3], [])
    with pytest.raises(ProtocolError, match="dropped"):
        parties[4].unmask([1, 2, 3], [4])
    assert sorted(parties[1].unmask([1, 2, 4], [3])) == [1, 2, 3, 4]


def test_a_tampered_share_is_refused():
    parties, keys = _parties()
    shares = {i: p.share(keys) for i, p in parties.items()}
    inbox = {s: shares[s][1] for s in parties}
    inbox[2] = inbox[2][:-4] + b"AAAA"
    parties[1].mask(inbox)
    with pytest.raises(ProtocolError, match="decrypt"):
        parties[1].unmask([1, 2, 3, 4], [])


def test_a_share_addressed_to_another_device_is_refused():
    parties, keys = _parties()
    shares = {i: p.share(keys) for i, p in parties.items()}
    # Device 2's ciphertext for device 3 decrypts only with 3's key: relayed to device 1 it fails to decrypt.
    inbox = {s: shares[s][1] for s in parties}
    inbox[2] = shares[2][3]
    parties[1].mask(inbox)
    with pytest.raises(ProtocolError):
        parties[1].unmask([1, 2, 3, 4], [])


@settings(max_examples=50, deadline=None)
@given(st.binary(max_size=200))
def test_any_bytes_as_a_public_key_are_a_protocol_error(data):
    try:
        load_public(data)
    except ProtocolError:
        pass


def test_state_survives_a_flower_record_between_messages():
    parties, keys = _parties()
    p = parties[1]
    p.share(keys)
    record = ConfigRecord(p.to_state())  # what the ClientApp keeps in context.state
    back = Participant.from_state(dict(record), VEC.copy())
    assert back.stage == "mask" and back.peers == p.peers and back.seed == p.seed
    assert back.s_key.private_numbers() == p.s_key.private_numbers()
