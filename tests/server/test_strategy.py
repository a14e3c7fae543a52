import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict

from flwr.serverapp.strategy import DifferentialPrivacyServerSideFixedClipping, FedAvg
from flwr.supercore.task_identity import TaskIdentity

from common.config import UserDP
from common.privacy import epsilon
from server.strategy import (PersonaStrategy, activity_bucket, check_update, join_personas, split_personas,
                             to_record)


@pytest.fixture(autouse=True)
def task_identity(monkeypatch):
    """Messages are stamped with the running task's identity, which Flower sets in a real run."""
    for attr, value in (("_task_id", 1), ("_run_id", 1), ("_node_id", 0)):
        monkeypatch.setattr(TaskIdentity, attr, value)


class FakeGrid:
    def __init__(self, nodes):
        self.nodes = list(nodes)

    def get_node_ids(self):
        return self.nodes


def _persona(value: float) -> dict[str, np.ndarray]:
    return {"a.lora_A.weight": np.full((2, 3), value, np.float32), "a.lora_B.weight": np.full((3, 2), value, np.float32)}


def _reply(request: Message, delta: dict, examples: int, **metrics) -> Message:
    content = RecordDict({"arrays": to_record(delta),
                          "metrics": MetricRecord({"num-examples": examples, "train_loss": 1.0, **metrics})})
    return Message(content=content, reply_to=request)


def _strategy(node_persona, **kw):
    released = []
    s = PersonaStrategy(node_persona, fraction_train=1.0, min_train_nodes=1,
                        on_release=lambda r, p, a, n, m, privacy: released.append((r, p, n, a)), **kw)
    return s, released


def test_join_and_split_round_trip():
    personas = {0: _persona(1.0), 3: _persona(2.0)}
    back = split_personas(join_personas(personas))
    assert sorted(back) == [0, 3]
    np.testing.assert_array_equal(back[3]["a.lora_B.weight"], personas[3]["a.lora_B.weight"])


def test_each_device_gets_its_own_persona_and_deltas_average_per_persona():
    node_persona = {11: 0, 12: 0, 13: 1, 14: 2}
    strategy, released = _strategy(node_persona)
    arrays = join_personas({0: _persona(0.0), 1: _persona(10.0), 2: _persona(20.0)})
    messages = list(strategy.configure_train(1, arrays, ConfigRecord(), FakeGrid(node_persona)))
    assert sorted(m.metadata.dst_node_id for m in messages) == [11, 12, 13, 14]
    for m in messages:
        sent = m.content["arrays"]["a.lora_A.weight"].numpy()
        assert np.all(sent == 10.0 * node_persona[m.metadata.dst_node_id])  # only its persona's slice
        assert m.content["config"]["persona"] == node_persona[m.metadata.dst_node_id]

    by_node = {m.metadata.dst_node_id: m for m in messages}
    replies = [_reply(by_node[11], _persona(1.0), 10), _reply(by_node[12], _persona(4.0), 30),
               _reply(by_node[13], _persona(-2.0), 5)]
    assert [r.metadata.src_node_id for r in replies] == [11, 12, 13]  # a reply comes from its request's node
    new, metrics = strategy.aggregate_train(1, replies)
    out = split_personas(new)
    np.testing.assert_allclose(out[0]["a.lora_A.weight"], 0.0 + (10 * 1.0 + 30 * 4.0) / 40)  # example-weighted
    np.testing.assert_allclose(out[1]["a.lora_A.weight"], 10.0 - 2.0)
    np.testing.assert_allclose(out[2]["a.lora_A.weight"], 20.0)  # no device replied: unchanged
    assert sorted((r, p, n) for r, p, n, _ in released) == [(1, 0, 2), (1, 1, 1)]  # no new version for persona 2
    assert metrics["p0_devices"] == 2 and "p2_devices" not in metrics


@pytest.mark.parametrize("server_lr", [0.5, 3.0])
def test_the_server_step_scales_each_personas_mean_delta(server_lr):
    node_persona = {11: 0, 12: 0, 13: 1}
    strategy, _ = _strategy(node_persona, server_lr=server_lr)
    arrays = join_personas({0: _persona(0.0), 1: _persona(10.0)})
    by_node = {m.metadata.dst_node_id: m for m in strategy.configure_train(1, arrays, ConfigRecord(),
                                                                            FakeGrid(node_persona))}
    new, _ = strategy.aggregate_train(1, [_reply(by_node[11], _persona(1.0), 10), _reply(by_node[12], _persona(3.0), 10),
                                          _reply(by_node[13], _persona(-2.0), 5)])
    out = split_personas(new)
    np.testing.assert_allclose(out[0]["a.lora_A.weight"], server_lr * 2.0)
    np.testing.assert_allclose(out[1]["a.lora_A.weight"], 10.0 - server_lr * 2.0)
    for bad in (0.0, -1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="server_lr"):
            _strategy(node_persona, server_lr=bad)


