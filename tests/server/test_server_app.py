"""ServerApp pieces that need no Flower run: restart resumption and the privacy plan."""

from dataclasses import replace

import numpy as np
import pytest

from common.config import FederationConfig, UserDP
from common.privacy import epsilon, poisson_rate
from server.registry import PersonaRegistry
from server.rollouts import Rollouts
from server.server_app import (discovery_releases, privacy_plan, resumed_histories, starting_versions,
                               version_zero_privacy)
from server.strategy import PersonaStrategy


def test_restart_resumes_each_persona_from_its_registry_head(tmp_path):
    cfg = FederationConfig(base_model="tiny", num_personas=3, out_dir=str(tmp_path))
    registry = PersonaRegistry(tmp_path, lora=cfg.lora, base_model="tiny")
    first, fresh = starting_versions(registry, Rollouts(registry), cfg, version_zero_privacy(None, []))
    assert fresh == {0, 1, 2}
    assert sorted(first) == [0, 1, 2] and all(registry.version(v)["state"] == "stable" for v in first.values())
    arrays = {k: v + 1 for k, v in registry.arrays(first[1]).items()}
    candidate = registry.add_version(1, 7, arrays, 4, parent=first[1])

    again = PersonaRegistry(tmp_path, lora=cfg.lora, base_model="tiny")  # the coordinator restarted
    heads, fresh = starting_versions(again, Rollouts(again), cfg, version_zero_privacy(None, []))
    assert not fresh and heads == {0: first[0], 1: candidate, 2: first[2]}  # persona 1 resumes from its candidate
    assert np.allclose(again.arrays(heads[1])[sorted(arrays)[0]], arrays[sorted(arrays)[0]])
    assert again.versions()[1] == 4


def test_privacy_plan_meets_the_user_level_target_including_discovery():
    cfg = FederationConfig(num_personas=4, kmeans_iters=3, num_rounds=5, fraction_train=0.06,
                           dp_user_target_epsilon=4.0)
    dp, discovery_noise, prior = privacy_plan(cfg, num_nodes=216)
    rate = poisson_rate(0.06, cfg.min_train_nodes, 216)  # the strategy's Poisson rate: 0.06 (13 expected)
    assert rate == 0.06
    assert prior == [(discovery_noise, 1.0, discovery_releases(cfg))] and discovery_releases(cfg) == 4
    total = epsilon(prior + [(dp.noise_multiplier, rate, cfg.num_rounds)], cfg.dp_delta)
    assert total == pytest.approx(4.0, rel=0.03) and total <= 4.0
    assert privacy_plan(FederationConfig(), 216) == (None, 0.0, [])


def test_every_round_of_item_factors_is_a_discovery_release_the_target_covers():
    cfg = FederationConfig(num_personas=4, kmeans_iters=3, num_rounds=5, fraction_train=0.06, item_stats=True,
                           item_factors_rounds=20, dp_user_target_epsilon=8.0)
    # k-means, onboarding, item statistics, each factor round, the population centre
    assert discovery_releases(cfg) == 3 + 1 + 1 + 20 + 1
    assert discovery_releases(replace(cfg, item_factors_centre=False)) == 3 + 1 + 1 + 20
    dp, discovery_noise, prior = privacy_plan(cfg, num_nodes=216)
    total = epsilon(prior + [(dp.noise_multiplier, 0.06, cfg.num_rounds)], cfg.dp_delta)
    assert total == pytest.approx(8.0, rel=0.03) and total <= 8.0
    without = privacy_plan(FederationConfig(**{**cfg.__dict__, "item_factors_rounds": 0}), 216)
    assert discovery_noise > without[1]  # the rounds are paid for with more noise on every release


