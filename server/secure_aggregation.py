"""The coordinator's side of secure aggregation (`common.secure_aggregation` has the protocol and the device's
side): it relays keys and encrypted shares, collects masked vectors, and unmasks only their sum.

`SecureSum` is the protocol state of one round over plain data; `run_round` carries it over a Flower Grid as
three query messages after the train message that asked for the keys:

    train.secagg         -> public keys                (the device trained and holds its K-slot vector)
    query.secagg_share   -> encrypted shares for each participant
    query.secagg_mask    -> the masked vector
    query.secagg_unmask  -> shares of survivors' seeds and of the dropped devices' mask keys

A reply that is missing, failed or malformed makes its device a dropout of that stage, never an exception. Fewer
than `threshold` devices left at any stage, or shares that do not reconstruct a consistent sum, abort the round
with `Aborted`: nothing is released from it.
"""

from __future__ import annotations

from logging import WARNING

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.common.logger import log
from flwr.common.secure_aggregation.crypto.shamir import combine_shares

from common.secure_aggregation import (SEED_BYTES, ProtocolError, load_private, load_public, pair_mask, pair_seed,
                                       prg)
from common.timing import phase

SHARE = "query.secagg_share"
MASK = "query.secagg_mask"
UNMASK = "query.secagg_unmask"
MAX_KEY_BYTES = 512  # a DER SECP384R1 public key is 120 bytes
MAX_SHARE_BYTES = 4096  # a Fernet ciphertext of two Shamir shares (a 32-byte seed and a ~185-byte key) is < 1 kB


class Aborted(RuntimeError):
    """The round cannot complete securely; the coordinator releases nothing from it."""


class SecureSum:
    """One round's protocol state at the coordinator: U1 (advertised keys) >= U2 (shared) >= U3 (masked) >= U4
    (answered the unmask request). Each stage needs at least `threshold` devices."""

    def __init__(self, threshold: int, length: int) -> None:
        self.threshold, self.length = threshold, length
        self.keys: dict[int, tuple[bytes, bytes]] = {}
        self.shared: set[int] = set()
        self.masked: dict[int, np.ndarray] = {}
        self.survivors: list[int] = []
        self.dropped: list[int] = []

    def _need(self, count: int, stage: str) -> None:
        if count < self.threshold:
            raise Aborted(f"{stage}: {count} devices left, fewer than the threshold {self.threshold}")

    def advertise(self, adverts: dict[int, tuple[bytes, bytes]]) -> dict[int, tuple[bytes, bytes]]:
        """U1: the participants whose two public keys parse; duplicates are dropped (reused keys would let one
        device unmask another's pairwise masks)."""
        seen: set[bytes] = set()
        for node, (c, s) in sorted(adverts.items()):
            try:
                load_public(c), load_public(s)
            except ProtocolError as e:
                log(WARNING, "secure aggregation: node %s advertised unusable keys (%s); dropped", node, e)
                continue
            if c in seen or s in seen or c == s:
                log(WARNING, "secure aggregation: node %s reuses a public key; dropped", node)
                continue
            seen |= {c, s}
            self.keys[node] = (c, s)
        self._need(len(self.keys), "advertise")
        return dict(self.keys)

    def route(self, shares: dict[int, dict[int, bytes]]) -> dict[int, dict[int, bytes]]:
        """U2: devices that sent one ciphertext to every participant. Returns each U2 device's inbox: the
        ciphertexts addressed to it by U2 devices."""
        for node, out in shares.items():
            if node in self.keys and set(out) == set(self.keys) and \
                    all(isinstance(c, bytes) and 0 < len(c) <= MAX_SHARE_BYTES for c in out.values()):
                self.shared.add(node)
            else:
                log(WARNING, "secure aggregation: node %s sent malformed shares; dropped", node)
        self._need(len(self.shared), "share")
        return {dst: {src: shares[src][dst] for src in sorted(self.shared)} for dst in sorted(self.shared)}

    def collect(self, masked: dict[int, np.ndarray]) -> tuple[list[int], list[int]]:
        """U3: devices of U2 that sent a masked vector of the right form; the rest of U2 have dropped."""
        for node, y in masked.items():
            if node in self.shared and isinstance(y, np.ndarray) and y.dtype == np.uint32 and \
                    y.shape == (self.length,):
                self.masked[node] = y
            else:
                log(WARNING, "secure aggregation: node %s sent a malformed masked vector; dropped", node)
        self.survivors = sorted(self.masked)
        self.dropped = sorted(self.shared - set(self.masked))
        self._need(len(self.survivors), "mask")
        return self.survivors, self.dropped

    @phase("coordinator: secure aggregation unmasking")
    def unmask(self, revealed: dict[int, dict[int, bytes]]) -> np.ndarray:
        """The sum of the survivors' vectors (mod 2**32), from their masked vectors, their reconstructed
        self-mask seeds and the pairwise masks of the dropped devices (from their reconstructed mask keys)."""
        answers = {n: r for n, r in revealed.items()
                   if n in self.masked and set(r) == set(self.shared) and all(isinstance(v, bytes) for v in r.values())}
        for node in set(revealed) - set(answers):
            log(WARNING, "secure aggregation: node %s sent malformed unmask shares; ignored", node)
        self._need(len(answers), "unmask")
        total = np.zeros(self.length, np.uint32)
        for y in self.masked.values():
            total += y
        try:
            for node in self.survivors:
                seed = combine_shares([r[node] for r in answers.values()])
                if len(seed) != SEED_BYTES:
                    raise ValueError("wrong seed length")
                total -= prg(seed, self.length)
            for gone in self.dropped:
                key = load_private(combine_shares([r[gone] for r in answers.values()]))
                for node in self.survivors:
                    # What `node` added for the pair (node, gone): take it back out.
                    total -= pair_mask(node, gone, pair_seed(key, load_public(self.keys[node][1])), self.length)
        except (ValueError, IndexError) as e:  # ProtocolError is a ValueError; bad shares fail to unpad or parse
            raise Aborted(f"unmask: the shares do not reconstruct ({type(e).__name__}: {e})") from None
        return total


