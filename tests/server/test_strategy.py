import numpy as np
import pytest
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict

from flwr.supercore.task_identity import TaskIdentity

from server.strategy import PersonaStrategy, check_update, join_personas, split_personas, to_record


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
                        on_release=lambda r, p, a, n, m: released.append((r, p, n, a)), **kw)
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
    new, _ = strategy.aggregate_train(1, [good, evil])
    np.testing.assert_allclose(split_personas(new)[0]["a.lora_A.weight"], 2.0)


def test_evaluation_sums_errors_exactly_per_persona_and_bucket():
    strategy, _ = _strategy({1: 0, 2: 1}, eval_nodes=[1, 2], eval_every=1)
    messages = list(strategy.configure_evaluate(1, join_personas({0: _persona(0.0), 1: _persona(1.0)}),
                                                ConfigRecord(), FakeGrid([1, 2])))
    assert len(messages) == 2
    replies = []
    for m, (sse, n, cold) in zip(messages, [(4.0, 4, 0), (9.0, 1, 1)]):
        metrics = MetricRecord({"persona_sse": sse, "persona_sae": sse, "personal_sse": sse / 4,
                                "personal_sae": sse / 4, "n": n, "cold": cold, "num-examples": 1})
        replies.append(Message(content=RecordDict({"metrics": metrics}), reply_to=m))
    out = strategy.aggregate_evaluate(1, replies)
    assert out["persona_rmse"] == pytest.approx(np.sqrt(13 / 5))  # pooled over ratings, not averaged per user
    assert out["personal_rmse"] == pytest.approx(np.sqrt(13 / 4 / 5))
    assert out["p1_persona_rmse"] == pytest.approx(3.0) and out["cold_users"] == 1
    assert out["warm_persona_mae"] == pytest.approx(1.0)


def test_no_evaluation_between_scheduled_rounds():
    strategy, _ = _strategy({1: 0}, eval_nodes=[1], eval_every=3, num_rounds=5)
    arrays = join_personas({0: _persona(0.0)})
    sent = [r for r in range(1, 6) if list(strategy.configure_evaluate(r, arrays, ConfigRecord(), FakeGrid([1])))]
    assert sent == [3, 5]