@pytest.mark.parametrize("fraction", [1.0, 0.25, 0.01])
def test_each_item_factors_round_asks_a_fresh_sample_of_the_devices_and_steps_on_its_sum(fraction, monkeypatch,
                                                                                       tmp_path):
    import server.server_app as app
    from common.item_factors import cohort_size

    nodes = [10 ** 12 + 7 * i for i in range(40)]  # Flower's node ids are large integers
    asked, counts = [], []

    centre_asked = []

    def query(grid, who, action, content, timeout):
        assert action in ("itemfactors", "usercentre") and content["config"]["item-factors-reg"] == 0.2
        (asked if action == "itemfactors" else centre_asked).append(list(who))
        assert "centre" not in content["item-factors"]  # devices fit against the item half alone meanwhile
        return list(who)

    def summed(replies, shapes, bound, noise, action, reproducible, clip_always):
        assert clip_always and (action == "usercentre") == (shapes == {"half": (3,)})
        return [np.full(shape, 3.0) for shape in shapes.values()]

    monkeypatch.setattr(app, "_query", query)
    monkeypatch.setattr(app, "_sum", summed)
    monkeypatch.setattr(app.ItemFactorTrainer, "step", lambda self, g, n: counts.append(n) or self.model)
    cfg = FederationConfig(item_stats=True, item_factors_rounds=6, item_factors_rank=2, item_factors_fraction=fraction,
                           dataset="ml-100k", reproducible=True, out_dir=str(tmp_path))
    monkeypatch.setattr(app, "load_movielens", lambda name: type("D", (), {"items": type("I", (), {
        "index": np.arange(1, 51)})})())
    app.release_item_factors(None, nodes, cfg, noise=0.0)
    size = cohort_size(len(nodes), fraction)
    assert size == (40 if fraction == 1.0 else 10 if fraction == 0.25 else 2)  # at least two, never one device
    assert len(asked) == 6 and all(len(a) == len(set(a)) == size and set(a) <= set(nodes) for a in asked)
    assert counts == [float(size)] * 6  # the step divides by the devices asked
    # then the population centre: one more query of a cohort, its sum divided by the devices asked, released
    assert len(centre_asked) == 1 and len(centre_asked[0]) == size and set(centre_asked[0]) <= set(nodes)
    released = dict(np.load(tmp_path / app.ITEM_FACTORS_FILE))
    np.testing.assert_allclose(released["centre"], np.full(3, 3.0 / size), rtol=1e-6)
    if fraction < 1.0:
        assert len({tuple(sorted(a)) for a in asked}) > 1  # a fresh sample each round
        again = []
        monkeypatch.setattr(app, "_query", lambda grid, who, *rest: again.append(list(who)) or list(who))
        app.release_item_factors(None, nodes, cfg, noise=0.0)
        assert again == asked + centre_asked  # a reproducible simulation replays its samples
    assert (tmp_path / app.ITEM_FACTORS_FILE).exists()


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



def test_discovery_noise_is_secret_unless_the_run_is_labelled_reproducible(monkeypatch):
    """Noise anyone could replay (numpy's global generator, seeded) could be subtracted from the discovery sums."""
    from flwr.supercore.task_identity import TaskIdentity

    for attr, value in (("_task_id", 1), ("_run_id", 1), ("_node_id", 0)):
        monkeypatch.setattr(TaskIdentity, attr, value)
    from server.server_app import _sum

    shapes = {"sums": (2, 3), "counts": (2,)}
    answers = [_answer(1, sums=np.ones((2, 3)), counts=[1, 0])]
    draws = {}
    for reproducible in (False, True):
        for attempt in range(2):
            np.random.seed(5)
            draws[reproducible, attempt] = _sum(answers, shapes, bound=1.0, noise=1.0, action="embed",
                                                reproducible=reproducible)[0]
    assert not np.allclose(draws[False, 0], draws[False, 1])
    np.testing.assert_array_equal(draws[True, 0], draws[True, 1])


DP = UserDP(noise_multiplier=1.0, clip=1.0, delta=1e-5)


def test_version_zero_carries_the_discovery_epsilon_and_delta(tmp_path):
    """Version 0's adapter is data-independent, but its persona comes from the discovery releases: under DP the
    registry row and manifest carry their (epsilon, delta), not a null delta."""
    cfg = FederationConfig(base_model="tiny", num_personas=2, out_dir=str(tmp_path))
    registry = PersonaRegistry(tmp_path, lora=cfg.lora, base_model="tiny")
    discovery = [(1.0, 1.0, 3)]
    heads, _ = starting_versions(registry, Rollouts(registry), cfg, version_zero_privacy(DP, discovery))
    for head in heads.values():
        row = registry.version(head)
        assert row["delta"] == 1e-5 and row["epsilon"] == pytest.approx(epsilon(discovery, 1e-5)) and row["epsilon"] > 0
        privacy = row["manifest"]["privacy"]
        assert privacy["dp"] and privacy["delta"] == 1e-5 and privacy["releases"] == [[1.0, 1.0, 3]]