def test_a_cosine_server_step_decays_over_the_run_and_scales_that_rounds_delta():
    node_persona = {11: 0, 12: 0}
    strategy, _ = _strategy(node_persona, server_lr=2.0, server_lr_schedule="cosine", num_rounds=10)
    steps = [strategy.server_step(r) for r in range(1, 11)]
    assert steps[0] == pytest.approx(2.0)  # the first round takes the full step
    assert all(a > b > 0 for a, b in zip(steps, steps[1:]))  # then strictly smaller, never zero
    # about half the constant total: sum over k < T of (1 + cos(pi k / T)) / 2 is (T + 1) / 2
    assert steps[-1] < 0.05 * 2.0 and sum(steps) == pytest.approx(2.0 * (10 + 1) / 2)
    arrays = join_personas({0: _persona(0.0)})
    for server_round in (1, 6):
        by_node = {m.metadata.dst_node_id: m for m in strategy.configure_train(server_round, arrays, ConfigRecord(),
                                                                                FakeGrid(node_persona))}
        new, metrics = strategy.aggregate_train(server_round, [_reply(by_node[11], _persona(1.0), 10),
                                                               _reply(by_node[12], _persona(3.0), 10)])
        moved = split_personas(new)[0]["a.lora_A.weight"] - split_personas(arrays)[0]["a.lora_A.weight"]
        np.testing.assert_allclose(moved, steps[server_round - 1] * 2.0, rtol=1e-6)
        assert metrics["server_step"] == pytest.approx(steps[server_round - 1])
        arrays = new
    constant, _ = _strategy(node_persona, server_lr=2.0, num_rounds=10)
    assert {constant.server_step(r) for r in range(1, 11)} == {2.0}
    with pytest.raises(ValueError, match="server_lr_schedule"):
        _strategy(node_persona, server_lr_schedule="linear", num_rounds=10)
    with pytest.raises(ValueError, match="num_rounds"):
        _strategy(node_persona, server_lr_schedule="cosine")


@pytest.mark.parametrize("bad", [
    {"a.lora_A.weight": np.full((2, 3), np.nan, np.float32), "a.lora_B.weight": np.zeros((3, 2), np.float32)},
    {"a.lora_A.weight": np.zeros((3, 3), np.float32), "a.lora_B.weight": np.zeros((3, 2), np.float32)},
    {"a.lora_A.weight": np.zeros((2, 3), np.float32)},
])
def test_malformed_updates_are_rejected_and_the_round_goes_on(bad):
    strategy, _ = _strategy({1: 0, 2: 0})
    messages = list(strategy.configure_train(1, join_personas({0: _persona(0.0)}), ConfigRecord(), FakeGrid([1, 2])))
    good, evil = _reply(messages[0], _persona(2.0), 10), _reply(messages[1], bad, 10)
    assert check_update(bad, _persona(0.0)) is not None
    new, metrics = strategy.aggregate_train(1, [good, evil])
    np.testing.assert_allclose(split_personas(new)[0]["a.lora_A.weight"], 2.0)
    assert metrics["rejected"] == 1 and metrics["p0_devices"] == 1


def test_an_update_above_the_norm_bound_is_rejected_and_one_below_is_kept():
    strategy, released = _strategy({1: 0, 2: 0}, max_update_norm=10.0)
    messages = list(strategy.configure_train(1, join_personas({0: _persona(0.0)}), ConfigRecord(), FakeGrid([1, 2])))
    # _persona(v) has 12 entries: L2 norm 2*sqrt(12) ~ 6.9 (kept) and 100*sqrt(12) ~ 346 (rejected).
    assert check_update(_persona(100.0), _persona(0.0), max_norm=10.0).startswith("L2 norm")
    new, _ = strategy.aggregate_train(1, [_reply(messages[0], _persona(2.0), 10), _reply(messages[1], _persona(100.0), 10)])
    np.testing.assert_allclose(split_personas(new)[0]["a.lora_A.weight"], 2.0)
    assert released[0][2] == 1


