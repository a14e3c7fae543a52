"""The simulated attackers and dropouts behave as documented (they drive the robustness experiment)."""

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from server.strategy import to_record
from simulations.adversaries import dropout, is_malicious, poisoning


@pytest.fixture(autouse=True)
def task_identity(monkeypatch):
    for attr, value in (("_task_id", 1), ("_run_id", 1), ("_node_id", 0)):
        monkeypatch.setattr(TaskIdentity, attr, value)


def _context(partition: int) -> Context:
    return Context(run_id=1, node_id=100 + partition, node_config={"partition-id": partition}, state=RecordDict(),
                   run_config={})


def _message(kind: str, round_: int = 1) -> Message:
    return Message(RecordDict({"config": ConfigRecord({"server-round": round_})}), dst_node_id=1, message_type=kind)


def _honest(message: Message, context: Context) -> Message:
    delta = {"w": np.array([1.0, -2.0], np.float32)}
    return Message(RecordDict({"arrays": to_record(delta)}), reply_to=message)


def test_the_malicious_fraction_is_near_the_requested_one_and_fixed_per_device():
    flags = [is_malicious(_context(i), 0.2, seed=3) for i in range(2000)]
    assert 0.17 < np.mean(flags) < 0.23
    assert flags == [is_malicious(_context(i), 0.2, seed=3) for i in range(2000)]


def test_a_malicious_device_sends_its_delta_sign_flipped_and_scaled_and_an_honest_one_is_untouched():
    mod = poisoning(0.5, "sign-flip", 10.0, seed=0)
    bad = next(i for i in range(50) if is_malicious(_context(i), 0.5, 0))
    good = next(i for i in range(50) if not is_malicious(_context(i), 0.5, 0))
    out = mod(_message(MessageType.TRAIN), _context(bad), _honest)
    np.testing.assert_allclose(out.content["arrays"]["w"].numpy(), [-10.0, 20.0])
    out = mod(_message(MessageType.TRAIN), _context(good), _honest)
    np.testing.assert_allclose(out.content["arrays"]["w"].numpy(), [1.0, -2.0])
    boosted = poisoning(1.0, "scale", 3.0)(_message(MessageType.TRAIN), _context(good), _honest)
    np.testing.assert_allclose(boosted.content["arrays"]["w"].numpy(), [3.0, -6.0])


def test_dropout_fails_about_the_requested_share_of_training_rounds_only():
    mod = dropout(0.3, seed=1)
    failed = 0
    for device in range(200):
        for round_ in (1, 2, 3):
            try:
                mod(_message(MessageType.TRAIN, round_), _context(device), _honest)
            except ConnectionError:
                failed += 1
        mod(_message(MessageType.EVALUATE), _context(device), _honest)  # never drops evaluation
    assert 0.25 < failed / 600 < 0.35


def test_bad_adversary_settings_are_refused():
    with pytest.raises(ValueError, match="kind"):
        poisoning(0.1, "flip")
    with pytest.raises(ValueError, match="fraction"):
        poisoning(1.5)
    with pytest.raises(ValueError, match="rate"):
        dropout(1.0)
