"""Hostile replies against PersonaStrategy (issue #15, "Aggregation").

A device controls everything in its reply: record types, array dtypes, shapes and bytes, its example count, its
persona claim, its evaluation sums. Whatever it sends, the coordinator must not raise (an exception inside
`Strategy.start` kills the ServerApp and no history is written), must reject and count every unusable reply, and
must never release, store or promote a non-finite persona.
"""

import math

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from common.config import FederationConfig, UserDP
from server.strategy import PersonaStrategy, join_personas, split_personas, to_record

SHAPES = {"a.lora_A.weight": (2, 3), "a.lora_B.weight": (3, 2)}
NODES = {1: 0, 2: 0, 3: 0, 4: 1, 5: 1, 6: 1}  # node -> persona
STRANGER = 99  # a node the coordinator never asked


@pytest.fixture(autouse=True)
def task_identity(monkeypatch):
    """Messages are stamped with the running task's identity, which Flower sets in a real run."""
    for attr, value in (("_task_id", 1), ("_run_id", 1), ("_node_id", 0)):
        monkeypatch.setattr(TaskIdentity, attr, value)


def _persona(value: float) -> dict[str, np.ndarray]:
    return {k: np.full(shape, value, np.float32) for k, shape in SHAPES.items()}


class FakeGrid:
    """Answers every message with `respond(message)` (None: the device never replies) and records the timeout."""

    def __init__(self, nodes, respond=None):
        self.nodes, self.respond, self.timeouts = list(nodes), respond, []

    def get_node_ids(self):
        return self.nodes

    def send_and_receive(self, messages, timeout=None):
        self.timeouts.append(timeout)
        return [r for r in (self.respond(m) for m in messages) if r is not None]


def _strategy(**kw):
    released = []
    strategy = PersonaStrategy(NODES, fraction_train=1.0, min_train_nodes=1, eval_nodes=list(NODES), eval_every=1,
                               on_release=lambda r, p, a, n, m, privacy: released.append((p, a, n)), **kw)
    return strategy, released


def _train_requests(strategy, start=(0.0, 10.0)) -> dict[int, Message]:
    state = join_personas({p: _persona(v) for p, v in enumerate(start)})
    return {m.metadata.dst_node_id: m for m in strategy.configure_train(1, state, ConfigRecord(), FakeGrid(NODES))}


def _update(request: Message, delta: dict, **metrics) -> Message:
    metrics = {"num-examples": 10, "train_loss": 1.0, **metrics}
    return Message(content=RecordDict({"arrays": to_record(delta), "metrics": MetricRecord(metrics)}),
                   reply_to=request)


def _all_finite(arrays: dict) -> bool:
    return all(np.isfinite(v).all() for v in arrays.values())


# --- the reproduced defects, one test each (each fails on the code before the fix) ----------------------------

def test_an_infinite_example_count_is_rejected_and_no_nan_persona_is_released():
    strategy, released = _strategy()
    req = _train_requests(strategy)
    new, metrics = strategy.aggregate_train(1, [_update(req[1], _persona(1.0)),
                                                _update(req[2], _persona(5.0), **{"num-examples": math.inf})])
    assert metrics["rejected"] == 1 and metrics["p0_devices"] == 1
    np.testing.assert_allclose(split_personas(new)[0]["a.lora_A.weight"], 1.0)
    assert all(_all_finite(arrays) for _, arrays, _ in released)


def test_one_devices_example_count_is_capped():
    strategy, _ = _strategy(max_examples=100)
    req = _train_requests(strategy)
    replies = [_update(req[n], _persona(1.0), **{"num-examples": 100}) for n in (1, 2)]
    replies.append(_update(req[3], _persona(-1.0), **{"num-examples": 1e12}))
    new, metrics = strategy.aggregate_train(1, replies)
    # Capped at 100 it weighs as one honest device: (100 + 100 - 100) / 300, not ~-1 (its claimed 1e12); capped,
    # not rejected: a heavy user's large count is legitimate.
    np.testing.assert_allclose(split_personas(new)[0]["a.lora_A.weight"], 1 / 3, rtol=1e-6)
    assert metrics["rejected"] == 0 and metrics["p0_devices"] == 3
    assert FederationConfig().max_examples == 1000  # the default cap, above every ML-100K user's training count