def _poisoned_round(aggregation: str, **kw) -> np.ndarray:
    """Eight honest devices send deltas 1..8 (weights differ); two attackers send -1000 (a boosted sign flip)."""
    nodes = list(range(1, 11))
    # The aggregation alone: no norm bound, which would reject the attackers before any aggregation sees them.
    strategy, _ = _strategy({n: 0 for n in nodes}, aggregation=aggregation, max_update_norm=0.0, **kw)
    messages = list(strategy.configure_train(1, join_personas({0: _persona(0.0)}), ConfigRecord(), FakeGrid(nodes)))
    values = [1, 2, 3, 4, 5, 6, 7, 8, -1000, -1000]
    replies = [_reply(m, _persona(float(v)), examples=n) for m, v, n in zip(messages, values, nodes)]
    new, metrics = strategy.aggregate_train(1, replies)
    assert metrics["p0_devices"] == 10
    return split_personas(new)[0]["a.lora_B.weight"]


def test_plain_mean_is_dragged_by_attackers_and_robust_aggregations_are_not():
    weights = np.arange(1, 11)
    values = np.array([1, 2, 3, 4, 5, 6, 7, 8, -1000, -1000], float)
    np.testing.assert_allclose(_poisoned_round("mean"), (weights * values).sum() / weights.sum(), rtol=1e-6)
    # Trimming 20% of 10 cuts two updates at each end: both attackers and the two largest honest ones.
    np.testing.assert_allclose(_poisoned_round("trimmed-mean", trim_fraction=0.2), np.mean([1, 2, 3, 4, 5, 6]),
                               rtol=1e-6)
    np.testing.assert_allclose(_poisoned_round("median"), np.median(values), rtol=1e-6)


def test_robust_aggregation_with_user_level_dp_is_refused():
    with pytest.raises(ValueError, match="robust aggregation"):
        _strategy({1: 0}, aggregation="median", dp=UserDP(noise_multiplier=1.0, clip=1.0, delta=1e-5))
    with pytest.raises(ValueError, match="aggregation"):
        _strategy({1: 0}, aggregation="krum")


def test_evaluation_sums_errors_exactly_per_persona_and_bucket():
    # The pooling math alone; the release threshold (eval-min-devices) is tests/server/test_release_privacy.py's.
    strategy, _ = _strategy({1: 0, 2: 1}, eval_nodes=[1, 2], eval_every=1, eval_min_devices=1)
    messages = list(strategy.configure_evaluate(1, join_personas({0: _persona(0.0), 1: _persona(1.0)}),
                                                ConfigRecord(), FakeGrid([1, 2])))
    assert len(messages) == 2
    replies = []
    for m, (sse, n, cold) in zip(messages, [(4.0, 4, 0), (9.0, 1, 1)]):
        sae = float(np.sqrt(sse * n))  # every error the same size: a consistent (sse, sae) pair
        metrics = MetricRecord({"persona_sse": sse, "persona_sae": sae, "personal_sse": sse / 4,
                                "personal_sae": sae / 4, "n": n, "cold": cold, "num-examples": 1})
        replies.append(Message(content=RecordDict({"metrics": metrics}), reply_to=m))
    out = strategy.aggregate_evaluate(1, replies)
    assert out["persona_rmse"] == pytest.approx(np.sqrt(13 / 5))  # pooled over ratings, not averaged per user
    assert out["personal_rmse"] == pytest.approx(np.sqrt(13 / 4 / 5))
    assert out["p1_persona_rmse"] == pytest.approx(3.0) and out["cold_users"] == 1
    assert out["warm_persona_mae"] == pytest.approx(1.0)


def _blend_metrics(device_rows):
    """Two devices' real blend sums (`common.blend`) from (pred, bias, true) triples of test and validation."""
    from common import blend

    out = {}
    for held_out, (pred, bias, true) in device_rows.items():
        for path, shift in (("persona", 0.0), ("personal", 0.5)):
            s = blend.residual_sums(np.asarray(pred) + shift, bias, true)
            out.update({f"{path}_{held_out}_rd": s["rd"], f"{path}_{held_out}_dd": s["dd"]})
    pred, bias, true = (np.asarray(x, float) for x in device_rows["test"])
    return {**out, "bias_sse": float(((bias - true) ** 2).sum()), "bias_sae": float(np.abs(bias - true).sum()),
            "n_val": float(len(device_rows["val"][2]))}


def _evaluate(strategy, nodes, metric_rows):
    messages = list(strategy.configure_evaluate(1, join_personas({0: _persona(0.0)}), ConfigRecord(),
                                                FakeGrid(nodes)))
    replies = [Message(content=RecordDict({"metrics": MetricRecord(m)}), reply_to=msg)
               for msg, m in zip(messages, metric_rows)]
    return strategy.aggregate_evaluate(1, replies)