def _release_round(strategy: PersonaStrategy, registry: PersonaRegistry, heads: dict, round_: int) -> None:
    """One DP round in which no device replies (noise-only releases), written to the registry as the ServerApp
    does (the version records the strategy's privacy dict)."""
    import numpy as np
    from flwr.app import ConfigRecord

    from server.strategy import join_personas

    def release(r, persona, arrays, devices, metrics, privacy):
        heads[persona] = registry.add_version(persona, r, arrays, devices, metrics, privacy, parent=heads[persona])

    strategy.on_release = release
    arrays = join_personas({p: registry.arrays(v) for p, v in heads.items()})

    class Grid:
        def get_node_ids(self):
            return list(strategy.node_persona)

    np.random.seed(round_)
    strategy.configure_train(round_, arrays, ConfigRecord(), Grid())
    strategy.aggregate_train(round_, [])


def test_a_resumed_persona_composes_its_lineage_and_never_reports_less_than_its_parent(tmp_path, monkeypatch):
    """A coordinator restart must not drop the releases earlier runs made: the resumed persona's next version
    composes its head's stored events, the new discovery and the new rounds."""
    from flwr.supercore.task_identity import TaskIdentity

    for attr, value in (("_task_id", 1), ("_run_id", 1), ("_node_id", 0)):
        monkeypatch.setattr(TaskIdentity, attr, value)
    cfg = FederationConfig(base_model="tiny", num_personas=1, out_dir=str(tmp_path))
    node_persona = {n: 0 for n in range(1, 6)}
    discovery = [(1.0, 1.0, 1)]
    for run in range(2):  # the first run, then a restart on the same registry
        registry = PersonaRegistry(tmp_path, lora=cfg.lora, base_model="tiny")
        heads, fresh = starting_versions(registry, Rollouts(registry), cfg, version_zero_privacy(DP, discovery))
        assert fresh == ({0} if run == 0 else set())
        histories = resumed_histories(registry, heads, fresh, discovery)
        strategy = PersonaStrategy(node_persona, fraction_train=0.2, dp=DP, prior_releases=histories)
        for round_ in (1, 2):
            _release_round(strategy, registry, heads, round_)
    chain, version = [], heads[0]
    while version is not None:
        chain.append(registry.version(version))
        version = chain[-1]["parent"]
    chain.reverse()
    assert [v["round"] for v in chain] == [0, 1, 2, 1, 2]
    full = [(1.0, 1.0, 1), (1.0, 0.2, 1), (1.0, 0.2, 1), (1.0, 1.0, 1), (1.0, 0.2, 1), (1.0, 0.2, 1)]
    assert chain[-1]["epsilon"] == pytest.approx(epsilon(full, 1e-5))  # two discoveries and four rounds
    assert [tuple(e) for e in chain[-1]["manifest"]["privacy"]["releases"]] == full
    eps = [v["epsilon"] for v in chain]
    assert all(child >= parent for parent, child in zip(eps, eps[1:])) and eps[3] > eps[2]


def test_a_dp_run_refuses_to_resume_from_a_version_released_without_dp(tmp_path):
    cfg = FederationConfig(base_model="tiny", num_personas=1, out_dir=str(tmp_path))
    registry = PersonaRegistry(tmp_path, lora=cfg.lora, base_model="tiny")
    heads, _ = starting_versions(registry, Rollouts(registry), cfg, version_zero_privacy(None, []))
    trained = registry.add_version(0, 1, registry.arrays(heads[0]), 3, parent=heads[0])  # a non-private release
    with pytest.raises(RuntimeError, match="without user-level DP"):
        resumed_histories(registry, {0: trained}, set(), [(1.0, 1.0, 1)])
    assert resumed_histories(registry, heads, set(), [(1.0, 1.0, 1)]) == {0: [(1.0, 1.0, 1)]}  # version 0: no data


def test_the_round_line_names_the_private_base_whatever_it_is():
    """The private base is MF with released item factors, else the user+item bias model: the console says "base"."""
    from server.server_app import round_summary

    metrics = {"train": {"p0_devices": 3, "train_loss": 1.2},
               "evaluate": {"users": 4, "persona_rmse": 1.01, "personal_rmse": 1.02, "bias_rmse": 1.03,
                            "personal_blend_rmse": 1.0, "personal_blend_weight": 0.5}}
    line = round_summary(2, 5, metrics, 7.0)
    assert line == ("round 2/5 | 3 devices trained, loss 1.200 | evaluation by 4 users: persona RMSE 1.0100, "
                    "personal RMSE 1.0200, private base 1.0300, personal + base 1.0000 (w 0.50) | 7 s")
    assert "private base" not in round_summary(2, 5, {"evaluate": {"users": 4, "persona_rmse": 1.0,
                                                                   "personal_rmse": 1.0}}, 1.0)