@pytest.mark.parametrize("record", [MetricRecord({"x": 1.0}), ConfigRecord({"x": "y"})])
def test_a_wrong_record_type_under_arrays_is_rejected(record):
    strategy, _ = _strategy()
    req = _train_requests(strategy)
    bad = Message(content=RecordDict({"arrays": record, "metrics": MetricRecord({"num-examples": 3})}),
                  reply_to=req[2])
    new, metrics = strategy.aggregate_train(1, [_update(req[1], _persona(1.0)), bad])
    assert metrics["rejected"] == 1 and metrics["p0_devices"] == 1


@pytest.mark.parametrize("dtype", [np.float64, np.int64, np.bool_, np.complex64, np.float16, "<U3", ">f4"])
def test_only_the_adapters_float32_deltas_are_accepted(dtype):
    strategy, _ = _strategy()
    req = _train_requests(strategy)
    bad = {k: np.ones(shape).astype(dtype) for k, shape in SHAPES.items()}
    new, metrics = strategy.aggregate_train(1, [_update(req[1], _persona(1.0)), _update(req[2], bad)])
    assert metrics["rejected"] == 1 and metrics["p0_devices"] == 1
    np.testing.assert_allclose(split_personas(new)[0]["a.lora_A.weight"], 1.0)


def test_undecodable_or_mislabelled_array_bytes_are_rejected():
    strategy, _ = _strategy()
    req = _train_requests(strategy)
    garbage = ArrayRecord({k: Array(dtype="float32", shape=s, stype="numpy.ndarray", data=b"\x93NUMPY junk")
                           for k, s in SHAPES.items()})
    lying = ArrayRecord({k: Array(dtype="float32", shape=s, stype="numpy.ndarray",
                                  data=Array(np.ones(s, np.float64)).data) for k, s in SHAPES.items()})
    replies = [Message(content=RecordDict({"arrays": r, "metrics": MetricRecord({"num-examples": 3})}),
                       reply_to=req[n]) for n, r in ((2, garbage), (3, lying))]
    _, metrics = strategy.aggregate_train(1, [_update(req[1], _persona(1.0))] + replies)
    assert metrics["rejected"] == 2 and metrics["p0_devices"] == 1


@pytest.mark.parametrize("status", [ConfigRecord({"category": "budget"}), MetricRecord({"reason": 1.0}), None])
def test_a_skip_without_a_reason_is_counted_as_a_skip(status):
    strategy, _ = _strategy()
    req = _train_requests(strategy)
    content = RecordDict({"metrics": MetricRecord({"skipped": 1, "persona": 0})})
    if status is not None:
        content["status"] = status
    _, metrics = strategy.aggregate_train(1, [_update(req[1], _persona(1.0)), Message(content=content,
                                                                                       reply_to=req[2])])
    assert metrics["skipped"] == 1 and metrics["rejected"] == 0


def test_a_reply_claiming_another_persona_is_rejected_not_rerouted():
    strategy, released = _strategy()
    req = _train_requests(strategy)
    new, metrics = strategy.aggregate_train(1, [_update(req[1], _persona(1.0), persona=0),
                                                _update(req[2], _persona(7.0), persona=1)])
    assert metrics["rejected"] == 1 and metrics["p0_devices"] == 1
    np.testing.assert_allclose(split_personas(new)[0]["a.lora_A.weight"], 1.0)
    np.testing.assert_allclose(split_personas(new)[1]["a.lora_A.weight"], 10.0)
    assert [p for p, _, _ in released] == [0]