def _device_metrics(test, val):
    pred, bias, true = (np.asarray(x, float) for x in test)
    errors = {"persona_sse": float(((pred - true) ** 2).sum()), "persona_sae": float(np.abs(pred - true).sum()),
              "personal_sse": float(((pred + 0.5 - true) ** 2).sum()),
              "personal_sae": float(np.abs(pred + 0.5 - true).sum())}
    return {**errors, **_blend_metrics({"test": test, "val": val}), "n": float(len(true)), "cold": 0,
            "num-examples": 30}


def test_the_blend_weight_comes_from_pooled_validation_sums_and_its_rmse_from_test_sums():
    devices = [(([3.0, 4.0, 2.0], [3.5, 3.5, 3.0], [3.0, 5.0, 1.0]), ([4.0, 2.0], [3.4, 3.1], [5.0, 2.0])),
               (([2.5, 4.5], [3.0, 4.0], [2.0, 5.0]), ([3.0, 1.5, 4.0], [3.2, 2.0, 3.6], [3.0, 1.0, 4.0]))]
    strategy, _ = _strategy({1: 0, 2: 0}, eval_nodes=[1, 2], eval_every=1, eval_min_devices=1)
    out = _evaluate(strategy, [1, 2], [_device_metrics(t, v) for t, v in devices])
    # The same computed directly on every device's predictions, pooled.
    cat = lambda i, held: np.concatenate([np.asarray(d[held][i], float) for d in devices])  # noqa: E731
    for path, shift in (("persona", 0.0), ("personal", 0.5)):
        (pv, bv, yv), (pt, bt, yt) = ((cat(i, h) + (shift if i == 0 else 0) for i in range(3)) for h in (1, 0))
        w = float(np.clip(((yv - bv) * (pv - bv)).sum() / ((pv - bv) ** 2).sum(), 0, 1))
        assert out[f"{path}_blend_weight"] == pytest.approx(w)
        assert out[f"{path}_blend_rmse"] == pytest.approx(np.sqrt(np.mean((bt + w * (pt - bt) - yt) ** 2)))
    assert out["bias_rmse"] == pytest.approx(np.sqrt(np.mean((cat(1, 0) - cat(2, 0)) ** 2)))
    # Test ratings never move the weight: other test sums, the same validation sums, the same weight.
    again, _ = _strategy({1: 0, 2: 0}, eval_nodes=[1, 2], eval_every=1, eval_min_devices=1)
    flipped = [(([5.0, 1.0, 5.0], t[1], t[2]) if i == 0 else t, v) for i, (t, v) in enumerate(devices)]
    out2 = _evaluate(again, [1, 2], [_device_metrics(t, v) for t, v in flipped])
    assert out2["persona_blend_weight"] == out["persona_blend_weight"]
    assert out2["persona_blend_rmse"] != out["persona_blend_rmse"]


@pytest.mark.parametrize("change", [
    {"persona_val_dd": -1.0}, {"bias_sse": float("nan")}, {"personal_test_rd": float("inf")},
    {"personal_test_rd": 1e9}, {"n_val": -1.0}, {"n_val": 1e12}, {"bias_sae": 1e6}, {"persona_val_rd": "x"},
    {"drop": "personal_val_dd"}])
def test_impossible_or_partial_blend_sums_are_rejected_and_the_rest_still_pools(change):
    good = _device_metrics(([3.0, 4.0], [3.5, 3.5], [3.0, 5.0]), ([4.0], [3.4], [5.0]))
    bad = dict(good)
    if "drop" in change:
        del bad[change["drop"]]
    else:
        bad.update(change)
    strategy, _ = _strategy({1: 0, 2: 0}, eval_nodes=[1, 2], eval_every=1, eval_min_devices=1)
    try:
        out = _evaluate(strategy, [1, 2], [good, bad])
    except (TypeError, ValueError):  # MetricRecord itself refuses a string: never reaches the coordinator
        assert change.get("persona_val_rd") == "x"
        return
    assert out["users"] == 1 and "bias_rmse" in out  # the bad reply rejected, the good one pooled


def test_without_blend_sums_from_every_device_no_blend_is_reported():
    good = _device_metrics(([3.0, 4.0], [3.5, 3.5], [3.0, 5.0]), ([4.0], [3.4], [5.0]))
    plain = {k: v for k, v in good.items() if k in ("persona_sse", "persona_sae", "personal_sse", "personal_sae",
                                                    "n", "cold", "num-examples")}
    strategy, _ = _strategy({1: 0, 2: 0}, eval_nodes=[1, 2], eval_every=1, eval_min_devices=1)
    out = _evaluate(strategy, [1, 2], [good, plain])
    assert out["users"] == 2 and "bias_rmse" not in out and "personal_blend_rmse" not in out


