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