def test_a_second_reply_or_one_from_a_device_never_asked_is_rejected():
    strategy, _ = _strategy()
    req = _train_requests(strategy)
    stranger = Message(content=RecordDict(), message_type="train", dst_node_id=STRANGER)
    replies = [_update(req[1], _persona(1.0)), _update(req[1], _persona(50.0)), _update(stranger, _persona(9.0))]
    new, metrics = strategy.aggregate_train(1, replies)
    assert metrics["rejected"] == 2
    np.testing.assert_allclose(split_personas(new)[0]["a.lora_A.weight"], 1.0)


def test_huge_finite_updates_are_rejected_by_default_and_never_released_without_a_bound():
    strategy, released = _strategy()  # default bound
    req = _train_requests(strategy)
    huge = _persona(3e38)
    new, metrics = strategy.aggregate_train(1, [_update(req[1], huge), _update(req[2], huge)])
    assert metrics["rejected"] == 2 and new is None and released == []
    assert 0 < FederationConfig().max_update_norm < math.inf

    strategy, released = _strategy(max_update_norm=0.0)  # bound switched off: the release check still holds
    req = _train_requests(strategy, start=(3e38, 10.0))
    new, metrics = strategy.aggregate_train(1, [_update(req[1], huge), _update(req[2], huge),
                                                _update(req[4], _persona(1.0))])
    assert metrics["refused"] == 1 and [p for p, _, _ in released] == [1]  # 3e38 + 3e38 is Inf in float32
    assert _all_finite(split_personas(new)[0]) and split_personas(new)[0]["a.lora_A.weight"][0, 0] == np.float32(3e38)


def _evaluation(request: Message, **metrics) -> Message:
    base = {"persona_sse": 4.0, "persona_sae": 4.0, "personal_sse": 1.0, "personal_sae": 2.0, "n": 4,
            "cold": 0, "num-examples": 50, "personal_distance": 0.5}
    base.update(metrics)
    return Message(content=RecordDict({"metrics": MetricRecord({k: v for k, v in base.items() if v is not None})}),
                   reply_to=request)


def _eval_requests(strategy) -> dict[int, Message]:
    state = join_personas({0: _persona(0.0), 1: _persona(1.0)})
    return {m.metadata.dst_node_id: m for m in strategy.configure_evaluate(1, state, ConfigRecord(), FakeGrid(NODES))}


@pytest.mark.parametrize("bad", [{"persona_sse": None}, {"personal_sae": -1.0}, {"persona_sse": math.nan},
                                 {"n": math.inf}, {"persona_sse": 1e300}, {"num-examples": [1, 2]},
                                 {"personal_distance": -2.0}])
def test_bad_evaluation_sums_are_rejected_and_counted(bad):
    strategy, _ = _strategy()
    req = _eval_requests(strategy)
    replies = [_evaluation(req[n]) for n in (1, 2, 3, 4, 5)] + [_evaluation(req[6], **bad)]
    out = strategy.aggregate_evaluate(1, replies)
    assert out["rejected"] == 1
    assert all(math.isfinite(v) for v in out.values())
    if "persona_rmse" in out:  # withheld if fewer devices than a release threshold
        assert out["persona_rmse"] == pytest.approx(1.0) and out["users"] == 5


def test_round_timeout_is_a_setting_passed_to_every_round(monkeypatch, tmp_path):
    """`round-timeout` reaches persona discovery's queries and `Strategy.start` (Flower's default is 3600 s)."""
    import server.server_app as server_app

    cfg = FederationConfig.from_run_config({"round-timeout": 42, "base-model": "tiny", "num-personas": 1,
                                            "out-dir": str(tmp_path)})
    assert cfg.round_timeout == 42.0 and FederationConfig().round_timeout < 3600
    seen = {}

    def discover(grid, nodes, cfg, noise=0.0, timeout=3600):
        seen["discovery"] = timeout
        return {1: 0}, [], {"k": 1, "sizes": [1], "cold_start_devices": 0}

    class Stop(Exception):
        pass

    def start(self, grid, arrays, num_rounds=3, timeout=3600, **kw):
        seen["rounds"] = timeout
        raise Stop

    monkeypatch.setattr(server_app, "discover_personas", discover)
    monkeypatch.setattr(PersonaStrategy, "start", start)
    with pytest.raises(Stop):
        server_app.run(FakeGrid([1]), cfg)
    assert seen == {"discovery": 42.0, "rounds": 42.0}