def test_each_versions_serving_blend_weights_go_to_the_registry_from_its_own_devices_validation_sums(tmp_path):
    """`serve-blend`: the weights serving applies come from the validation sums of the devices each version was
    served to (never test ratings), only once eval-min-devices devices pooled, only when every one sent them."""
    from common import blend
    from common.config import LoraSettings
    from server.registry import PersonaRegistry
    from server.rollouts import Rollouts

    def run(blend_on, rows, min_devices=2):
        registry = PersonaRegistry(tmp_path / f"r{len(list(tmp_path.iterdir()))}", lora=LoraSettings(rank=2))
        rollouts = Rollouts(registry)
        version = registry.add_version(0, 0, _persona(0.0), 0)
        rollouts.make_stable(0, version, "test")
        nodes = list(range(1, len(rows) + 1))
        strategy, _ = _strategy({n: 0 for n in nodes}, eval_nodes=nodes, eval_every=1, eval_min_devices=min_devices,
                                rollouts=rollouts, blend=blend_on)
        _evaluate(strategy, nodes, [{**row, "version": version} for row in rows])
        return registry, version

    devices = [(([3.0, 4.0, 2.0], [3.5, 3.5, 3.0], [3.0, 5.0, 1.0]), ([4.0, 2.0], [3.4, 3.1], [5.0, 2.0])),
               (([2.5, 4.5], [3.0, 4.0], [2.0, 5.0]), ([3.0, 1.5, 4.0], [3.2, 2.0, 3.6], [3.0, 1.0, 4.0]))]
    rows = [_device_metrics(t, v) for t, v in devices]
    registry, version = run(True, rows)
    weights = registry.blend_weights(version)
    for path, shift in (("persona", 0.0), ("personal", 0.5)):
        pv = np.concatenate([np.asarray(v[0], float) + shift for _, v in devices])
        bv, yv = (np.concatenate([np.asarray(v[i], float) for _, v in devices]) for i in (1, 2))
        sums = blend.residual_sums(pv, bv, yv)
        assert weights[path] == pytest.approx(blend.weight(sums["rd"], sums["dd"]))
        assert registry.evaluation(version)[f"{path}_blend_weight"] == pytest.approx(weights[path])
    assert registry.evaluation(version)["blend_devices"] == 2
    # other test ratings, the same validation sums: the same weights
    flipped = [_device_metrics(([5.0, 1.0, 5.0], *devices[0][0][1:]), devices[0][1]), rows[1]]
    registry, version = run(True, flipped)
    assert registry.blend_weights(version) == pytest.approx(weights)
    # nothing recorded: blend off, a device without validation sums in the pool, a pool below eval-min-devices
    plain = {k: v for k, v in rows[1].items() if k in ("persona_sse", "persona_sae", "personal_sse", "personal_sae",
                                                      "n", "cold", "num-examples")}
    for blend_on, pool, min_devices in ((False, rows, 2), (True, [rows[0], plain], 2), (True, rows, 3)):
        registry, version = run(blend_on, pool, min_devices)
        assert registry.blend_weights(version) is None
        assert registry.evaluation(version)["personal_blend_weight"] is None


def test_evaluation_is_also_pooled_by_user_activity():
    assert [activity_bucket(n) for n in (0, 19, 20, 99, 100, 199, 200, 5000)] == [
        "ratings_0_19", "ratings_0_19", "ratings_20_49", "ratings_50_99", "ratings_100_199", "ratings_100_199",
        "ratings_200_plus", "ratings_200_plus"]
    strategy, _ = _strategy({1: 0, 2: 0, 3: 0}, eval_nodes=[1, 2, 3], eval_every=1, eval_min_devices=1)
    messages = list(strategy.configure_evaluate(1, join_personas({0: _persona(0.0)}), ConfigRecord(),
                                                FakeGrid([1, 2, 3])))
    replies = []
    for m, (sse, n, history) in zip(messages, [(4.0, 4, 10), (9.0, 1, 150), (1.0, 1, 120)]):
        sae = float(np.sqrt(sse * n))  # every error the same size: a consistent (sse, sae) pair
        metrics = MetricRecord({"persona_sse": sse, "persona_sae": sae, "personal_sse": sse, "personal_sae": sae,
                                "n": n, "cold": int(history < 20), "num-examples": history})
        replies.append(Message(content=RecordDict({"metrics": metrics}), reply_to=m))
    out = strategy.aggregate_evaluate(1, replies)
    assert out["ratings_0_19_persona_rmse"] == pytest.approx(1.0) and out["ratings_0_19_users"] == 1
    assert out["ratings_100_199_persona_rmse"] == pytest.approx(np.sqrt(10 / 2)) and out["ratings_100_199_users"] == 2
    assert "ratings_50_99_users" not in out


