"""Secure aggregation through PersonaStrategy, message by message: the strategy's messages go to the devices'
real protocol handlers (`client.secure_aggregation`), each with its own Flower Context, and every reply the
coordinator receives is recorded. Only training is left out (each device's delta is given)."""

import logging

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from client import secure_aggregation as device
from common import kslot
from common.config import FederationConfig, SecureAggregation
from common.secure_aggregation import Participant
from server.secure_aggregation import Aborted, SecureSum
from server.strategy import SECURE_TRAIN, PersonaStrategy, bound_sums, join_personas, split_personas

SHAPES = {"a.lora_A.weight": (2, 5), "a.lora_B.weight": (5, 2)}
SECURE = SecureAggregation(threshold=0.6, coord_range=0.5, clip=1.0)
HANDLERS = {"query.secagg_share": device.share, "query.secagg_mask": device.mask,
            "query.secagg_unmask": device.unmask}


@pytest.fixture(autouse=True)
def task_identity(monkeypatch):
    """Messages are stamped with the running task's identity, which Flower sets in a real run."""
    for attr, value in (("_task_id", 1), ("_run_id", 1), ("_node_id", 0)):
        monkeypatch.setattr(TaskIdentity, attr, value)


class Grid:
    """Delivers each message to its device's handler. `drop` = {message type: nodes that never answer it}
    (a device that went offline); `received` holds every reply's content the coordinator gets."""

    def __init__(self, nodes, drop=None):
        self.nodes = list(nodes)
        self.contexts = {n: Context(run_id=1, node_id=n, node_config={}, state=RecordDict(), run_config={})
                         for n in self.nodes}
        self.drop = drop or {}
        self.received: list[RecordDict] = []

    def get_node_ids(self):
        return self.nodes

    def send_and_receive(self, messages, timeout=None):
        replies = []
        for m in messages:
            node = m.metadata.dst_node_id
            if node in self.drop.get(m.metadata.message_type, ()):
                continue
            reply = HANDLERS[m.metadata.message_type](m, self.contexts[node])
            self.received.append(reply.content)
            replies.append(reply)
        return replies


def _delta(rng, scale=0.05):
    return {k: rng.normal(0, scale, s).astype(np.float32) for k, s in SHAPES.items()}


def _secure_round(node_persona, deltas, grid, k=3, dp=None, secure=SECURE):
    """One secure round: (new adapters or None, metrics, releases made, train messages sent)."""
    released = []
    strategy = PersonaStrategy(node_persona, fraction_train=1.0, secure=secure, dp=dp, sample_rate=1.0 if dp else None,
                               on_release=lambda r, p, a, n, m, privacy: released.append((p, n)))
    start = {p: {n: np.zeros(s, np.float32) for n, s in SHAPES.items()} for p in range(k)}
    messages = list(strategy.configure_train(1, join_personas(start), ConfigRecord(), grid))
    replies = []
    for m in messages:
        node = m.metadata.dst_node_id
        if node in grid.drop.get(SECURE_TRAIN, ()):
            continue
        reply = device.start(m, grid.contexts[node], deltas[node])
        grid.received.append(reply.content)
        replies.append(reply)
    new, metrics = strategy.aggregate_train(1, replies)
    return (split_personas(new) if new is not None else None), metrics, released, messages


def _plain_sums(node_persona, deltas, nodes, k=3):
    return {p: {n: sum((deltas[u][n].astype(np.float64) for u in nodes if node_persona[u] == p),
                       np.zeros(SHAPES[n])) for n in SHAPES} for p in range(k)}


def _tolerance(n):
    """Rounding: each of n devices' coordinates is off by less than one step (levels for an n-device cohort)."""
    return n * kslot.step(SECURE.coord_range, kslot.levels_for(n))


