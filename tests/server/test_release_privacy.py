"""What the coordinator releases under user-level DP: the round cohort is sampled the way it is accounted (Poisson,
from a secret generator), the reported epsilon upper-bounds an independent accountant's (Google's dp-accounting)
for that sampling, and pooled evaluation metrics of too few devices are withheld."""

import secrets

import dp_accounting
import numpy as np
import pytest
from dp_accounting import pld
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from common.config import LoraSettings, UserDP
from server.registry import PersonaRegistry
from server.rollouts import Rollouts
from server.strategy import PersonaStrategy, join_personas


@pytest.fixture(autouse=True)
def task_identity(monkeypatch):
    """Messages are stamped with the running task's identity, which Flower sets in a real run."""
    for attr, value in (("_task_id", 1), ("_run_id", 1), ("_node_id", 0)):
        monkeypatch.setattr(TaskIdentity, attr, value)


class Grid:
    def __init__(self, nodes):
        self.nodes = list(nodes)

    def get_node_ids(self):
        return self.nodes


def _adapter(value: float = 0.0) -> dict[str, np.ndarray]:
    return {"a.lora_A.weight": np.full((2, 3), value, np.float32), "a.lora_B.weight": np.full((3, 2), value, np.float32)}


def _cohorts(strategy: PersonaStrategy, rounds: int) -> list[list[int]]:
    arrays = join_personas({p: _adapter() for p in set(strategy.node_persona.values())})
    grid = Grid(strategy.node_persona)
    return [[m.metadata.dst_node_id for m in strategy.configure_train(r, arrays, ConfigRecord(), grid)]
            for r in range(1, rounds + 1)]


def test_dp_round_cohorts_are_secret_poisson_samples_at_the_accounted_rate():
    """Each device joins independently with probability q (the accountant's model): cohort sizes are
    Binomial(N, q), not a fixed size drawn without replacement, which the subsampled-Gaussian bound does not
    cover. The draw comes from the OS's CSPRNG: the same public seed gives other cohorts."""
    nodes = {n: n % 4 for n in range(200)}
    dp = UserDP(noise_multiplier=1.0, clip=1.0, delta=1e-5)
    strategy = PersonaStrategy(nodes, fraction_train=0.1, min_train_nodes=2, dp=dp, seed=0)
    assert strategy.sample_rate == 0.1
    cohorts = _cohorts(strategy, 300)
    sizes = np.array([len(c) for c in cohorts])
    n, q = len(nodes), 0.1
    assert sizes.mean() == pytest.approx(n * q, rel=0.06)
    assert sizes.var() == pytest.approx(n * q * (1 - q), rel=0.3)  # fixed-size sampling: variance 0
    inclusion = np.bincount([node for c in cohorts for node in c], minlength=n) / len(cohorts)
    assert inclusion.mean() == pytest.approx(q, rel=0.06)  # every device at the same rate q
    # Secret: another strategy with the same seed draws other cohorts (equal by chance: ~2^-100).
    again = PersonaStrategy(nodes, fraction_train=0.1, min_train_nodes=2, dp=dp, seed=0)
    assert isinstance(again._dp_rng, secrets.SystemRandom)
    assert _cohorts(again, 5) != cohorts[:5]
    # The labelled reproducible mode (simulations) replays its cohorts from the seed.
    seeded = [PersonaStrategy(nodes, fraction_train=0.1, dp=dp, seed=3, reproducible=True) for _ in range(2)]
    assert _cohorts(seeded[0], 5) == _cohorts(seeded[1], 5)


def _dp_accounting_epsilon(discovery: tuple[float, int], noise: float, q: float, steps: int, delta: float) -> float:
    """Google's dp-accounting PLD accountant (tight, independent of Opacus): discovery releases are plain
    Gaussians (every device takes part), rounds Poisson-subsampled Gaussians."""
    accountant = pld.PLDAccountant()
    accountant.compose(dp_accounting.GaussianDpEvent(discovery[0]), discovery[1])
    accountant.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(noise)), steps)
    return accountant.get_epsilon(delta)


@pytest.mark.parametrize("noise, nodes, fraction, steps", [(1.0, 5, 0.2, 1), (1.0, 10, 0.2, 20), (2.0, 50, 0.06, 30),
                                                           (0.8, 8, 0.5, 6)])
def test_reported_user_level_epsilon_upper_bounds_dp_accounting_for_the_sampling_done(noise, nodes, fraction, steps):
    """The epsilon a persona version reports, after discovery and `steps` rounds of the strategy, is at least
    what dp-accounting computes for the releases actually made (rate q Poisson sampling)."""
    dp = UserDP(noise_multiplier=noise, clip=1.0, delta=1e-5)
    strategy = PersonaStrategy({n: 0 for n in range(nodes)}, fraction_train=fraction, min_train_nodes=1, dp=dp,
                               prior_releases=[(noise, 1.0, 1)])
    reported = []
    strategy.on_release = lambda r, p, a, n, m, privacy: reported.append(privacy)
    arrays = join_personas({0: _adapter()})
    for r in range(1, steps + 1):
        strategy.configure_train(r, arrays, ConfigRecord(), Grid(range(nodes)))
        strategy.aggregate_train(r, [])  # noise-only releases: the accounting does not depend on who replied
    last = reported[-1]
    assert last["sample_rate"] == fraction and last["sampling"].startswith("poisson, secret")
    independent = _dp_accounting_epsilon((noise, 1), noise, last["sample_rate"], steps, 1e-5)
    assert last["epsilon"] >= independent * 0.999, (last["epsilon"], independent)
    assert last["epsilon"] <= independent * 1.3  # an upper bound, not a vacuous one