def test_no_evaluation_between_scheduled_rounds():
    strategy, _ = _strategy({1: 0}, eval_nodes=[1], eval_every=3, num_rounds=5)
    arrays = join_personas({0: _persona(0.0)})
    sent = [r for r in range(1, 6) if list(strategy.configure_evaluate(r, arrays, ConfigRecord(), FakeGrid([1])))]
    assert sent == [3, 5]


# --- user-level DP ------------------------------------------------------------------------------------------

def _big(value: float) -> dict[str, np.ndarray]:
    return {"a.lora_A.weight": np.full((50, 100), value, np.float32),
            "a.lora_B.weight": np.full((100, 50), value, np.float32)}


def _norm(arrays: dict) -> float:
    return float(np.sqrt(sum((v.astype(np.float64) ** 2).sum() for v in arrays.values())))


def test_dp_clips_each_update_to_the_bound():
    node_persona = {1: 0, 2: 1}
    strategy, released = _strategy(node_persona, dp=UserDP(noise_multiplier=0.0, clip=1.0, delta=1e-5))
    arrays = join_personas({0: _persona(0.0), 1: _persona(0.0)})
    by_node = {m.metadata.dst_node_id: m for m in strategy.configure_train(1, arrays, ConfigRecord(), FakeGrid([1, 2]))}
    big, small = _persona(5.0), _persona(0.01)
    new, _ = strategy.aggregate_train(1, [_reply(by_node[1], big, 1), _reply(by_node[2], small, 1)])
    out = split_personas(new)
    assert _norm(out[0]) == pytest.approx(1.0, rel=1e-5)  # scaled down to the bound, direction kept
    np.testing.assert_allclose(out[0]["a.lora_A.weight"] / out[0]["a.lora_B.weight"][0, 0], 1.0, rtol=1e-5)
    np.testing.assert_allclose(out[1]["a.lora_A.weight"], 0.01, rtol=1e-5)  # under the bound: untouched


def test_dp_noise_std_is_multiplier_times_clip_over_expected_devices_and_every_persona_is_released():
    node_persona = {n: n % 2 for n in range(8)}  # two personas of 4 devices
    dp = UserDP(noise_multiplier=2.0, clip=0.5, delta=1e-5)
    prior = [(3.0, 1.0, 2)]
    strategy, released = _strategy(node_persona, dp=dp, prior_releases=prior)
    strategy.fraction_train = 0.5  # 4 of 8 devices: sample rate 0.5, 2 expected per persona
    arrays = join_personas({0: _big(0.0), 1: _big(0.0)})
    list(strategy.configure_train(1, arrays, ConfigRecord(), FakeGrid(node_persona)))
    np.random.seed(0)
    new, metrics = strategy.aggregate_train(1, [])  # nobody replied: each persona still gets a noise-only release
    for persona in (0, 1):
        noise = np.concatenate([v.ravel() for v in split_personas(new)[persona].values()])
        assert noise.std() == pytest.approx(2.0 * 0.5 / 2, rel=0.03) and abs(noise.mean()) < 0.02
    assert sorted(p for _, p, _, _ in released) == [0, 1]
    expected_eps = epsilon(prior + [(2.0, 0.5, 1)], 1e-5)
    assert metrics["p0_epsilon"] == pytest.approx(expected_eps)
    assert strategy.privacy_history[0] == prior + [(2.0, 0.5, 1)]