def test_a_hostile_federation_runs_to_the_end_with_the_timeout(monkeypatch):
    """The whole `Strategy.start` loop, every device hostile in another way: the run completes, nothing raises."""
    strategy, released = _strategy(num_rounds=2)
    hostile = [
        lambda m: Message(content=RecordDict({"arrays": MetricRecord({"x": 1.0}), "metrics": MetricRecord()}),
                          reply_to=m),
        lambda m: Message(content=RecordDict({"metrics": MetricRecord({"skipped": 1}),
                                              "status": ConfigRecord({"code": "x"})}), reply_to=m),
        lambda m: Message(content=RecordDict({"metrics": MetricRecord({"persona_sse": -1.0})}), reply_to=m),
        lambda m: Message(error=Error(code=1, reason="gone"), reply_to=m),
        lambda m: None,  # never replies
        lambda m: _update(m, _persona(1.0), **{"num-examples": math.inf}),
    ]
    grid = FakeGrid(NODES, lambda m: hostile[m.metadata.dst_node_id - 1](m))
    result = strategy.start(grid, join_personas({0: _persona(0.0), 1: _persona(1.0)}), num_rounds=2, timeout=7)
    assert grid.timeouts == [7] * 4 and released == []
    assert result.train_metrics_clientapp[2]["rejected"] == 3 and result.evaluate_metrics_clientapp[2]["failed"] == 1


# --- property-based attack suite ------------------------------------------------------------------------------

FLOAT32 = dict(width=32, allow_nan=False, allow_infinity=False)
BAD_VALUES = st.sampled_from([np.nan, np.inf, -np.inf, 3e38, -3e38, 1e30])
WEIGHTS_OK = st.one_of(st.integers(1, 10**15), st.floats(1e-6, 1e300))
WEIGHTS_BAD = st.one_of(st.integers(-10**30, 0), st.integers(10**309, 10**400), st.floats(max_value=0.0),
                        st.sampled_from([math.nan, math.inf, -math.inf]), st.lists(st.integers(1, 5), max_size=3),
                        st.lists(st.floats(1, 5), max_size=3), st.none())
BAD_DTYPES = st.sampled_from([np.float64, np.float16, np.int64, np.int32, np.int8, np.bool_, np.complex64,
                              np.complex128, "<U3", "S2", ">f4", np.uint8])


def _good_delta(draw) -> dict:
    return {k: draw(hnp.arrays(np.float32, s, elements=st.floats(-5, 5, **FLOAT32))) for k, s in SHAPES.items()}


def _persona_claim(draw, persona: int, good: bool):
    if good:
        return draw(st.sampled_from([persona, float(persona), None]))
    return draw(st.one_of(st.sampled_from([1 - persona, -1, 7, math.nan, math.inf, float(persona) + 0.5]),
                          st.lists(st.just(persona), min_size=1, max_size=2)))