def _eval_reply(request: Message, sse: float, n: int, cold: int = 0) -> Message:
    metrics = MetricRecord({"persona_sse": sse, "persona_sae": float(np.sqrt(sse * n)), "personal_sse": sse,
                            "personal_sae": float(np.sqrt(sse * n)), "n": n, "cold": cold, "num-examples": 30,
                            "version": request.content["config"].get("version", -1)})
    return Message(content=RecordDict({"metrics": metrics}), reply_to=request)


def _evaluate(strategy: PersonaStrategy, round_: int, nodes: list[int], sse: dict[int, float] | None = None):
    arrays = join_personas({0: _adapter()})
    messages = list(strategy.configure_evaluate(round_, arrays, ConfigRecord(), Grid(nodes)))
    return strategy.aggregate_evaluate(round_, [_eval_reply(m, (sse or {}).get(m.metadata.dst_node_id, 4.0), 4)
                                                for m in messages])


def _registry(tmp_path):
    registry = PersonaRegistry(tmp_path, lora=LoraSettings(), base_model="tiny")
    rollouts = Rollouts(registry)
    v0 = registry.add_version(0, 0, _adapter(), 0)
    rollouts.make_stable(0, v0, "test")
    return registry, rollouts, v0


def test_pooled_evaluation_of_fewer_devices_than_the_minimum_is_withheld_everywhere(tmp_path):
    """One evaluation device: no overall, per-persona, per-bucket or per-version figure is released (the admin
    API reads the registry's), and repeated rounds by the same device never add up to a release."""
    registry, rollouts, v0 = _registry(tmp_path)
    strategy = PersonaStrategy({1: 0, 2: 0, 3: 0, 4: 0, 5: 0, 6: 0}, fraction_train=1.0, eval_nodes=[1],
                               eval_every=1, rollouts=rollouts, eval_min_devices=5)
    for round_ in (1, 2, 3, 4, 5):  # the same device five times is still one device
        out = _evaluate(strategy, round_, [1])
        assert not any(k.endswith(("rmse", "mae", "ratings", "users")) for k in (out or {})), out
    assert registry.evaluation(v0) == {"version": v0, "devices": 0, "ratings": 0, "rmse": None, "mae": None,
                                       "persona_blend_weight": None, "personal_blend_weight": None, "blend_devices": 0}

    everyone = PersonaStrategy({n: 0 for n in range(1, 7)}, fraction_train=1.0, eval_nodes=range(1, 7),
                               eval_every=1, rollouts=rollouts, eval_min_devices=5)
    out = _evaluate(everyone, 1, list(range(1, 7)))
    assert out["persona_rmse"] == pytest.approx(1.0) and out["users"] == 6 and out["p0_users"] == 6
    assert out["warm_users"] == 6 and "cold_users" not in out  # no cold device: nothing to withhold or show
    shown = registry.evaluation(v0)
    assert shown["devices"] == 6 and shown["rmse"] == pytest.approx(1.0)


def test_small_per_version_pools_wait_for_enough_distinct_devices_and_rollback_still_works(tmp_path):
    """A canary evaluated by a few devices a round is held back until five distinct devices are pooled; then
    the registry gets the pooled sums and the automatic rollback judges the canary as before."""
    registry, rollouts, v0 = _registry(tmp_path)
    v1 = registry.add_version(0, 1, _adapter(1.0), 3, parent=v0)
    rollouts.start_canary(0, v1, 50.0, "test")
    nodes = list(range(1, 31))
    serving = {n: rollouts.assign(n, 0) for n in nodes}
    canary = [n for n in nodes if serving[n] == v1]
    stable = [n for n in nodes if serving[n] == v0]
    assert len(canary) >= 6 and len(stable) >= 6
    strategy = PersonaStrategy({n: 0 for n in nodes}, fraction_train=1.0, eval_nodes=nodes, eval_every=1,
                               rollouts=rollouts, rollback=(0.05, 5), eval_min_devices=5)
    worse = {n: 9.0 for n in canary}  # canary RMSE 1.5 vs stable 1.0
    _evaluate(strategy, 1, stable + canary[:3], worse)  # the canary: 3 devices, withheld
    assert registry.evaluation(v1)["devices"] == 0 and registry.rollout(0)["canary"] == v1
    _evaluate(strategy, 2, stable + canary[:3], worse)  # the same 3 again: still 3 distinct devices
    assert registry.evaluation(v1)["devices"] == 0 and registry.rollout(0)["canary"] == v1
    _evaluate(strategy, 3, stable + canary[3:5], worse)  # 5 distinct devices pooled: released and judged
    assert registry.evaluation(v1)["devices"] == 3 + 3 + 2 and registry.evaluation(v1)["rmse"] == pytest.approx(1.5)
    assert registry.rollout(0)["canary"] is None and registry.version(v1)["state"] == "retired"  # rolled back