def test_without_any_valid_centre_answer_the_item_half_is_released_without_a_centre(monkeypatch, tmp_path):
    """Devices older than query.usercentre answer it with errors: the run goes on, and the release has no centre
    (devices then fit toward zero, as before the centre existed); the rounds' own answers are summed as usual."""
    import server.server_app as app

    real_sum = app._sum

    def summed(replies, shapes, bound, noise, action, reproducible, clip_always):
        if action == "usercentre":
            return real_sum(replies, shapes, bound, noise, action, reproducible, clip_always)  # refuses: no answer
        return [np.zeros(shape) for shape in shapes.values()]

    monkeypatch.setattr(app, "_query", lambda grid, who, action, *rest: [] if action == "usercentre" else list(who))
    monkeypatch.setattr(app, "_sum", summed)
    monkeypatch.setattr(app, "load_movielens", lambda name: type("D", (), {"items": type("I", (), {
        "index": np.arange(1, 21)})})())
    cfg = FederationConfig(item_stats=True, item_factors_rounds=2, item_factors_rank=2, dataset="ml-100k",
                           out_dir=str(tmp_path))
    model = app.release_item_factors(None, [1, 2, 3], cfg, noise=0.0)
    assert model.centre is None and "centre" not in dict(np.load(tmp_path / app.ITEM_FACTORS_FILE))


def test_fresh_personas_start_from_the_public_warm_start_labelled_as_such(tmp_path):
    """`warm-start`: every fresh persona's version 0 is the public adapter's weights (not a fresh LoRA), and its
    privacy record names the adapter's path and digest instead of calling it data-independent. A directory without
    an adapter, an adapter of another LoRA shape and one with NaN weights are refused before anything is written."""
    from common.adapters import adapter_arrays, adapter_digest, add_lora, save_adapter
    from common.config import LoraSettings
    from common.model import load_base_model
    from server.server_app import warm_start_dir

    cfg = FederationConfig(base_model="tiny", num_personas=2, out_dir=str(tmp_path / "run"))
    model = add_lora(load_base_model("tiny")[0], cfg.lora, seed=5)
    public = {k: np.random.default_rng(1).normal(0, 0.1, v.shape).astype(np.float32)
              for k, v in adapter_arrays(model).items()}
    save_adapter(model, public, tmp_path / "warm")
    warm = replace(cfg, warm_start=str(tmp_path / "warm"))
    registry = PersonaRegistry(tmp_path / "run", lora=cfg.lora, base_model="tiny")
    heads, fresh = starting_versions(registry, Rollouts(registry), warm, version_zero_privacy(None, []))
    assert fresh == {0, 1}
    for v in heads.values():
        assert all(np.array_equal(registry.arrays(v)[k], public[k]) for k in public)
        privacy = registry.version(v)["manifest"]["privacy"]
        assert privacy["warm_start"] == {"path": str((tmp_path / "warm").resolve()), "digest": adapter_digest(public)}
        assert "public warm start" in privacy["note"] and "data-independent" not in privacy["note"]
    # without it, version 0 is a fresh LoRA (B = 0) and says so
    plain = PersonaRegistry(tmp_path / "plain", lora=cfg.lora, base_model="tiny")
    heads, _ = starting_versions(plain, Rollouts(plain), replace(cfg, out_dir=str(tmp_path / "plain")),
                                 version_zero_privacy(None, []))
    assert "warm_start" not in plain.version(heads[0])["manifest"]["privacy"]
    assert all(not plain.arrays(heads[0])[k].any() for k in public if "lora_B" in k)

    with pytest.raises(ValueError, match="no PEFT adapter"):
        warm_start_dir(replace(cfg, warm_start=str(tmp_path / "missing")))
    other = add_lora(load_base_model("tiny")[0], LoraSettings(rank=4, alpha=8), seed=0)
    save_adapter(other, adapter_arrays(other), tmp_path / "rank4")
    nan = {k: np.full_like(v, np.nan) for k, v in public.items()}
    save_adapter(add_lora(load_base_model("tiny")[0], cfg.lora), public, tmp_path / "nan")
    from safetensors.numpy import save_file
    save_file(nan, str(tmp_path / "nan" / "adapter_model.safetensors"))
    for bad, why in (("rank4", "shape"), ("nan", "NaN")):
        refused = PersonaRegistry(tmp_path / f"r-{bad}", lora=cfg.lora, base_model="tiny")
        with pytest.raises(ValueError, match=why):
            starting_versions(refused, Rollouts(refused), replace(cfg, warm_start=str(tmp_path / bad)),
                              version_zero_privacy(None, []))
        assert refused.personas() == []