@st.composite
def train_reply(draw, request: Message, persona: int, dp: bool = False):
    """(label, reply): label is what the coordinator must do with it. Under user-level DP deltas are clipped, not
    bounded, and weights are not used, so a huge finite value or a missing/odd example count is no defect there."""
    kind = draw(st.sampled_from(["good", "good", "good", "skipped", "failed", "values", "weight", "claim", "dtype",
                                 "shape", "keys", "arrays-type", "metrics-type", "bytes", "metric-value"]))
    if kind == "failed":
        return "failed", Message(error=Error(code=draw(st.integers(0, 10)), reason=draw(st.text(max_size=5))),
                                 reply_to=request)
    metrics = {"num-examples": draw(WEIGHTS_OK)}
    claim = _persona_claim(draw, persona, good=kind != "claim")
    if claim is not None:
        metrics["persona"] = claim
    if draw(st.booleans()):
        metrics["train_loss"] = draw(st.floats(0, 1e6))
    if kind == "skipped":
        content = RecordDict({"metrics": MetricRecord({"skipped": 1, **({"persona": claim} if claim is not None
                                                                          else {})})})
        status = draw(st.sampled_from(["none", "reason", "category", "metric"]))
        if status != "none":
            content["status"] = (MetricRecord({"reason": 1.0}) if status == "metric" else
                                 ConfigRecord({status: draw(st.text(max_size=300))}))
        return "skipped", Message(content=content, reply_to=request)
    delta = _good_delta(draw)
    arrays: object = to_record(delta)
    if kind == "values":
        key = draw(st.sampled_from(sorted(SHAPES)))
        flat = delta[key].ravel()
        flat[draw(st.integers(0, flat.size - 1))] = value = draw(BAD_VALUES)
        arrays = to_record(delta)
        if dp and np.isfinite(np.float32(value)):
            kind = "good"
    elif kind == "weight":
        kind = "good" if dp else kind
        weight = draw(WEIGHTS_BAD)
        if weight is None:
            del metrics["num-examples"]
        else:
            metrics["num-examples"] = weight
    elif kind == "dtype":
        key = draw(st.sampled_from(sorted(SHAPES)))
        arrays = to_record({**delta, key: np.ones(SHAPES[key]).astype(draw(BAD_DTYPES))})
    elif kind == "shape":
        key = draw(st.sampled_from(sorted(SHAPES)))
        shape = draw(hnp.array_shapes(min_dims=0, max_dims=3, max_side=4).filter(lambda s: s != SHAPES[key]))
        arrays = to_record({**delta, key: np.zeros(shape, np.float32)})
    elif kind == "keys":
        arrays = to_record(draw(st.sampled_from([{k: delta[k] for k in list(delta)[:1]},
                                                 {**delta, "extra": np.zeros(2, np.float32)}, {}])))
    elif kind == "arrays-type":
        arrays = draw(st.sampled_from([MetricRecord({"a.lora_A.weight": 1.0}), ConfigRecord({"x": "y"}), None]))
    elif kind == "bytes":
        key = draw(st.sampled_from(sorted(SHAPES)))
        data = draw(st.one_of(st.binary(max_size=200), st.just(Array(np.ones(SHAPES[key], np.float64)).data),
                              st.just(Array(np.ones((4, 4), np.float32)).data)))
        record = to_record(delta)
        record[key] = Array(dtype="float32", shape=SHAPES[key], stype=draw(st.sampled_from(["numpy.ndarray", "x"])),
                            data=data)
        arrays = record
    elif kind == "metric-value":
        metrics[draw(st.sampled_from(["train_loss", "tokens_per_s", "gflops_per_s"]))] = draw(
            st.one_of(st.sampled_from([math.nan, math.inf, -math.inf]), st.lists(st.floats(0, 1), max_size=2)))
    content = RecordDict({"metrics": MetricRecord(metrics)})
    if kind == "metrics-type":
        content = RecordDict({"metrics": draw(st.sampled_from([ConfigRecord({"num-examples": "10"}),
                                                               to_record(delta)]))})
    if arrays is not None:
        content["arrays"] = arrays
    return ("good" if kind == "good" else "bad"), Message(content=content, reply_to=request)


