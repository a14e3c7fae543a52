"""A device's side of secure aggregation: the SecAgg protocol (Bonawitz et al., CCS 2017; Flower's SecAgg+ is
its sparse-graph variant) over one integer vector, built from Flower's primitives and the `cryptography` package.

One round, four messages from the coordinator, one reply each:

1. advertise  two fresh ECDH key pairs (SECP384R1, as Flower's SecAgg+): c for encrypting shares, s for masks.
2. share      with every participant's public keys: a fresh self-mask seed b, and Shamir shares (Flower's
              `create_shares`, threshold t) of b and of the s private key, one pair per participant, each
              encrypted (Flower's `encrypt`: Fernet under an ECDH + HKDF key from the c keys) to its recipient.
3. mask       with the ciphertexts addressed to this device: the masked vector
              y = x + PRG(b) + sum over others v of +-PRG(s_uv)  (mod 2**32; + when u < v, - when u > v),
              so pairwise masks cancel in the sum of all vectors.
4. unmask     with the survivors (sent y) and the dropped (did not): b shares of survivors and s-key shares of
              the dropped, never both for one device, and only if at least t survived.

The coordinator learns the sum of the survivors' x and nothing else about any x (against a coordinator that
follows the protocol; see docs/secure_aggregation.md for what an active one could do). Masks are the ChaCha20
keystream (the `cryptography` package) of a 256-bit seed. Flower's `pseudo_rand_gen` is not used: it folds its
seed into 32 bits for numpy's RandomState, so a mask could be found by trying 2**32 seeds.

Everything here is plain data in and out; `client.client_app` carries it in Flower messages and keeps the
state between messages in memory (Flower's context.state), never in the device's store.
"""

from __future__ import annotations

import base64
import os

import numpy as np
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from flwr.common.secure_aggregation.crypto.shamir import create_shares
from flwr.common.secure_aggregation.crypto.symmetric_encryption import decrypt, encrypt, generate_shared_key
from flwr.common.secure_aggregation.secaggplus_utils import (share_keys_plaintext_concat,
                                                             share_keys_plaintext_separate)

CURVE = ec.SECP384R1()
SEED_BYTES = 32
MAX_NODE_ID = (1 << 64) - 1  # Flower node ids are unsigned 64-bit


class ProtocolError(ValueError):
    """A protocol message that this side must not act on (malformed, inconsistent, or out of order)."""


def prg(seed: bytes, length: int) -> np.ndarray:
    """`length` uniform uint32 values: the ChaCha20 keystream of a 32-byte seed (a fresh seed every round)."""
    if len(seed) != SEED_BYTES:
        raise ProtocolError(f"a mask seed has {SEED_BYTES} bytes, got {len(seed)}")
    encryptor = Cipher(algorithms.ChaCha20(seed, b"\0" * 16), mode=None).encryptor()
    return np.frombuffer(encryptor.update(b"\0" * (4 * length)), dtype="<u4").astype(np.uint32)


def pair_seed(private_key: ec.EllipticCurvePrivateKey, public_key: ec.EllipticCurvePublicKey) -> bytes:
    """The seed both ends of a pair derive (ECDH + HKDF-SHA256, Flower's `generate_shared_key`)."""
    return base64.urlsafe_b64decode(generate_shared_key(private_key, public_key))


def public_bytes(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.DER,
                                         serialization.PublicFormat.SubjectPublicKeyInfo)


def load_public(data: bytes) -> ec.EllipticCurvePublicKey:
    """A participant's public key; anything but a point on CURVE is a ProtocolError."""
    try:
        key = serialization.load_der_public_key(bytes(data))
    except (ValueError, TypeError) as e:
        raise ProtocolError(f"not a DER public key ({type(e).__name__})") from None
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != CURVE.name:
        raise ProtocolError("public key is not on the protocol's curve")
    return key


