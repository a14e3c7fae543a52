"""ServerApp pieces that need no Flower run: restart resumption and the privacy plan."""

import numpy as np
import pytest

from common.config import FederationConfig
from common.privacy import epsilon
from server.registry import PersonaRegistry
from server.rollouts import Rollouts
from server.server_app import discovery_releases, privacy_plan, starting_versions


def test_restart_resumes_each_persona_from_its_registry_head(tmp_path):
    cfg = FederationConfig(base_model="tiny", num_personas=3, out_dir=str(tmp_path))
    registry = PersonaRegistry(tmp_path, lora=cfg.lora, base_model="tiny")
    first = starting_versions(registry, Rollouts(registry), cfg, private=False)
    assert sorted(first) == [0, 1, 2] and all(registry.version(v)["state"] == "stable" for v in first.values())
    arrays = {k: v + 1 for k, v in registry.arrays(first[1]).items()}
    candidate = registry.add_version(1, 7, arrays, 4, parent=first[1])

    again = PersonaRegistry(tmp_path, lora=cfg.lora, base_model="tiny")  # the coordinator restarted
    heads = starting_versions(again, Rollouts(again), cfg, private=False)
    assert heads == {0: first[0], 1: candidate, 2: first[2]}  # no new version 0s; persona 1 from its candidate
    assert np.allclose(again.arrays(heads[1])[sorted(arrays)[0]], arrays[sorted(arrays)[0]])
    assert again.versions()[1] == 4


def test_privacy_plan_meets_the_user_level_target_including_discovery():
    cfg = FederationConfig(num_personas=4, kmeans_iters=3, num_rounds=5, fraction_train=0.06,
                           dp_user_target_epsilon=4.0)
    dp, discovery_noise, prior = privacy_plan(cfg, num_nodes=216)
    rate = 13 / 216
    assert prior == [(discovery_noise, 1.0, discovery_releases(cfg))] and discovery_releases(cfg) == 4
    total = epsilon(prior + [(dp.noise_multiplier, rate, cfg.num_rounds)], cfg.dp_delta)
    assert total == pytest.approx(4.0, rel=0.03) and total <= 4.0
    assert privacy_plan(FederationConfig(), 216) == (None, 0.0, [])


def _answer(node: int, **arrays) -> "Message":
    from flwr.app import Array, ArrayRecord, Message, MessageType, RecordDict

    request = Message(content=RecordDict(), message_type=f"{MessageType.QUERY}.embed", dst_node_id=node)
    return Message(content=RecordDict({"arrays": ArrayRecord({k: Array(np.asarray(v, np.float32))
                                                             for k, v in arrays.items()})}), reply_to=request)


def test_discovery_sums_leave_out_malformed_answers_and_fail_clearly_without_any(monkeypatch):
    from flwr.supercore.task_identity import TaskIdentity

    for attr, value in (("_task_id", 1), ("_run_id", 1), ("_node_id", 0)):  # set by Flower in a real run
        monkeypatch.setattr(TaskIdentity, attr, value)
    from server.server_app import _sum

    shapes = {"sums": (2, 3), "counts": (2,)}
    good = [_answer(1, sums=np.ones((2, 3)), counts=[1, 0]), _answer(2, sums=np.full((2, 3), 2.0), counts=[0, 1])]
    bad = [_answer(3, sums=np.ones((3, 3)), counts=[1, 0]),  # wrong shape
           _answer(4, sums=np.full((2, 3), np.nan), counts=[1, 0]),  # not finite
           _answer(5, sums=np.ones((2, 3)))]  # missing counts
    sums, counts = _sum(good + bad, shapes, bound=1.0, noise=0.0, action="embed")
    np.testing.assert_array_equal(sums, np.full((2, 3), 3.0))
    np.testing.assert_array_equal(counts, [1, 1])
    with pytest.raises(RuntimeError, match="no device gave a valid answer to query.embed"):
        _sum(bad, shapes, bound=1.0, noise=0.0, action="embed")
    with pytest.raises(RuntimeError, match="no device"):
        _sum([], shapes, bound=1.0, noise=0.0, action="embed")


def test_private_discovery_sums_take_an_all_zero_answer_and_clip_the_rest(monkeypatch):
    """A cold-start device answers k-means with zeros (it joins through onboarding); under DP that answer must
    not crash the clipping (a zero norm) and every answer is clipped to the bound."""
    from flwr.supercore.task_identity import TaskIdentity

    for attr, value in (("_task_id", 1), ("_run_id", 1), ("_node_id", 0)):
        monkeypatch.setattr(TaskIdentity, attr, value)
    from server.server_app import _sum

    shapes = {"sums": (2, 3), "counts": (2,)}
    answers = [_answer(1, sums=np.zeros((2, 3)), counts=[0, 0]), _answer(2, sums=np.full((2, 3), 4.0), counts=[0, 0])]
    sums, counts = _sum(answers, shapes, bound=1.0, noise=1e-12, action="embed")
    assert np.sqrt((sums ** 2).sum() + (counts ** 2).sum()) == pytest.approx(1.0, rel=1e-6)