def _keys(record) -> tuple[bytes, bytes] | None:
    if not isinstance(record, ConfigRecord):
        return None
    c, s = record.get("c"), record.get("s")
    if isinstance(c, bytes) and isinstance(s, bytes) and len(c) <= MAX_KEY_BYTES and len(s) <= MAX_KEY_BYTES:
        return c, s
    return None


def read_advert(msg: Message) -> tuple[bytes, bytes] | None:
    """The two public keys of a train.secagg reply, or None if it has none of the right form."""
    return _keys(msg.content["secagg"]) if "secagg" in msg.content else None


def _by_node(record) -> dict[int, bytes] | None:
    """A ConfigRecord {node id as a decimal string: bytes}, or None if it is anything else."""
    if not isinstance(record, ConfigRecord):
        return None
    out = {}
    for key, value in record.items():
        if not (isinstance(key, str) and key.isdigit() and len(key) <= 20 and isinstance(value, bytes)):
            return None
        out[int(key)] = value
    return out


def _send(grid, kind: str, contents: dict[int, RecordDict], timeout: float) -> dict[int, RecordDict]:
    """Send one message per node; the content of each usable reply, by the node it came from. Replies from
    nodes that were not asked, second replies and failures are left out (those devices count as dropped)."""
    messages = [Message(content=c, message_type=kind, dst_node_id=n) for n, c in contents.items()]
    out: dict[int, RecordDict] = {}
    with phase("coordinator: waiting for devices (secure aggregation)"):  # not the coordinator's own work
        replies = list(grid.send_and_receive(messages, timeout=timeout))
    for reply in replies:
        node = reply.metadata.src_node_id
        if reply.has_error():
            log(WARNING, "secure aggregation %s: node %s failed: %s", kind, node, reply.error.reason)
        elif node not in contents or node in out:
            log(WARNING, "secure aggregation %s: unexpected reply from node %s; ignored", kind, node)
        else:
            out[node] = reply.content
    return out


def run_round(grid, adverts: dict[int, tuple[bytes, bytes]], threshold: int, length: int, round_id: int,
              timeout: float) -> tuple[np.ndarray, list[int]]:
    """Stages 2-4 over `grid` after the train replies' `adverts`: (the survivors' summed vector, survivors)."""
    state = SecureSum(threshold, length)
    keys = state.advertise(adverts)
    listing = ConfigRecord({**{f"c/{n}": c for n, (c, _) in keys.items()},
                            **{f"s/{n}": s for n, (_, s) in keys.items()}})
    common = {"config": ConfigRecord({"round": round_id})}
    replies = _send(grid, SHARE, {n: RecordDict({**common, "keys": listing}) for n in keys}, timeout)
    shares = {n: out for n, c in replies.items()
              if "shares" in c and (out := _by_node(c["shares"])) is not None}
    inboxes = state.route(shares)
    replies = _send(grid, MASK, {n: RecordDict({**common, "inbox": ConfigRecord({str(s): c for s, c in inbox.items()})})
                                 for n, inbox in inboxes.items()}, timeout)
    masked = {}
    for n, c in replies.items():
        record = c["masked"] if "masked" in c else None
        if isinstance(record, ArrayRecord) and list(record) == ["y"] and record["y"].dtype == "uint32" and \
                tuple(record["y"].shape) == (length,):
            try:
                masked[n] = record["y"].numpy()
            except Exception:  # noqa: BLE001 -- undecodable bytes: a dropout like any other malformed reply
                continue
    survivors, dropped = state.collect(masked)
    names = ConfigRecord({"survivors": [str(n) for n in survivors], "dropped": [str(n) for n in dropped]})
    replies = _send(grid, UNMASK, {n: RecordDict({**common, "nodes": names}) for n in survivors}, timeout)
    revealed = {n: out for n, c in replies.items()
                if "revealed" in c and (out := _by_node(c["revealed"])) is not None}
    return state.unmask(revealed), survivors