def test_dp_on_one_persona_matches_flowers_server_side_fixed_clipping_wrapper():
    dp = UserDP(noise_multiplier=0.7, clip=0.8, delta=1e-5)
    current = _persona(1.0)
    deltas = [_persona(2.0), _persona(-0.1), _persona(0.3)]
    nodes = [1, 2, 3]

    ours, _ = _strategy({n: 0 for n in nodes}, dp=dp, reproducible=True)  # Flower's global-RNG noise, seeded below
    by_node = {m.metadata.dst_node_id: m for m in
               ours.configure_train(1, join_personas({0: current}), ConfigRecord(), FakeGrid(nodes))}
    np.random.seed(7)
    new, _ = ours.aggregate_train(1, [_reply(by_node[n], d, 1) for n, d in zip(nodes, deltas)])

    wrapper = DifferentialPrivacyServerSideFixedClipping(FedAvg(fraction_train=1.0, weighted_by_key="num-examples"),
                                                         noise_multiplier=0.7, clipping_norm=0.8, num_sampled_clients=3)
    wrapper.current_arrays = to_record(current)
    requests = [Message(content=RecordDict(), message_type="train", dst_node_id=n) for n in nodes]
    replies = [_reply(r, {k: current[k] + d[k] for k in current}, 1) for r, d in zip(requests, deltas)]
    np.random.seed(7)
    theirs, _ = wrapper.aggregate_train(1, replies)
    for k, v in split_personas(new)[0].items():
        np.testing.assert_allclose(v, theirs[k].numpy(), atol=1e-5)


def test_a_device_out_of_budget_is_skipped_not_rejected():
    strategy, released = _strategy({1: 0, 2: 0})
    by_node = {m.metadata.dst_node_id: m for m in
               strategy.configure_train(1, join_personas({0: _persona(0.0)}), ConfigRecord(), FakeGrid([1, 2]))}
    skipped = Message(content=RecordDict({"metrics": MetricRecord({"skipped": 1, "num-examples": 1}),
                                          "status": ConfigRecord({"reason": "budget exhausted"})}),
                      reply_to=by_node[2])
    new, _ = strategy.aggregate_train(1, [_reply(by_node[1], _persona(1.0), 3), skipped])
    np.testing.assert_allclose(split_personas(new)[0]["a.lora_A.weight"], 1.0)
    assert [n for _, _, n, _ in released] == [1]


def test_under_dp_the_published_device_count_is_the_public_expected_cohort_not_who_replied():
    """The registry, manifests and admin API get the release's device count: under user-level DP that must not be
    the exact number of contributors (not covered by the accountant), so it is the public expected cohort."""
    node_persona = {n: n % 2 for n in range(8)}  # two personas of 4 devices, q = 0.5: 2 expected each
    strategy, released = _strategy(node_persona, dp=UserDP(noise_multiplier=1.0, clip=1.0, delta=1e-5),
                                   sample_rate=0.5)
    arrays = join_personas({0: _persona(0.0), 1: _persona(0.0)})
    published = []
    for round_ in (1, 2, 3):
        requests = list(strategy.configure_train(round_, arrays, ConfigRecord(), FakeGrid(node_persona)))
        replies = [_reply(m, _persona(0.01), 1) for m in requests][: round_ - 1]  # 0, 1 then 2 replies
        strategy.aggregate_train(round_, replies)
        published += [n for r, _, n, _ in released if r == round_]
    assert published == [2] * 6
    plain, released_plain = _strategy({1: 0, 2: 0, 3: 0})
    requests = list(plain.configure_train(1, join_personas({0: _persona(0.0)}), ConfigRecord(), FakeGrid([1, 2, 3])))
    plain.aggregate_train(1, [_reply(m, _persona(0.01), 1) for m in requests[:2]])
    assert [n for _, _, n, _ in released_plain] == [2]  # without DP the exact count is published


def test_user_level_noise_is_secret_unless_the_run_is_labelled_reproducible():
    """Noise drawn from a generator anyone can seed could be subtracted from the release: outside the simulations'
    reproducible mode, two releases from the same global numpy seed differ."""
    dp = UserDP(noise_multiplier=1.0, clip=1.0, delta=1e-5)
    outs = {}
    for reproducible in (False, True):
        for attempt in range(2):
            strategy, _ = _strategy({1: 0}, dp=dp, reproducible=reproducible)
            list(strategy.configure_train(1, join_personas({0: _persona(0.0)}), ConfigRecord(), FakeGrid([1])))
            np.random.seed(11)
            new, _ = strategy.aggregate_train(1, [])
            outs[reproducible, attempt] = split_personas(new)[0]["a.lora_A.weight"]
    assert not np.allclose(outs[False, 0], outs[False, 1])
    np.testing.assert_array_equal(outs[True, 0], outs[True, 1])
    assert np.abs(outs[False, 0]).max() > 0