def private_bytes(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def load_private(data: bytes) -> ec.EllipticCurvePrivateKey:
    try:
        key = serialization.load_der_private_key(bytes(data), password=None)
    except (ValueError, TypeError) as e:
        raise ProtocolError(f"not a DER private key ({type(e).__name__})") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name != CURVE.name:
        raise ProtocolError("private key is not on the protocol's curve")
    return key


def pair_mask(own: int, other: int, seed: bytes, length: int) -> np.ndarray:
    """What `own` adds for the pair (own, other): +PRG when own < other, -PRG (mod 2**32) otherwise."""
    mask = prg(seed, length)
    return mask if own < other else (np.uint32(0) - mask).astype(np.uint32)


class Participant:
    """One device in one round. Stages must come in order; each runs once."""

    STAGES = ("advertise", "share", "mask", "unmask", "done")

    def __init__(self, node: int, vector: np.ndarray, threshold: int) -> None:
        if vector.dtype != np.uint32 or vector.ndim != 1:
            raise ValueError("the vector to aggregate is a flat uint32 array")
        if threshold < 2:
            raise ValueError(f"threshold must be >= 2, got {threshold}")
        self.node, self.vector, self.threshold = int(node), vector, int(threshold)
        self.stage = "advertise"
        self.c_key: ec.EllipticCurvePrivateKey | None = None
        self.s_key: ec.EllipticCurvePrivateKey | None = None
        self.seed = b""
        self.peers: dict[int, tuple[bytes, bytes]] = {}  # node -> (c public, s public) from stage 2
        self.inbox: dict[int, bytes] = {}  # node -> ciphertext of its shares for this device (stage 3)

    def _enter(self, stage: str) -> None:
        if self.stage != stage:
            raise ProtocolError(f"asked for stage {stage!r}, but this device is at {self.stage!r}")

    def advertise(self) -> tuple[bytes, bytes]:
        self._enter("advertise")
        self.c_key, self.s_key = ec.generate_private_key(CURVE), ec.generate_private_key(CURVE)
        self.stage = "share"
        return public_bytes(self.c_key), public_bytes(self.s_key)

    def share(self, keys: dict[int, tuple[bytes, bytes]]) -> dict[int, bytes]:
        """Shamir shares of (b, s private key), one ciphertext per participant (this device included: it holds
        its own shares too, so the coordinator needs t of all n)."""
        self._enter("share")
        if self.node not in keys:
            raise ProtocolError("this device is not among the participants")
        if keys[self.node] != (public_bytes(self.c_key), public_bytes(self.s_key)):
            raise ProtocolError("the coordinator relayed other public keys for this device")
        if len(keys) < self.threshold:
            raise ProtocolError(f"{len(keys)} participants, fewer than the threshold {self.threshold}")
        # A minority threshold would let a coordinator that tells two halves of the cohort different stories
        # gather both the seed shares and the key shares of one device.
        if 2 * self.threshold <= len(keys):
            raise ProtocolError(f"threshold {self.threshold} is not a majority of {len(keys)} participants")
        if any(not 0 <= n <= MAX_NODE_ID for n in keys):
            raise ProtocolError("a participant id is not a node id")
        # Two participants with one key would let whoever holds it unmask the other's pairwise mask.
        if len({c for c, _ in keys.values()}) != len(keys) or len({s for _, s in keys.values()}) != len(keys):
            raise ProtocolError("two participants advertised the same public key")
        parsed = {n: (load_public(c), load_public(s)) for n, (c, s) in keys.items()}
        self.peers = {n: (bytes(c), bytes(s)) for n, (c, s) in keys.items()}
        self.seed = os.urandom(SEED_BYTES)
        order = sorted(keys)
        b_shares = create_shares(self.seed, self.threshold, len(order))
        s_shares = create_shares(private_bytes(self.s_key), self.threshold, len(order))
        out = {}
        for node, b_share, s_share in zip(order, b_shares, s_shares):
            key = generate_shared_key(self.c_key, parsed[node][0])
            out[node] = encrypt(key, share_keys_plaintext_concat(self.node, node, b_share, s_share))
        self.stage = "mask"
        return out

    def mask(self, inbox: dict[int, bytes]) -> np.ndarray:
        """The masked vector. Masks are paired with every device whose shares reached this one: exactly those the
        coordinator can later either keep (survivor) or unmask (dropped)."""
        self._enter("mask")
        if self.node not in inbox:
            raise ProtocolError("the coordinator withheld this device's own shares")
        if unknown := set(inbox) - set(self.peers):
            raise ProtocolError(f"ciphertexts from {len(unknown)} devices that were not participants")
        if len(inbox) < self.threshold:
            raise ProtocolError(f"shares from {len(inbox)} devices, fewer than the threshold {self.threshold}")
        self.inbox = {n: bytes(c) for n, c in inbox.items()}
        length = self.vector.size
        y = self.vector + prg(self.seed, length)
        for other in sorted(self.inbox):
            if other != self.node:
                seed = pair_seed(self.s_key, load_public(self.peers[other][1]))
                y += pair_mask(self.node, other, seed, length)
        self.vector = np.zeros(0, np.uint32)  # the plain vector is not needed again: drop it now
        self.stage = "unmask"
        return y

    def unmask(self, survivors: list[int], dropped: list[int]) -> dict[int, bytes]:
        """Shares this device holds: b shares of survivors, s-key shares of the dropped. Refuses a request that
        would reveal both of one device's secrets, or names devices it did not exchange shares with."""
        self._enter("unmask")
        alive, gone = set(survivors), set(dropped)
        if len(alive) != len(survivors) or len(gone) != len(dropped):
            raise ProtocolError("a device is listed twice")
        if alive & gone:
            raise ProtocolError("a device is listed as both survivor and dropped")
        if (alive | gone) != set(self.inbox):
            raise ProtocolError("survivors and dropped are not the devices this one masked with")
        if self.node not in alive:
            raise ProtocolError("this device is listed as dropped")
        if len(alive) < self.threshold:
            raise ProtocolError(f"{len(alive)} survivors, fewer than the threshold {self.threshold}")
        out = {}
        for node in sorted(alive | gone):
            try:
                plain = decrypt(generate_shared_key(self.c_key, load_public(self.peers[node][0])), self.inbox[node])
            except ProtocolError:
                raise
            except Exception as e:  # noqa: BLE001 -- Fernet raises InvalidToken on any tampering
                raise ProtocolError(f"the share from node {node} does not decrypt ({type(e).__name__})") from None
            src, dst, b_share, s_share = share_keys_plaintext_separate(plain)
            if (src, dst) != (node, self.node):
                raise ProtocolError(f"the share from node {node} was addressed from {src} to {dst}")
            out[node] = b_share if node in alive else s_share
        self.stage = "done"
        self.c_key = self.s_key = None
        self.seed = b""
        return out

    # The state between messages, as Flower record values, kept in memory by the ClientApp. Node ids are unsigned
    # 64-bit, beyond a record's signed int64, so they travel as decimal strings.
    def to_state(self) -> dict:
        state = {"node": str(self.node), "threshold": self.threshold, "stage": self.stage,
                 "seed": self.seed, "peer-ids": [str(n) for n in sorted(self.peers)],
                 "peer-c": [self.peers[n][0] for n in sorted(self.peers)],
                 "peer-s": [self.peers[n][1] for n in sorted(self.peers)],
                 "inbox-ids": [str(n) for n in sorted(self.inbox)],
                 "inbox": [self.inbox[n] for n in sorted(self.inbox)]}
        if self.c_key is not None:
            state["c-key"], state["s-key"] = private_bytes(self.c_key), private_bytes(self.s_key)
        return state

    @classmethod
    def from_state(cls, state: dict, vector: np.ndarray) -> "Participant":
        p = cls(int(state["node"]), vector, int(state["threshold"]))
        p.stage, p.seed = str(state["stage"]), bytes(state["seed"])
        p.peers = {int(n): (bytes(c), bytes(s)) for n, c, s in zip(state["peer-ids"], state["peer-c"],
                                                                     state["peer-s"])}
        p.inbox = {int(n): bytes(c) for n, c in zip(state["inbox-ids"], state["inbox"])}
        if "c-key" in state:
            p.c_key, p.s_key = load_private(state["c-key"]), load_private(state["s-key"])
        return p