@st.composite
def train_round(draw):
    """Replies in any order: some devices silent, some hostile, duplicates, and one from a stranger."""
    dp = draw(st.sampled_from([None, None, None, UserDP(noise_multiplier=0.5, clip=1.0, delta=1e-5)]))
    strategy, released = _strategy(dp=dp, aggregation="mean" if dp else draw(st.sampled_from(
        ["mean", "mean", "trimmed-mean", "median"])))
    requests = _train_requests(strategy)
    labelled = []
    for node, request in requests.items():
        if draw(st.integers(0, 5)) == 0:
            continue  # never replied
        labelled.append((node, *draw(train_reply(request, NODES[node], dp=dp is not None))))
    for node, label, reply in list(labelled):
        if label != "failed" and draw(st.integers(0, 7)) == 0:
            labelled.append((node, label, reply))  # the same reply twice: whichever comes second is rejected
    if draw(st.booleans()):
        stranger = Message(content=RecordDict(), message_type="train", dst_node_id=STRANGER)
        labelled.append((STRANGER, "bad", _update(stranger, _persona(1.0))))
    order = draw(st.permutations(range(len(labelled))))
    return strategy, released, [labelled[i] for i in order]


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow])
@given(round_=train_round())
def test_no_train_reply_can_raise_escape_the_count_or_make_a_release_non_finite(round_):
    strategy, released, labelled = round_
    before = {p: {k: v.copy() for k, v in arrs.items()} for p, arrs in strategy._current.items()}
    # Duplicates are rejected only after their first copy; order decides which copy is "the second".
    seen, expected = set(), {"good": {0: 0, 1: 0}, "bad": 0, "skipped": 0, "failed": 0}
    for node, label, _ in labelled:
        if label == "failed":
            expected["failed"] += 1
            continue
        if node in seen or node == STRANGER:
            label = "bad"
        seen.add(node)
        if label == "good":
            expected["good"][NODES[node]] += 1
        else:
            expected[label] += 1
    new, metrics = strategy.aggregate_train(1, [reply for _, _, reply in labelled])
    if metrics is None:
        assert not labelled
        return
    assert (metrics["rejected"], metrics["skipped"], metrics["failed"]) == (
        expected["bad"], expected["skipped"], expected["failed"])
    for persona, count in expected["good"].items():
        assert metrics.get(f"p{persona}_devices", 0) == count
    assert metrics["refused"] == 0  # every accepted delta is bounded, so every aggregate is finite
    assert all(_all_finite(arrays) for _, arrays, _ in released)
    assert all(isinstance(v, (int, float)) and math.isfinite(v) for v in metrics.values())
    state = split_personas(new) if new is not None else before
    for persona, arrays in state.items():
        assert _all_finite(arrays) and {k: v.dtype for k, v in arrays.items()} == {k: np.float32 for k in SHAPES}
        if not expected["good"][persona] and not strategy.dp:  # no usable update: it keeps its adapter
            for k in SHAPES:
                np.testing.assert_array_equal(arrays[k], before[persona][k])


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(values=st.lists(st.floats(width=32, allow_nan=False, allow_infinity=False), min_size=2, max_size=6),
       aggregation=st.sampled_from(["mean", "trimmed-mean", "median"]))
def test_without_a_norm_bound_a_non_finite_aggregate_is_refused_not_released(values, aggregation):
    """Finite float32 updates near float32's limit: whatever the aggregate, only finite personas are released."""
    strategy, released = _strategy(max_update_norm=0.0, aggregation=aggregation)
    req = _train_requests(strategy, start=(3e38, -3e38))
    replies = [_update(req[n], _persona(v)) for n, v in zip((1, 2, 3, 4, 5, 6), values)]
    new, metrics = strategy.aggregate_train(1, replies)
    assert metrics["rejected"] == 0
    assert all(_all_finite(arrays) for _, arrays, _ in released)
    assert len(released) + metrics["refused"] == len({NODES[n] for n in (1, 2, 3, 4, 5, 6)[:len(values)]})
    if new is not None:
        assert all(_all_finite(arrays) for arrays in split_personas(new).values())