@settings(deadline=None, max_examples=25)
@given(st.integers(min_value=2, max_value=7), st.integers(min_value=0, max_value=2**31 - 1))
def test_paired_intervals_against_the_private_bias_model_equal_the_per_user_computation(devices, seed):
    """Each user's MSE difference (adapter, and its blend at the pooled weight, minus the private bias model), then
    mean and 95% interval over users: what the centralised tables report, from per-device sums only."""
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(devices):
        def draw(k):
            true = rng.integers(1, 6, k).astype(float)
            return rng.uniform(1, 5, k), rng.uniform(2, 4.5, k), true
        rows.append((draw(int(rng.integers(1, 9))), draw(int(rng.integers(1, 5)))))
    strategy, _ = _strategy({i: 0 for i in range(1, devices + 1)}, eval_nodes=list(range(1, devices + 1)),
                            eval_every=1, eval_min_devices=1)
    out = _evaluate(strategy, list(range(1, devices + 1)), [_device_metrics(t, v) for t, v in rows])
    for path, shift in (("persona", 0.0), ("personal", 0.5)):
        w = out[f"{path}_blend_weight"]
        for name, predict in ((f"{path}_vs_bias", lambda p, b: p + shift),
                              (f"{path}_blend_vs_bias", lambda p, b: b + w * (p + shift - b))):
            diffs = np.array([np.mean((predict(p, b) - y) ** 2) - np.mean((b - y) ** 2) for (p, b, y), _ in rows])
            half = 1.96 * diffs.std(ddof=1) / np.sqrt(len(diffs))
            assert out[f"{name}_mean"] == pytest.approx(diffs.mean(), abs=1e-9)
            assert out[f"{name}_lo"] == pytest.approx(diffs.mean() - half, abs=1e-6)
            assert out[f"{name}_hi"] == pytest.approx(diffs.mean() + half, abs=1e-6)


def test_with_several_personas_evaluation_reports_what_per_persona_weights_leaning_on_the_pool_serve():
    """`served_metrics`: each persona blended at its own validation weight plus `prior` devices' worth of the pool of
    all personas (the registry's serving rule), the test SSE summed over personas. Prior 0: each persona's own
    weight; a huge prior: one pooled weight for all; nothing with one persona or a persona missing blend sums."""
    from common import blend
    from server.strategy import served_metrics

    rng = np.random.default_rng(3)
    sums, arrays = {"all/n": 0.0}, {}
    for p, devices, shift in (("p0", 3, 0.8), ("p1", 12, -0.3)):
        true, base = rng.integers(1, 6, 40).astype(float), rng.uniform(2.5, 4.0, 40)
        pred = base + shift * (true - base) + rng.normal(0, 0.3, 40)
        test, val = blend.residual_sums(pred[:25], base[:25], true[:25]), blend.residual_sums(pred[25:], base[25:],
                                                                                              true[25:])
        arrays[p] = (test, val, devices)
        sums.update({f"{p}/n": 25.0, f"{p}/users": devices, f"{p}/blend_users": devices, f"{p}/bias_sse": test["rr"]})
        sums["all/n"] += 25.0
        for path in ("persona", "personal"):
            sums.update({f"{p}/{path}_test_rd": test["rd"], f"{p}/{path}_test_dd": test["dd"],
                         f"{p}/{path}_val_rd": val["rd"], f"{p}/{path}_val_dd": val["dd"]})

    def expected(weight_of) -> float:
        return float(np.sqrt(sum(blend.sse(t["rr"], t["rd"], t["dd"], weight_of(p)) for p, (t, _, _) in
                                 arrays.items()) / 50))
    pool_rd, pool_dd = (sum(v[x] for _, v, _ in arrays.values()) for x in ("rd", "dd"))
    own = served_metrics(sums, 0.0)
    assert own["persona_served_rmse"] == pytest.approx(expected(lambda p: blend.weight(arrays[p][1]["rd"],
                                                                                       arrays[p][1]["dd"])))
    pooled = served_metrics(sums, 1e12)
    assert pooled["p0_persona_served_weight"] == pytest.approx(pooled["p1_persona_served_weight"], abs=1e-6)
    assert pooled["personal_served_rmse"] == pytest.approx(expected(lambda p: blend.weight(pool_rd, pool_dd)))
    five = served_metrics(sums, 5.0)
    for p, (_, v, _) in arrays.items():
        assert five[f"{p}_persona_served_weight"] == pytest.approx(
            blend.shrunk_weight(v["rd"], v["dd"], pool_rd, pool_dd, 15, 5.0))
    assert own["p0_persona_served_weight"] != pytest.approx(pooled["p0_persona_served_weight"])
    # one persona, or a persona with a device that sent no blend sums: nothing (the blend rows are what is served)
    assert served_metrics({k: v for k, v in sums.items() if not k.startswith("p1/")}, 5.0) == {}
    assert served_metrics({**sums, "p1/blend_users": 11}, 5.0) == {}