def test_coordinator_sees_no_single_delta_or_persona_but_unmasks_the_persona_sums():
    rng = np.random.default_rng(0)
    node_persona = {101: 0, 102: 0, 103: 1, 104: 2, 105: 2, 106: 2}
    deltas = {n: _delta(rng) for n in node_persona}
    grid = Grid(node_persona)
    new, metrics, released, messages = _secure_round(node_persona, deltas, grid)

    # The unmasked result is the plain per-persona mean (all start from zero adapters), within rounding.
    plain = _plain_sums(node_persona, deltas, node_persona)
    for p, size in ((0, 2), (1, 1), (2, 3)):
        for name in SHAPES:
            np.testing.assert_allclose(new[p][name], plain[p][name] / size, atol=_tolerance(6))
    assert sorted(released) == [(0, 2), (1, 1), (2, 3)] and metrics["p2_devices"] == 3

    # Every message the coordinator received: no persona id or count anywhere, and no array that reveals a delta.
    assert all(m.metadata.message_type == SECURE_TRAIN for m in messages)
    assert all("persona" not in c["metrics"] for c in grid.received if "metrics" in c)
    arrays = [rec[key].numpy() for c in grid.received for rec in c.array_records.values() for key in rec]
    masked = [a for a in arrays if a.dtype == np.uint32]
    assert len(arrays) == len(masked) == 6  # the masked vectors are the only arrays
    levels = kslot.levels_for(6)
    for y in masked:
        counts = y[-3:]
        assert not set(counts.tolist()) <= {0, 1}  # the count slots are not a one-hot persona
        # Decoded on its own, a masked vector is uniform noise: its own slot is no delta of anyone's, and the
        # empty slots are not the quantised zero.
        for p in range(3):
            slot = y[p * 20:(p + 1) * 20].astype(np.int64)
            assert np.mean(np.abs(slot - levels // 2) < 0.05 * levels) < 0.5
        for d in deltas.values():
            own = np.concatenate([d[n].ravel() for n in sorted(SHAPES)])
            for p in range(3):
                decoded = y[p * 20:(p + 1) * 20] * kslot.step(SECURE.coord_range, levels) - SECURE.coord_range
                assert np.abs(decoded - own).max() > 0.1
    # No raw bytes of any delta appear in anything the coordinator received.
    blobs = b"".join(v for c in grid.received for rec in c.config_records.values() for v in rec.values()
                     if isinstance(v, bytes)) + b"".join(a.tobytes() for a in arrays)
    for d in deltas.values():
        for v in d.values():
            assert v.tobytes()[:16] not in blobs
    # Any proper subset of the masked vectors sums to noise, not to a decodable aggregate.
    partial = np.sum(masked[:-1], axis=0, dtype=np.uint32)
    with pytest.raises(ValueError):
        kslot.decode(partial, 5, SHAPES, 3, SECURE.coord_range, levels)


def test_round_survives_30_percent_dropping_after_sharing_keys():
    rng = np.random.default_rng(1)
    node_persona = {n: n % 3 for n in range(1, 11)}
    deltas = {n: _delta(rng) for n in node_persona}
    gone = {2, 5, 9}  # shared their keys, then never sent a masked vector
    grid = Grid(node_persona, drop={"query.secagg_mask": gone, "query.secagg_unmask": gone})
    new, metrics, released, _ = _secure_round(node_persona, deltas, grid)
    survivors = [n for n in node_persona if n not in gone]
    plain = _plain_sums(node_persona, deltas, survivors)
    for p in range(3):
        size = sum(node_persona[n] == p for n in survivors)
        for name in SHAPES:
            np.testing.assert_allclose(new[p][name], plain[p][name] / size, atol=_tolerance(10))
    assert metrics["secagg_dropped"] == 3


def test_round_beyond_the_threshold_aborts_and_releases_nothing(caplog):
    rng = np.random.default_rng(2)
    node_persona = {n: n % 2 for n in range(1, 11)}
    deltas = {n: _delta(rng) for n in node_persona}
    gone = {1, 2, 3, 4, 5}  # half the cohort: the threshold is 6 of 10
    grid = Grid(node_persona, drop={"query.secagg_mask": gone, "query.secagg_unmask": gone})
    with caplog.at_level(logging.WARNING):
        new, metrics, released, _ = _secure_round(node_persona, deltas, grid, k=2)
    assert new is None and released == [] and metrics["secagg_aborted"] == 1
    assert "secure aggregation aborted" in caplog.text
    # The survivors were never asked to reveal anything, and they hold no plain vector any more (masked ones
    # keep only keys in memory, replaced when the next round begins).
    assert not any("revealed" in c for c in grid.received)
    assert not any(device.VECTOR in ctx.state for n, ctx in grid.contexts.items() if n not in gone)


def test_devices_dropping_after_unmask_request_beyond_threshold_abort():
    rng = np.random.default_rng(3)
    node_persona = {n: 0 for n in range(1, 6)}
    grid = Grid(node_persona, drop={"query.secagg_unmask": {1, 2, 3}})
    new, metrics, released, _ = _secure_round(node_persona, {n: _delta(rng) for n in node_persona}, grid, k=1)
    assert new is None and released == [] and metrics["secagg_aborted"] == 1


def test_secure_round_under_user_dp_releases_every_persona_with_noise():
    rng = np.random.default_rng(4)
    from common.config import UserDP
    node_persona = {n: n % 2 for n in range(1, 7)}
    deltas = {n: _delta(rng, scale=1.0) for n in node_persona}  # norms ~3: clipped to 1 on the device
    secure = SecureAggregation(0.6, 0.5, clip=1.0)
    new, metrics, released, _ = _secure_round(node_persona, deltas, Grid(node_persona), k=2,
                                              dp=UserDP(noise_multiplier=1e-9, clip=1.0, delta=1e-5), secure=secure)
    assert sorted(p for p, _ in released) == [0, 1] and metrics["p0_epsilon"] > 0
    for p in (0, 1):
        # Each device's clipped delta has norm <= 1: the persona's mean (over its 3 expected devices) is <= 1.
        assert np.sqrt(sum(np.sum(v.astype(np.float64) ** 2) for v in new[p].values())) <= 1.0 + 1e-6


def test_robust_aggregation_is_refused_under_secure_aggregation():
    with pytest.raises(ValueError, match="secure aggregation hides"):
        PersonaStrategy({1: 0}, 1.0, aggregation="median", secure=SECURE)
    with pytest.raises(ValueError, match="secure aggregation hides"):
        FederationConfig(secure_aggregation=True, aggregation="trimmed-mean")
    assert FederationConfig().secure is None  # off by default


# --- A malicious device: what it can and cannot do to a persona's sum -------------------------------------------

def _protocol(vectors: dict[int, np.ndarray], threshold: int) -> np.ndarray:
    """The protocol among honest parties, coordinator included, over given vectors (which may be hostile)."""
    parties = {n: Participant(n, v, threshold) for n, v in vectors.items()}
    state = SecureSum(threshold, next(iter(vectors.values())).size)
    keys = state.advertise({n: p.advertise() for n, p in parties.items()})
    inbox = state.route({n: p.share(keys) for n, p in parties.items()})
    survivors, dropped = state.collect({n: p.mask(inbox[n]) for n, p in parties.items()})
    return state.unmask({n: parties[n].unmask(survivors, dropped) for n in survivors})


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(hostile=st.lists(st.integers(0, 2**32 - 1), min_size=2 * 10 + 2, max_size=2 * 10 + 2),
       persona=st.integers(0, 1))
def test_one_malicious_device_cannot_push_a_persona_sum_beyond_its_members_bound(hostile, persona):
    """Masking hides every vector, so a device can send any residue modulo 2**32. The coordinator decodes only
    sums whose counts are consistent, and bounds each persona's sum to count x clip (L2) and count x range per
    coordinate. So whatever one device sends, the released sum is within what the persona's counted devices
    could send honestly."""
    rng = np.random.default_rng(5)
    shapes = {"w": (10,)}
    n, levels, k = 5, kslot.levels_for(5), 2
    vectors = {i: kslot.encode({"w": rng.normal(0, 0.05, 10).astype(np.float32)}, i % 2, k, SECURE.clip,
                               SECURE.coord_range, levels) for i in range(1, n)}
    vectors[n] = np.array(hostile, np.uint32)
    total = _protocol(vectors, 3)
    try:
        sums, counts = kslot.decode(total, n, shapes, k, SECURE.coord_range, levels)
    except ValueError:
        return  # inconsistent counts: the round is aborted, nothing released
    bounded, _ = bound_sums(sums, counts, SECURE.clip, SECURE.coord_range, kslot.step(SECURE.coord_range, levels))
    c = int(counts[persona])
    assert np.abs(bounded[persona]["w"]).max() <= c * SECURE.coord_range + 1e-9
    assert np.linalg.norm(bounded[persona]["w"]) <= c * SECURE.clip + 1e-9


def test_a_malicious_device_can_move_a_coordinate_by_more_than_its_own_range():
    """The limit of the bound above, pinned so the documentation cannot overstate it: without range proofs a
    device's influence is bounded by its persona's aggregate range, not by its own quantisation range."""
    n, levels, k, shapes = 4, kslot.levels_for(4), 1, {"w": (3,)}
    honest = {i: kslot.encode({"w": np.zeros(3, np.float32)}, 0, k, SECURE.clip, SECURE.coord_range, levels)
              for i in range(1, n)}
    hostile = kslot.encode({"w": np.zeros(3, np.float32)}, 0, k, SECURE.clip, SECURE.coord_range, levels)
    hostile[0] += np.uint32(levels * 2)  # two more devices' worth of range in one coordinate
    sums, counts = kslot.decode(_protocol({**honest, n: hostile}, 3), n, shapes, k, SECURE.coord_range, levels)
    assert counts.tolist() == [4]
    assert sums[0]["w"][0] > 2 * SECURE.coord_range * 1.99  # > one device's whole range [-range, range]
    bounded, which = bound_sums(sums, counts, SECURE.clip, SECURE.coord_range, 0.0)
    assert which == [] and bounded[0]["w"][0] == sums[0]["w"][0]  # and within the persona's bound: not caught


# --- Hostile protocol replies: rejected as dropouts, never a crash ------------------------------------------------

@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(junk=st.one_of(st.binary(max_size=64), st.integers(), st.text(max_size=8),
                      st.lists(st.binary(max_size=8), max_size=3)),
       stage=st.sampled_from(["shares", "masked", "revealed", "secagg"]))
def test_malformed_replies_count_as_dropouts_not_crashes(junk, stage):
    rng = np.random.default_rng(6)
    node_persona = {n: n % 2 for n in range(1, 6)}
    deltas = {n: _delta(rng) for n in node_persona}
    grid = Grid(node_persona)
    liar = 3
    original = dict(HANDLERS)

    def corrupt(handler):
        def wrapped(message, context):
            reply = handler(message, context)
            if message.metadata.dst_node_id == liar and stage in reply.content:
                reply.content[stage] = ConfigRecord({"x": junk, "1": junk})
            return reply
        return wrapped

    for kind in HANDLERS:
        HANDLERS[kind] = corrupt(original[kind])
    start = device.start

    def start_corrupt(message, context, delta):
        reply = start(message, context, delta)
        if message.metadata.dst_node_id == liar and stage == "secagg":
            reply.content["secagg"] = ConfigRecord({"c": junk, "s": junk})
        return reply
    try:
        device.start = start_corrupt
        new, metrics, released, _ = _secure_round(node_persona, deltas, grid, k=2)
    finally:
        HANDLERS.update(original)
        device.start = start
    # Four honest devices are above the threshold (3 of 5): the round completes without the liar when it
    # dropped before masking, and with it (its vector is honest) when only its unmask shares were junk.
    assert new is not None
    used = [n for n in node_persona if n != liar] if stage != "revealed" else list(node_persona)
    plain = _plain_sums(node_persona, deltas, used, k=2)
    for p in range(2):
        size = sum(node_persona[n] == p for n in used)
        np.testing.assert_allclose(new[p]["a.lora_A.weight"], plain[p]["a.lora_A.weight"] / size,
                                   atol=_tolerance(5))


def test_coordinator_replies_from_unasked_nodes_are_ignored():
    state = SecureSum(2, 4)
    with pytest.raises(Aborted):
        state.advertise({1: (b"junk", b"junk"), 2: (b"", b"")})


# --- Evaluation through the same sums ------------------------------------------------------------------------------

def _evaluation(node_persona, values, grid, secure):
    strategy = PersonaStrategy(node_persona, fraction_train=1.0, eval_nodes=list(node_persona), eval_min_devices=2,
                               secure=secure)
    start = {p: {n: np.zeros(s, np.float32) for n, s in SHAPES.items()} for p in sorted(set(node_persona.values()))}
    messages = list(strategy.configure_evaluate(1, join_personas(start), ConfigRecord(), grid))
    replies = []
    for m in messages:
        node = m.metadata.dst_node_id
        if secure:
            reply = device.start_evaluation(m, grid.contexts[node], values[node])
            grid.received.append(reply.content)
        else:
            reply = Message(content=RecordDict({"metrics": MetricRecord(values[node])}), reply_to=m)
        replies.append(reply)
    return strategy.aggregate_evaluate(1, replies)


def test_evaluation_error_sums_reach_the_coordinator_only_pooled():
    rng = np.random.default_rng(7)
    node_persona = {n: n % 2 for n in range(1, 8)}
    values = {}
    for n in node_persona:
        held = int(rng.integers(5, 40))
        values[n] = {"num-examples": int(rng.integers(5, 300)), "cold": int(n == 3), "n": held,
                     "persona_sse": float(rng.uniform(0, 2) * held), "persona_sae": float(rng.uniform(0, 1) * held),
                     "personal_sse": float(rng.uniform(0, 2) * held), "personal_sae": float(rng.uniform(0, 1) * held),
                     "personal_distance": float(rng.uniform(0, 3))}
    plain = _evaluation(node_persona, values, Grid(node_persona), None)
    grid = Grid(node_persona, drop={"query.secagg_mask": {6}, "query.secagg_unmask": {6}})
    secure = _evaluation(node_persona, values, grid, SECURE)
    # Device 6 dropped after sharing keys: the secure pools are the other six devices' plain pools.
    survivors = {n: v for n, v in values.items() if n != 6}
    expected = _evaluation({n: node_persona[n] for n in survivors}, survivors, Grid(survivors), None)
    assert {k for k in secure if not k.startswith("secagg")} == set(expected) and set(plain) >= set(expected)
    for key, value in expected.items():
        assert secure[key] == pytest.approx(value, rel=1e-5, abs=1e-5), key
    assert secure["secagg_dropped"] == 1 and secure["users"] == 6
    # Nothing the coordinator received holds any device's numbers: only keys, ciphertexts, masked integers.
    for content in grid.received:
        assert all(len(rec) == 0 for rec in content.metric_records.values())
        for rec in content.array_records.values():
            assert all(a.dtype == "uint32" for a in rec.values())


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(junk=st.lists(st.binary(max_size=300), min_size=5, max_size=5), drop=st.booleans())
def test_junk_shares_abort_the_round_or_unmask_correctly_never_crash(junk, drop):
    """A device answering the unmask request with arbitrary bytes as shares: the coordinator either still
    reconstructs the right sum or aborts; no other exception escapes."""
    vectors = {n: np.full(6, n, np.uint32) for n in range(1, 6)}
    parties = {n: Participant(n, v, 3) for n, v in vectors.items()}
    state = SecureSum(3, 6)
    keys = state.advertise({n: p.advertise() for n, p in parties.items()})
    inbox = state.route({n: p.share(keys) for n, p in parties.items()})
    masking = [n for n in parties if not (drop and n == 5)]
    survivors, dropped = state.collect({n: parties[n].mask(inbox[n]) for n in masking})
    revealed = {n: parties[n].unmask(survivors, dropped) for n in survivors}
    revealed[1] = dict(zip(sorted(revealed[1]), junk))
    try:
        total = state.unmask(revealed)
    except Aborted:
        return
    np.testing.assert_array_equal(total, sum(vectors[n] for n in survivors).astype(np.uint32))