@st.composite
def eval_reply(draw, request: Message):
    kind = draw(st.sampled_from(["good", "good", "good", "failed", "missing", "negative", "nonfinite", "type",
                                 "impossible", "record", "distance", "cold"]))
    if kind == "failed":
        return "failed", Message(error=Error(code=1, reason="x"), reply_to=request)
    errors = draw(st.lists(st.floats(0, 4), max_size=30))
    personal = draw(st.lists(st.floats(0, 4), min_size=len(errors), max_size=len(errors)))
    m = {"persona_sse": float(sum(e * e for e in errors)), "persona_sae": float(sum(errors)),
         "personal_sse": float(sum(e * e for e in personal)), "personal_sae": float(sum(personal)),
         "n": len(errors), "cold": draw(st.sampled_from([0, 1])), "num-examples": draw(st.integers(0, 10**6)),
         "personal_distance": draw(st.floats(0, 100))}
    key = draw(st.sampled_from(["persona_sse", "persona_sae", "personal_sse", "personal_sae", "n", "num-examples"]))
    if kind == "missing":
        del m[key]
    elif kind == "negative":
        m[key] = draw(st.floats(max_value=-1e-3))
    elif kind == "nonfinite":
        m[key] = draw(st.sampled_from([math.nan, math.inf, -math.inf, 10**400]))
    elif kind == "type":
        m[key] = draw(st.lists(st.floats(0, 1), max_size=2))
    elif kind == "impossible":  # more error than a 1-5 rating allows
        m[draw(st.sampled_from(["persona_sse", "personal_sae"]))] = 17.0 * (m["n"] + 1)
    elif kind == "distance":
        m["personal_distance"] = draw(st.sampled_from([-1.0, math.nan, 1e300, math.inf]))
    elif kind == "cold":
        m["cold"] = draw(st.sampled_from([-1, 2, math.nan, [1]]))
    metrics = MetricRecord(m) if kind != "record" else draw(st.sampled_from([ConfigRecord({"n": "4"}),
                                                                            to_record(_persona(1.0))]))
    return ("good" if kind == "good" else "bad"), Message(content=RecordDict({"metrics": metrics}),
                                                          reply_to=request)


class FakeRollouts:
    """Serves version 100 + persona and records what would reach the registry."""

    def __init__(self):
        self.recorded = []
        self.registry = self

    def assign(self, device, persona):
        return 100 + persona

    def arrays(self, version):
        return _persona(float(version))

    def record_evaluation(self, version, sse, sae, n, devices, blend=None):
        self.recorded.append((sse, sae, n, devices))

    def check_canary(self, persona, margin, min_devices):
        return False


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_no_evaluation_reply_can_raise_escape_the_count_or_poison_the_metrics(data):
    rollouts = FakeRollouts()
    strategy, _ = _strategy(rollouts=rollouts)
    requests = _eval_requests(strategy)
    labelled = [(n, *data.draw(eval_reply(r))) for n, r in requests.items() if data.draw(st.integers(0, 5))]
    for node, label, reply in list(labelled):
        if label != "failed" and data.draw(st.integers(0, 7)) == 0:
            labelled.append((node, label, reply))  # whichever copy comes second is rejected
    seen, bad = set(), 0
    for node, label, _ in labelled:
        if label == "failed":
            continue
        bad += label == "bad" or node in seen
        seen.add(node)
    for node, label, reply in labelled:  # tag good replies with the version they were served
        if label == "good" and isinstance(reply.content["metrics"], MetricRecord):
            reply.content["metrics"]["version"] = 100 + NODES[node]
    out = strategy.aggregate_evaluate(1, [reply for _, _, reply in labelled])
    if out is None:
        assert not labelled
        return
    assert out["rejected"] == bad and out["failed"] == sum(label == "failed" for _, label, _ in labelled)
    assert all(math.isfinite(v) for v in out.values())
    for sse, sae, n, devices in rollouts.recorded:  # what drives canary rollbacks
        assert all(math.isfinite(x) and x >= 0 for x in (sse, sae, n)) and sse <= 16 * n + 1e-6
