"""PersonaStrategy: FedAvg of adapter deltas, separately for each persona.

The coordinator's whole model state is one ArrayRecord holding K persona adapters under keys "p{k}/<peft key>".
That keeps `Strategy.start` (rounds, timeouts, history) usable unchanged: `configure_train` sends each sampled
device only its persona's slice, and `aggregate_train` folds the example-weighted mean of the returned deltas
into that persona alone. A persona none of whose devices replied keeps its adapter and version. Replies are
streamed into one running float64 sum per persona (FedAvg's `aggregate_arrayrecords` wants every record at
once), so memory stays at K adapters however many devices reply. The robust options (`aggregation` =
"trimmed-mean" or "median", coordinate-wise and unweighted like Flower's FedTrimmedAvg and FedMedian, whose
`trim_mean` is reused) need a round's updates for a persona at once, so they hold them in memory.

With user-level DP (`dp`), the math of Flower's `DifferentialPrivacyServerSideFixedClipping`, per persona (the
wrapper itself clips against the whole joined state and divides by the round's total sample, so it cannot give
per-persona releases): each device's delta is clipped to `dp.clip`, the persona's clipped deltas are summed and
divided by the persona's *expected* number of sampled devices (sample rate x persona size, a public constant, so
the denominator reveals nothing about who took part), and Gaussian noise of std noise_multiplier x clip / that
denominator is added. Every persona is released every round, noise only if none of its devices replied, so the
accountant's Poisson-sampled Gaussian model holds; each persona's (epsilon, delta) comes from Opacus' RDP
accountant, composed with the persona-discovery releases, and goes into the version's manifest.
"""

from __future__ import annotations

import math
import random
import re
import secrets
from collections import defaultdict
from collections.abc import Callable, Iterable
from logging import INFO, WARNING

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from flwr.serverapp.strategy.fedtrimmedavg import trim_mean
from flwr.supercore.differential_privacy import (add_gaussian_noise_inplace, clip_inputs_inplace, compute_stdv,
                                                get_norm)

from common import blend, kslot, scoped_sums
from common.scoped_sums import ACTIVITY_EDGES, activity_bucket  # noqa: F401 -- also this module's public names
from common.scoped_sums import PAIRED_TERMS, paired_terms
from common.config import SERVER_LR_SCHEDULES, FederationConfig, SecureAggregation, UserDP
from common.timing import phase
from common.privacy import Event, epsilon, poisson_rate
from server.registry import BLEND_COLUMNS
from server.rollouts import Rollouts
from server.secure_aggregation import Aborted, read_advert, run_round


def clip(arrays: list[np.ndarray], bound: float) -> None:
    """Scale `arrays` in place to L2 norm at most `bound` (Flower's FlatClip); an all-zero contribution, e.g. a
    cold-start device's empty k-means slot, is already within it (Flower's helper would divide by its norm)."""
    if get_norm(arrays) > 0:
        clip_inputs_inplace(arrays, bound)


def add_noise(arrays: list[np.ndarray], std: float, reproducible: bool) -> list[np.ndarray]:
    """`arrays` + Gaussian noise of `std`. A predictable draw could be replayed and subtracted from a release, so
    each draw comes from a generator seeded from the OS's CSPRNG, except in a simulation labelled `reproducible`,
    which uses Flower's helper (numpy's global generator, which that simulation may seed)."""
    if reproducible:
        add_gaussian_noise_inplace(arrays, std)
        return arrays
    rng = np.random.default_rng(secrets.randbits(128))
    return [a + rng.normal(0.0, std, np.shape(a)) for a in arrays]


Arrays = dict[str, np.ndarray]
# (round, persona, new adapter, contributing devices, aggregated train metrics, privacy) -> version id or None
ReleaseHook = Callable[[int, int, Arrays, int, dict, dict], int | None]


def join_personas(personas: dict[int, Arrays]) -> ArrayRecord:
    return ArrayRecord({f"p{p}/{k}": Array(np.ascontiguousarray(v)) for p, arrs in sorted(personas.items())
                        for k, v in arrs.items()})


def split_personas(record: ArrayRecord) -> dict[int, Arrays]:
    out: dict[int, Arrays] = defaultdict(dict)
    for key, arr in record.items():
        persona, name = key.split("/", 1)
        out[int(persona[1:])][name] = arr.numpy()
    return dict(out)


def to_record(arrays: Arrays) -> ArrayRecord:
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})


def from_record(record: ArrayRecord) -> Arrays:
    return {k: a.numpy() for k, a in record.items()}


def update_norm(delta: Arrays) -> float:
    return float(math.sqrt(sum(float(np.sum(np.square(v, dtype=np.float64))) for v in delta.values())))


def check_update(delta: Arrays, reference: Arrays, max_norm: float = 0.0) -> str | None:
    """Why an update is unusable (wrong keys, shapes or dtype, non-finite values, L2 norm above `max_norm` when
    that is set), or None if it is fine. Only the adapter's own dtype (float32) is accepted: float64 or int
    deltas are no adapter update, and complex or unicode arrays would crash the norm and the sum."""
    if set(delta) != set(reference):
        return f"keys differ from the persona adapter ({len(set(delta) ^ set(reference))} mismatched)"
    for k, v in delta.items():
        if not isinstance(v, np.ndarray) or v.dtype != reference[k].dtype:
            return f"{k} has dtype {getattr(v, 'dtype', type(v).__name__)}, expected {reference[k].dtype}"
        if v.shape != reference[k].shape:
            return f"{k} has shape {v.shape}, expected {reference[k].shape}"
        if not np.isfinite(v).all():
            return f"{k} has NaN or Inf values"
    if max_norm and (norm := update_norm(delta)) > max_norm:
        return f"L2 norm {norm:.4g} is above the bound {max_norm:.4g}"
    return None


def read_update(record, reference: Arrays, max_norm: float = 0.0) -> tuple[Arrays | None, str | None]:
    """(delta, None) from a reply's "arrays" record, or (None, why it is unusable). Each Array's declared dtype
    and shape are checked before anything is deserialised, so a hostile reply cannot make the coordinator
    allocate more than an adapter's worth of memory."""
    if not isinstance(record, ArrayRecord):
        return None, f"'arrays' is a {type(record).__name__}, not an ArrayRecord"
    if set(record) != set(reference):
        return None, f"keys differ from the persona adapter ({len(set(record) ^ set(reference))} mismatched)"
    for k, arr in record.items():
        if arr.dtype != str(reference[k].dtype) or tuple(arr.shape) != reference[k].shape:
            return None, (f"{k} is declared {arr.dtype}{list(arr.shape)}, expected "
                          f"{reference[k].dtype}{list(reference[k].shape)}")
    try:
        delta = from_record(record)
    except Exception as e:  # noqa: BLE001 -- corrupt bytes: np.load raises ValueError, OSError, EOFError, ...
        return None, f"undecodable array ({type(e).__name__})"
    problem = check_update(delta, reference, max_norm)  # the bytes may disagree with the declared dtype/shape
    return (None, problem) if problem else (delta, None)


def real(value) -> float | None:
    """`value` as a finite float if it is a real number, else None: bools, lists, strings, NaN, Inf and ints
    beyond float range (MetricRecord accepts 10**400) are not."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        value = float(value)
    except OverflowError:
        return None
    return value if math.isfinite(value) else None


# Ratings are 1-5 and predictions expected ratings in [1, 5], so one held-out rating's error is at most 4:
# error sums beyond n x 4 (absolute) or n x 16 (squared) are impossible, whoever sends them.
MAX_RATING_ERROR = 4.0
EVAL_SUMS = ("persona_sse", "persona_sae", "personal_sse", "personal_sae")
# The L2 distance between a device's personal adapter and its persona's (persona adapters' own norm is ~10):
# far below this in any real run; the bound only keeps a device from overflowing the pooled sums.
MAX_PERSONAL_DISTANCE = 1e6
# With item statistics and a validation hold-out, devices also send the private bias model's test error sums and
# each adapter's blend sums (`common.blend`: r = y - b and d = p - b both lie in [-4, 4], so every sum of squares
# or products is within 16 per rating in absolute value). All or none of them.
BLEND_SUMS = ("bias_sse", "bias_sae", "n_val",
              *(f"{path}_{held_out}_{k}" for path in ("persona", "personal") for held_out in ("test", "val")
                for k in ("rd", "dd")))


def check_evaluation(metrics) -> str | None:
    """Why an evaluation reply's metrics are unusable (missing, non-numeric, negative or impossible error sums),
    or None. These sums drive canary rollbacks, so they are checked like updates."""
    if not isinstance(metrics, MetricRecord):
        return f"'metrics' is a {type(metrics).__name__}, not a MetricRecord"
    values = {k: real(metrics.get(k)) for k in (*EVAL_SUMS, "n", "num-examples")}
    if bad := [k for k, v in values.items() if v is None or v < 0]:
        return f"{bad} missing, not finite numbers or negative"
    n = values["n"]
    tolerance = 1e-6 * n + 1e-9  # float32 predictions may round just past [1, 5]
    for path in ("persona", "personal"):
        if values[f"{path}_sae"] > MAX_RATING_ERROR * n + tolerance or \
                values[f"{path}_sse"] > MAX_RATING_ERROR ** 2 * n + MAX_RATING_ERROR * tolerance:
            return f"{path} error sums exceed {MAX_RATING_ERROR:g} per rating over {n:g} ratings"
    if problem := _check_blend(metrics, n, tolerance):
        return problem
    for key, bound in (("cold", 1.0), ("personal_distance", MAX_PERSONAL_DISTANCE)):
        if key not in metrics:
            continue
        value = real(metrics[key])
        if value is None or not 0 <= value <= bound:
            return f"{key} must be a number in [0, {bound:g}], got {metrics[key]!r}"
    return None


def _check_blend(metrics: MetricRecord, n: float, tolerance: float) -> str | None:
    present = [k for k in BLEND_SUMS if k in metrics]
    if not present:
        return None
    if len(present) != len(BLEND_SUMS):
        return f"blend sums must come all together: missing {sorted(set(BLEND_SUMS) - set(present))}"
    values = {k: real(metrics[k]) for k in BLEND_SUMS}
    if bad := [k for k, v in values.items() if v is None]:
        return f"{bad} not finite numbers"
    n_val = values["n_val"]
    if not 0 <= n_val <= scoped_sums.MAX_HELD_OUT:
        return f"n_val must be in [0, {scoped_sums.MAX_HELD_OUT}], got {n_val:g}"
    square = MAX_RATING_ERROR ** 2
    limits = {"bias_sse": (0.0, square * n), "bias_sae": (0.0, MAX_RATING_ERROR * n)}
    for k in BLEND_SUMS[3:]:
        count = n if "_test_" in k else n_val
        limits[k] = (0.0 if k.endswith("_dd") else -square * count, square * count)
    for k, (lo, hi) in limits.items():
        slack = MAX_RATING_ERROR * tolerance
        if not lo - slack <= values[k] <= hi + slack:
            return f"{k} = {values[k]:g} is outside [{lo:g}, {hi:g}] for its ratings"
    return None


def blend_metrics(sums: dict[str, float], scope: str, prefix: str = "") -> dict[str, float]:
    """The private bias model's and each adapter's blend metrics of one scope, when every device in it sent blend
    sums: the weight from the pooled validation sums, the RMSE from the pooled test sums at that weight; from the
    pooled per-user terms (`common.scoped_sums.paired_terms`) each one's paired per-user MSE difference from the
    private bias model, mean and 95% interval (`<path>_vs_bias`, `<path>_blend_vs_bias`: _mean, _lo, _hi)."""
    users, n = sums.get(f"{scope}/users", 0), sums.get(f"{scope}/n", 0)
    if not n or sums.get(f"{scope}/blend_users", 0) != users:
        return {}
    out = {f"{prefix}bias_rmse": math.sqrt(sums[f"{scope}/bias_sse"] / n),
           f"{prefix}bias_mae": sums[f"{scope}/bias_sae"] / n}
    paired = round(sums.get(f"{scope}/paired_users", 0))  # a secure sum is an integer only up to rounding
    for path in ("persona", "personal"):
        w = blend.weight(sums[f"{scope}/{path}_val_rd"], sums[f"{scope}/{path}_val_dd"])
        sse = blend.sse(sums[f"{scope}/bias_sse"], sums[f"{scope}/{path}_test_rd"], sums[f"{scope}/{path}_test_dd"], w)
        out.update({f"{prefix}{path}_blend_rmse": math.sqrt(sse / n), f"{prefix}{path}_blend_weight": w})
        if paired < 2:
            continue
        t = {k: sums[f"{scope}/{path}_paired_{k}"] for k in PAIRED_TERMS}
        # the blend's per-user difference at w is -2 w a + w^2 b, so its sums follow from those of a, b and products
        blend_sum = -2 * w * t["a"] + w * w * t["b"]
        blend_sq = 4 * w * w * t["aa"] - 4 * w ** 3 * t["ab"] + w ** 4 * t["bb"]
        for name, (total, squares) in ((f"{path}_vs_bias", (t["e"], t["ee"])),
                                       (f"{path}_blend_vs_bias", (blend_sum, blend_sq))):
            mean, lo, hi = _interval(total, squares, paired)
            out.update({f"{prefix}{name}_mean": mean, f"{prefix}{name}_lo": lo, f"{prefix}{name}_hi": hi})
    return out


def _interval(total: float, squares: float, count: float) -> tuple[float, float, float]:
    """Mean and normal 95% interval of values known by their sum and sum of squares."""
    mean = total / count
    var = max(squares - count * mean * mean, 0.0) / (count - 1)
    half = 1.96 * math.sqrt(var / count)
    return mean, mean - half, mean + half


def served_metrics(sums: dict[str, float], prior_devices: float) -> dict[str, float]:
    """With several personas, what serving gives on this round's evaluation users: each persona's adapter blended
    with the private base at its own pooled validation weight plus `prior_devices` devices' worth of every
    persona's pool (`common.blend.shrunk_weight`, the rule `PersonaRegistry.serving_weights` applies to versions),
    the test SSE summed over personas: `<path>_served_rmse` and each persona's `p<j>_<path>_served_weight`. Empty
    with one persona (the blend rows are what is served) or unless every device of every persona sent blend sums.
    The registry fits a version on all its evaluations so far, this on the round's alone."""
    personas = sorted(k.split("/")[0] for k in sums if re.fullmatch(r"p\d+/n", k))
    n = sums.get("all/n", 0)
    if len(personas) < 2 or not n or any(sums.get(f"{p}/blend_users", 0) != sums.get(f"{p}/users", 0) or
                                         not sums.get(f"{p}/users", 0) for p in personas):
        return {}
    out, devices = {}, sum(sums[f"{p}/users"] for p in personas)
    for path in ("persona", "personal"):
        pool = [sum(sums[f"{p}/{path}_val_{x}"] for p in personas) for x in ("rd", "dd")]
        sse = 0.0
        for p in personas:
            w = blend.shrunk_weight(sums[f"{p}/{path}_val_rd"], sums[f"{p}/{path}_val_dd"], *pool, devices,
                                    prior_devices)
            sse += blend.sse(sums[f"{p}/bias_sse"], sums[f"{p}/{path}_test_rd"], sums[f"{p}/{path}_test_dd"], w)
            out[f"{p}_{path}_served_weight"] = w
        out[f"{path}_served_rmse"] = math.sqrt(sse / n)
    return out


class PersonaStrategy(FedAvg):
    def __init__(
        self,
        node_persona: dict[int, int],
        fraction_train: float,
        min_train_nodes: int = 1,
        eval_nodes: Iterable[int] = (),
        eval_every: int = 1,
        num_rounds: int | None = None,
        on_release: ReleaseHook | None = None,
        seed: int = 0,
        dp: UserDP | None = None,
        prior_releases: list[Event] | dict[int, list[Event]] = (),
        rollouts: Rollouts | None = None,
        rollback: tuple[float, int] = (0.05, 5),
        aggregation: str = "mean",
        trim_fraction: float = 0.2,
        max_update_norm: float = FederationConfig.max_update_norm,
        max_examples: float = FederationConfig.max_examples,
        sample_rate: float | None = None,
        reproducible: bool = False,
        eval_min_devices: int = FederationConfig.eval_min_devices,
        extra_content: dict[str, ArrayRecord] | None = None,
        secure: SecureAggregation | None = None,
        secure_timeout: float = FederationConfig.round_timeout,
        server_lr: float = FederationConfig.server_lr,
        server_lr_schedule: str = FederationConfig.server_lr_schedule,
        blend: bool = False,
        blend_prior_devices: float = FederationConfig.blend_prior_devices,
    ) -> None:
        """`dp`: user-level DP on every persona release; `prior_releases`: user-level events the persona's users
        already took part in (its lineage from earlier runs, then this run's persona discovery; one list for every
        persona or one per persona), composed into each persona's epsilon. Under `dp` each round's cohort is a
        Poisson sample, every online device independently with probability `sample_rate` (default: fraction_train,
        raised to expect min_train_nodes), drawn from `secrets.SystemRandom` unless `reproducible` (simulations:
        from `seed`). Pooled evaluation metrics of fewer than `eval_min_devices`
        devices are withheld. With `rollouts`, each evaluated
        device gets the version its bucket says (stable or canary), its metrics are pooled per version, and a
        canary worse than stable by `rollback` = (RMSE margin, minimum devices) is rolled back. `aggregation`,
        `trim_fraction`, `max_update_norm`, `max_examples`: see FederationConfig. `extra_content`: records every
        training and evaluation message carries besides the adapter (the released item statistics). With
        `secure`, each round's updates arrive as masked K-slot vectors and only their per-persona sums are
        unmasked (`_secure_sums`); `secure_timeout` bounds each of its three extra exchanges. `server_lr` scales
        each persona's aggregate delta before it is added (FedAvg's server step size; 1 = plain FedAvg), over the
        rounds as `server_lr_schedule` says (`server_step`). With `blend` and `rollouts`, each version's pooled
        validation blend sums go to the registry with its evaluation (`serve-blend`: the weights serving applies),
        and with several personas evaluation also reports what serving at per-persona weights leaning on the pool
        gives (`served_metrics`, `blend_prior_devices`)."""
        if not 0 < server_lr < float("inf"):
            raise ValueError(f"server_lr must be finite and > 0, got {server_lr}")
        if server_lr_schedule not in SERVER_LR_SCHEDULES:
            raise ValueError(f"server_lr_schedule must be one of {SERVER_LR_SCHEDULES}, got {server_lr_schedule!r}")
        if server_lr_schedule == "cosine" and not num_rounds:
            raise ValueError("server_lr_schedule 'cosine' needs num_rounds (it decays over the whole run)")
        self.server_lr = float(server_lr)
        self.server_lr_schedule = server_lr_schedule
        if aggregation not in ("mean", "trimmed-mean", "median"):
            raise ValueError(f"unknown aggregation {aggregation!r}")
        if secure and aggregation != "mean":
            raise ValueError(f"aggregation {aggregation!r} needs single updates, which secure aggregation hides "
                             "from the coordinator; use aggregation='mean'")
        if dp and aggregation != "mean":
            raise ValueError("robust aggregation cannot be combined with user-level DP")
        super().__init__(fraction_train=fraction_train, min_train_nodes=min_train_nodes, min_available_nodes=1,
                         min_evaluate_nodes=0, weighted_by_key="num-examples")
        self.node_persona = dict(node_persona)
        self.extra_content = dict(extra_content or {})
        self.eval_nodes = [n for n in eval_nodes if n in self.node_persona]
        self.eval_every = eval_every
        self.num_rounds = num_rounds
        self.on_release = on_release
        self._rng = random.Random(seed)
        # Subsampling amplifies privacy only while the cohort is secret: under DP it is drawn from the OS's CSPRNG.
        self._dp_rng = random.Random(seed) if reproducible or not dp else secrets.SystemRandom()
        self.reproducible = reproducible
        self._current: dict[int, Arrays] = {}
        self.dp = dp
        self.sizes = dict(zip(*np.unique(list(self.node_persona.values()), return_counts=True))) \
            if self.node_persona else {}
        prior = prior_releases if isinstance(prior_releases, dict) else {p: prior_releases for p in self.sizes}
        self.privacy_history: dict[int, list[Event]] = {p: [tuple(e) for e in prior.get(p, ())] for p in self.sizes}
        self._fixed_rate = sample_rate
        self._sample_rate = 0.0
        self.eval_min_devices = eval_min_devices
        # Per version: evaluation sums not yet in the registry (`VERSION_SUMS`), and the distinct devices they pool.
        self._pending: dict[int, tuple[list[float], set[int]]] = {}
        self.blend = blend
        self.blend_prior_devices = float(blend_prior_devices)
        self.rollouts = rollouts
        self.rollback_margin, self.rollback_min_devices = rollback
        self._served: dict[int, int] = {}  # evaluation node -> version sent
        self.aggregation, self.trim_fraction, self.max_update_norm = aggregation, trim_fraction, max_update_norm
        self.max_examples = max_examples
        self._sent: dict[str, set[int]] = {}  # message type -> nodes asked this round: only they may reply
        self.secure, self.secure_timeout = secure, secure_timeout
        self._grid: Grid | None = None  # the secure round's extra exchanges go through the round's grid
        self._secure_round: dict = {}  # this round's public protocol parameters
        self._secure_eval: dict = {}  # and the evaluation round's
        # Per round, the aggregated train and evaluate metrics as they come (Flower's result has them only at the
        # end): the ServerApp's one progress line per round reads them.
        self.round_metrics: dict[int, dict[str, MetricRecord | None]] = defaultdict(dict)

    @property
    def sample_rate(self) -> float:
        """Each online device's probability of joining a round under user-level DP (public, fixed for the run)."""
        if self._fixed_rate is not None:
            return self._fixed_rate
        return poisson_rate(self.fraction_train, self.min_train_nodes, len(self.node_persona))

    def summary(self) -> None:
        sizes = np.bincount(list(self.node_persona.values())) if self.node_persona else []
        log(INFO, "\t├── Personas: %d, devices per persona %s", len(sizes), list(map(int, sizes)))
        log(INFO, "\t├── Aggregation %s%s, update norm bound %s", self.aggregation,
            f" (trim {self.trim_fraction})" if self.aggregation == "trimmed-mean" else "",
            self.max_update_norm or "none")
        log(INFO, "\t└── Train fraction %.3f, evaluation devices %d every %d rounds",
            self.fraction_train, len(self.eval_nodes), self.eval_every)

    def _messages(self, nodes: list[int], arrays: ArrayRecord, config: ConfigRecord, kind: str) -> list[Message]:
        personas = split_personas(arrays)
        self._current = personas
        records = {p: to_record(arrs) for p, arrs in personas.items()}  # one per persona, shared by its messages
        self._sent[kind] = set(nodes)
        messages = []
        for node in nodes:
            persona = self.node_persona[node]
            cfg = ConfigRecord({**dict(config), "persona": persona})
            content = RecordDict({"arrays": records[persona], "config": cfg, **self.extra_content})
            messages.append(Message(content=content, message_type=kind, dst_node_id=node))
        return messages

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        online = set(grid.get_node_ids())
        # Drawn in `node_persona`'s order (the coordinator's stable device order), so a seed replays the cohorts.
        eligible = [n for n in self.node_persona if n in online]
        if self.dp:
            # Poisson sampling, as the accountant's subsampled Gaussian assumes (a fixed-size draw without
            # replacement is not bounded by it): each online device independently with the public rate q.
            nodes = [n for n in eligible if self._dp_rng.random() < self.sample_rate]
            self._sample_rate = self.sample_rate
        else:
            size = min(len(eligible), max(math.ceil(self.fraction_train * len(eligible)), self.min_train_nodes))
            nodes = sorted(self._rng.sample(eligible, size))
            self._sample_rate = size / len(eligible) if eligible else 0.0
        log(INFO, "configure_train: %d of %d devices", len(nodes), len(eligible))
        config["server-round"] = server_round
        if not self.secure:
            return self._messages(nodes, arrays, config, MessageType.TRAIN)
        self._grid = grid
        if len(nodes) < 2:  # a "sum" of one device is its update: nothing can be aggregated securely
            log(WARNING, "round %d: %d devices sampled, secure aggregation needs 2; no round", server_round, len(nodes))
            self._secure_round = {}
            self._current = split_personas(arrays)
            self._sent[SECURE_TRAIN] = set()
            return []
        # Public parameters, the same for every device of the round: quantisation levels such that the whole
        # cohort's sum cannot wrap around the modulus, and the threshold as a device count.
        self._secure_round = {
            "secagg-round": secrets.randbits(62), "secagg-k": len(split_personas(arrays)),
            "secagg-threshold": max(2, math.ceil(self.secure.threshold * len(nodes))),
            "secagg-levels": kslot.levels_for(len(nodes)), "secagg-range": self.secure.coord_range,
            "secagg-clip": self.secure.clip}
        config.update(self._secure_round)
        return self._messages(nodes, arrays, config, SECURE_TRAIN)

    @phase("coordinator: aggregation")
    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        arrays, metrics = self._aggregate_train(server_round, replies)
        self.round_metrics[server_round]["train"] = metrics
        return arrays, metrics

    def _aggregate_train(self, server_round: int,
                         replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Stream the replies into one running sum per persona: no list of all updates is ever held."""
        counts = {"failed": 0, "skipped": 0, "rejected": 0, "refused": 0}
        if self.secure:
            running = self._secure_sums(server_round, replies, counts)
            if running is None:  # aborted: nothing is released, every persona keeps its version
                return None, MetricRecord({**counts, "secagg_aborted": 1})
            return self._release(server_round, running, counts, None)
        running: dict[int, _Running] = {}
        max_norm = 0.0  # of accepted updates, before any clipping: what an operator sets max-update-norm from
        seen: set[int] = set()
        for msg in replies:
            node = msg.metadata.src_node_id
            if msg.has_error():
                log(WARNING, "node %s failed this round: %s", node, msg.error.reason)
                counts["failed"] += 1
                continue
            outcome = self._read_train_reply(msg, seen)
            seen.add(node)
            if isinstance(outcome, str):
                log(WARNING, "rejected reply from node %s: %.300s", node, outcome)  # its claims may be long
                counts["rejected"] += 1
                continue
            if outcome is None:
                counts["skipped"] += 1
                continue
            persona, delta, weight, metrics = outcome
            max_norm = max(max_norm, update_norm(delta))
            acc = running.setdefault(persona, _Running(self._current[persona], keep=self.aggregation != "mean"))
            arrays = [delta[k].astype(np.float64) for k in acc.keys]
            if self.dp:  # user-level DP: each device's delta clipped, every device weighs the same
                clip(arrays, self.dp.clip)
                weight = 1.0
            acc.add(arrays, weight, metrics)
        return self._release(server_round, running, counts, max_norm)

    def server_step(self, server_round: int) -> float:
        """The step size on round `server_round`'s mean delta (1-based): server_lr, constant, or with "cosine" from
        server_lr at round 1 down towards 0 at the last round (half a cosine period), so late rounds refine what
        early ones learnt instead of replacing it with another small cohort's noise."""
        if self.server_lr_schedule == "constant":
            return self.server_lr
        progress = min(max(server_round - 1, 0), self.num_rounds) / self.num_rounds
        return self.server_lr * 0.5 * (1.0 + math.cos(math.pi * progress))

    def _release(self, server_round: int, running: dict[int, "_Running"], counts: dict[str, int],
                 max_norm: float | None) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Each persona's new version from its aggregate (plain or secure), through DP when that is on."""
        new = {p: dict(arrs) for p, arrs in self._current.items()}
        step = self.server_step(server_round)
        metrics = MetricRecord({"server_step": step})
        # Under DP every persona is released every round (noise only without updates); otherwise only updated ones.
        released = [p for p in sorted(self._current) if self.sizes.get(p, 0)] if self.dp else sorted(running)
        for persona in list(released):
            acc = running.get(persona) or _Running(self._current[persona])
            if self.dp:
                mean_delta, privacy = self._private_mean(persona, acc)
                metrics[f"p{persona}_epsilon"] = privacy["epsilon"]
            else:
                mean_delta, privacy = acc.combine(self.aggregation, self.trim_fraction), {"dp": False}
            with np.errstate(over="ignore", invalid="ignore"):  # an overflow is caught just below
                # The server step: post-processing of the (noised, under DP) aggregate, so it costs no privacy.
                candidate = {k: (v + step * mean_delta[k]).astype(np.float32)
                             for k, v in self._current[persona].items()}
            if not all(np.isfinite(v).all() for v in candidate.values()):
                # Never stored, served or promoted: a NaN/Inf version would be refused by every device, and
                # training from it would stop for good. The persona keeps its version this round.
                log(WARNING, "persona %d: the aggregate is not finite; release refused", persona)
                counts["refused"] += 1
                released.remove(persona)
                continue
            new[persona] = candidate
            persona_metrics = acc.mean_metrics()
            for key, value in persona_metrics.items():
                metrics[f"p{persona}_{key}"] = value
            metrics[f"p{persona}_devices"] = acc.devices  # the coordinator's own history: it saw every reply
            if self.on_release:
                # What leaves the coordinator (registry, manifest, admin API) under user-level DP is the public
                # expected cohort, never the exact count: the accountant covers the noised sum, not who took part.
                published = round(privacy["expected_devices"]) if self.dp else acc.devices
                self.on_release(server_round, persona, new[persona], published, persona_metrics, privacy)
        if running:
            metrics.update(_Running.pooled(running.values()))
        metrics.update(counts)
        if not released:  # the counts of what went wrong are still kept in the history, if anything arrived
            return None, (metrics if any(counts.values()) else None)
        if not self.dp and max_norm is not None:  # a single device's statistic: not in DP or secure runs
            metrics["max_update_norm"] = max_norm
        return join_personas(new), metrics

    def _secure_sums(self, server_round: int, replies: Iterable[Message],
                     counts: dict[str, int]) -> dict[int, "_Running"] | None:
        """The secure round after the train replies: run the protocol's three other exchanges, unmask the sum of
        the survivors' K-slot vectors and decode it into per-persona sums and counts (bounded: `bound_sums`).
        None when the round aborts (too few devices at some stage, or a sum no honest devices could produce)."""
        params, adverts, seen = self._secure_round, {}, set()
        asked = self._sent.get(SECURE_TRAIN, set())
        for msg in replies:
            node = msg.metadata.src_node_id
            if msg.has_error():
                log(WARNING, "node %s failed this round: %s", node, msg.error.reason)
                counts["failed"] += 1
                continue
            metrics = msg.content["metrics"] if "metrics" in msg.content else None
            keys = read_advert(msg)
            if node not in asked or node in seen:
                problem = "not a device asked to train this round, or a second reply"
            elif isinstance(metrics, MetricRecord) and metrics.get("skipped"):
                counts["skipped"] += 1
                seen.add(node)
                continue
            else:
                problem = None if keys is not None else "no public keys of the right form"
            seen.add(node)
            if problem:
                log(WARNING, "rejected reply from node %s: %s", node, problem)
                counts["rejected"] += 1
                continue
            adverts[node] = keys
        if not params:
            return None
        shapes = {k: v.shape for k, v in next(iter(self._current.values())).items()}
        k = params["secagg-k"]
        length = k * kslot.layout(shapes)[1] + k
        try:
            total, survivors = run_round(self._grid, adverts, params["secagg-threshold"], length,
                                         params["secagg-round"], self.secure_timeout)
            sums, persona_counts = kslot.decode(total, len(survivors), shapes, k, params["secagg-range"],
                                                params["secagg-levels"])
        except (Aborted, ValueError) as e:
            log(WARNING, "round %d: secure aggregation aborted, nothing released: %s", server_round, e)
            return None
        counts["secagg_dropped"] = len(adverts) - len(survivors)
        sums, clipped = bound_sums(sums, persona_counts, params["secagg-clip"], params["secagg-range"],
                                   kslot.step(params["secagg-range"], params["secagg-levels"]))
        if clipped:
            log(WARNING, "round %d: persona sums %s exceeded what their devices could send honestly; bounded",
                server_round, clipped)
            counts["secagg_bounded"] = len(clipped)
        running = {}
        for persona, count in enumerate(persona_counts):
            if count > 0 and persona in self._current:
                acc = _Running(self._current[persona])
                acc.sum = [sums[persona][key] for key in acc.keys]
                acc.weight = acc.devices = int(count)
                running[persona] = acc
        return running

    def _read_train_reply(self, msg: Message, seen: set[int]) -> str | None | tuple[int, Arrays, float, MetricRecord]:
        """(persona, delta, weight, metrics) of a usable update, None for a device that skipped the round, or why
        the reply is rejected. The persona is always the coordinator's own: a reply claiming another is rejected,
        never re-routed into that persona's aggregate."""
        node, content = msg.metadata.src_node_id, msg.content
        persona = self.node_persona.get(node)
        if persona is None or persona not in self._current or node not in self._sent.get(MessageType.TRAIN, ()):
            return "not a device asked to train this round"
        if node in seen:
            return "a second reply this round"
        metrics = content["metrics"] if "metrics" in content else None
        if not isinstance(metrics, MetricRecord):
            return f"'metrics' is a {type(metrics).__name__}, not a MetricRecord"
        # The claim is optional (routing never relies on it), but a device that names another persona is broken
        # or lying.
        if "persona" in metrics and real(metrics["persona"]) != persona:
            return f"claims persona {metrics['persona']!r}, but it is in persona {persona}"
        if metrics.get("skipped"):
            status = content["status"] if "status" in content else None
            reason = dict(status) if isinstance(status, ConfigRecord) else "no reason given"
            log(INFO, "node %s skipped the round: %.200s", node, reason)
            return None
        delta, problem = read_update(content["arrays"] if "arrays" in content else None, self._current[persona],
                                     0.0 if self.dp else self.max_update_norm)
        if problem:
            return problem
        weight = 1.0
        if not self.dp:  # under DP every device weighs the same and a reply need not carry an example count
            weight = real(metrics.get("num-examples"))
            if weight is None or weight <= 0:
                return f"num-examples must be a positive finite number, got {metrics.get('num-examples')!r}"
            # A device's example count is its own claim: capped, so one device cannot set its persona's mean.
            weight = min(weight, self.max_examples)
        if bad := [k for k in TRAIN_METRICS if k in metrics and real(metrics[k]) is None]:
            return f"{bad} not finite numbers"
        return persona, delta, weight, metrics

    def _private_mean(self, persona: int, acc: "_Running") -> tuple[Arrays, dict]:
        """Clipped sum / expected devices + Gaussian noise (Flower's DP helpers), and the persona's new epsilon."""
        expected = self.sample_rate * self.sizes[persona]
        mean = [t / expected for t in acc.sum]
        mean = add_noise(mean, compute_stdv(self.dp.noise_multiplier, self.dp.clip, expected), self.reproducible)
        self.privacy_history[persona].append((self.dp.noise_multiplier, self.sample_rate, 1))
        eps = epsilon(self.privacy_history[persona], self.dp.delta)
        return dict(zip(acc.keys, mean)), {"dp": True, "level": "user", "epsilon": eps, "delta": self.dp.delta,
                                           "noise_multiplier": self.dp.noise_multiplier, "clip": self.dp.clip,
                                           "sample_rate": self.sample_rate, "expected_devices": expected,
                                           "sampling": "poisson, seeded (reproducible simulation: not secret)"
                                           if self.reproducible else "poisson, secret (secrets.SystemRandom)",
                                           "releases": [list(e) for e in self.privacy_history[persona]]}

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        last = self.num_rounds is not None and server_round == self.num_rounds
        self._secure_eval = {}  # set below only when this round evaluates securely
        if not self.eval_nodes or (server_round % self.eval_every and not last):
            return []
        config["server-round"] = server_round
        online = set(grid.get_node_ids())
        nodes = [n for n in self.eval_nodes if n in online]
        if self.secure and len(nodes) < 2:
            log(WARNING, "evaluation round %d: %d devices online, secure aggregation needs 2; no evaluation",
                server_round, len(nodes))
            self._sent[SECURE_EVALUATE] = set()
            return []
        kind = SECURE_EVALUATE if self.secure else MessageType.EVALUATE
        self._grid = grid
        messages = self._messages(nodes, arrays, config, kind)
        if self.rollouts is not None:
            self._served = {}
            payloads: dict[int, ArrayRecord] = {}
            for node, message in zip(nodes, messages):
                version = self.rollouts.assign(node, self.node_persona[node])
                if version is None:
                    continue
                if version not in payloads:
                    payloads[version] = to_record(self.rollouts.registry.arrays(version))
                message.content["arrays"] = payloads[version]
                message.content["config"]["version"] = version
                self._served[node] = version
        if self.secure:
            # Every scope the plain evaluation pools, and one per served version (canary judgement); a device
            # writes its statistics into its own scopes and zeros into the rest.
            personas = sorted(set(self.node_persona.values()))
            versions = sorted(set(self._served.values())) if self.rollouts is not None else []
            scopes = ["all", *(f"p{p}" for p in personas), "cold", "warm",
                      *(activity_bucket(lo) for lo in (0, *ACTIVITY_EDGES)), *(f"v{v}" for v in versions)]
            self._secure_eval = {"secagg-round": secrets.randbits(62), "secagg-scopes": scopes,
                                 "secagg-threshold": max(2, math.ceil(self.secure.threshold * len(nodes))),
                                 "secagg-levels": kslot.levels_for(len(nodes))}
            for message in messages:
                for key, value in self._secure_eval.items():
                    message.content["config"][key] = value
        return messages

    @phase("coordinator: aggregation")
    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        metrics = self._aggregate_evaluate(server_round, replies)
        self.round_metrics[server_round]["evaluate"] = metrics
        return metrics

    def _aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        counts = {"failed": 0, "rejected": 0}
        if self.secure and not self._secure_eval:  # no evaluation this round: nothing to aggregate or abort
            return None
        if self.secure:
            scoped = self._secure_evaluation(server_round, replies, counts)
            if scoped is None:
                return MetricRecord({**counts, "secagg_aborted": 1})
            sums, pooled = scoped
        else:
            sums, pooled = self._plain_evaluation(replies, counts)
        if not sums:
            return MetricRecord(counts) if any(counts.values()) else None
        if self.rollouts is not None:
            self._record_versions(pooled)
        out = MetricRecord(counts)
        for scope in sorted({k.split("/")[0] for k in sums}):
            n = sums[f"{scope}/n"]
            if n == 0:
                continue
            if sums[f"{scope}/users"] < self.eval_min_devices:  # a pool of one or two is those users' own figure
                log(INFO, "evaluation round %d: %s metrics withheld (%d devices, below eval-min-devices %d)",
                    server_round, scope, sums[f"{scope}/users"], self.eval_min_devices)
                continue
            prefix = "" if scope == "all" else f"{scope}_"
            for path in ("persona", "personal"):
                out[f"{prefix}{path}_rmse"] = math.sqrt(sums[f"{scope}/{path}_sse"] / n)
                out[f"{prefix}{path}_mae"] = sums[f"{scope}/{path}_sae"] / n
            # Mean L2 distance between a device's personal adapter and its persona's: how far devices drift.
            out[f"{prefix}personal_distance"] = sums[f"{scope}/personal_distance"] / sums[f"{scope}/users"]
            out[f"{prefix}ratings"] = n
            out[f"{prefix}users"] = sums[f"{scope}/users"]
            out.update(blend_metrics(sums, scope, prefix))
        if self.blend:
            out.update(served_metrics(sums, self.blend_prior_devices))
        return out

    def _plain_evaluation(self, replies: Iterable[Message], counts: dict[str, int]) -> tuple[dict, dict]:
        """Validated replies pooled per scope ("scope/field" -> sum), and per served version
        (version -> (its `VERSION_SUMS`, distinct nodes))."""
        valid, seen = [], set()
        for msg in replies:
            node = msg.metadata.src_node_id
            if msg.has_error():
                log(WARNING, "node %s failed to evaluate: %s", node, msg.error.reason)
                counts["failed"] += 1
                continue
            if node not in self.node_persona or node not in self._sent.get(MessageType.EVALUATE, ()):
                problem = "not a device asked to evaluate this round"
            elif node in seen:
                problem = "a second reply this round"
            else:
                problem = check_evaluation(msg.content["metrics"] if "metrics" in msg.content else None)
            if problem:
                log(WARNING, "rejected evaluation from node %s: %.300s", node, problem)
                counts["rejected"] += 1
                continue
            seen.add(node)
            valid.append(msg)
        sums: dict[str, float] = defaultdict(float)
        pooled: dict[int, tuple[list[float], set[int]]] = {}
        for msg in valid:
            node, m = msg.metadata.src_node_id, msg.content["metrics"]
            persona = self.node_persona.get(node)
            bucket = "cold" if m.get("cold") else "warm"
            for scope in ("all", f"p{persona}", bucket, activity_bucket(int(m["num-examples"]))):
                for key in ("persona_sse", "persona_sae", "personal_sse", "personal_sae", "n"):
                    sums[f"{scope}/{key}"] += float(m[key])
                sums[f"{scope}/users"] += 1
                sums[f"{scope}/personal_distance"] += float(m.get("personal_distance", 0.0))
                if "bias_sse" in m:  # checked: all blend sums or none
                    sums[f"{scope}/blend_users"] += 1
                    for key in BLEND_SUMS:
                        sums[f"{scope}/{key}"] += float(m[key])
                    if float(m["n"]) > 0:  # a device with no test rating has no per-user difference
                        sums[f"{scope}/paired_users"] += 1
                        for key, value in paired_terms(m).items():
                            sums[f"{scope}/{key}"] += value
            if self.rollouts is None:
                continue
            version = self._served.get(node)
            if version is None or m.get("version") != version:
                log(WARNING, "evaluation from node %s is not tagged with the version it was sent (%s); not pooled",
                    node, version)
                continue
            held, nodes = pooled.setdefault(version, ([0.0] * len(VERSION_SUMS), set()))
            for i, key in enumerate(VERSION_SUMS):
                held[i] += 1.0 if key == "users" else float("bias_sse" in m) if key == "blend_users" else \
                    float(m.get(key, 0.0))  # checked: the blend sums come all together or not at all
            nodes.add(node)
        return sums, pooled

    def _secure_evaluation(self, server_round: int, replies: Iterable[Message],
                           counts: dict[str, int]) -> tuple[dict, dict] | None:
        """The evaluation round's statistics through secure aggregation: only every scope's pooled sums are
        unmasked (`common.scoped_sums`). None when the round aborts."""
        params, adverts, seen = self._secure_eval, {}, set()
        asked = self._sent.get(SECURE_EVALUATE, set())
        for msg in replies:
            node = msg.metadata.src_node_id
            if msg.has_error():
                log(WARNING, "node %s failed to evaluate: %s", node, msg.error.reason)
                counts["failed"] += 1
                continue
            keys = read_advert(msg)
            if node not in asked or node in seen or keys is None:
                log(WARNING, "rejected evaluation from node %s: unasked, a second reply, or no public keys", node)
                counts["rejected"] += 1
                continue
            seen.add(node)
            adverts[node] = keys
        scopes = list(params["secagg-scopes"])
        try:
            total, survivors = run_round(self._grid, adverts, params["secagg-threshold"],
                                         len(scopes) * len(scoped_sums.FIELDS), params["secagg-round"],
                                         self.secure_timeout)
            table = scoped_sums.decode(total, len(survivors), scopes, params["secagg-levels"])
        except (Aborted, ValueError) as e:
            log(WARNING, "evaluation round %d: secure aggregation aborted, nothing pooled: %s", server_round, e)
            return None
        counts["secagg_dropped"] = len(adverts) - len(survivors)
        # Version scopes feed the canary pools only, as in a plain evaluation; the rest the pooled metrics.
        sums = {f"{scope}/{field}": value for scope, row in table.items() if row["users"] and not scope.startswith("v")
                for field, value in row.items()}
        pooled = {}
        for scope, row in table.items():
            if scope.startswith("v") and row["users"]:
                version = int(scope[1:])
                # Which survivors were served this version is the coordinator's own routing, not device data.
                nodes = {n for n in survivors if self._served.get(n) == version}
                pooled[version] = ([row[key] for key in VERSION_SUMS], nodes)
        return sums, pooled

    def _record_versions(self, pooled: dict[int, tuple[list[float], set[int]]]) -> None:
        """Add this round's per-version pools to those held back, then let rollouts judge each running canary."""
        for version, (sums, nodes) in pooled.items():
            # The registry (and the admin API reading it) only ever gets sums pooling eval_min_devices distinct
            # devices: smaller pools wait for later evaluation rounds of the same version.
            held, seen = self._pending.get(version, ([0.0] * len(VERSION_SUMS), set()))
            held, seen = [a + b for a, b in zip(held, sums)], seen | nodes
            if len(seen) < self.eval_min_devices:
                self._pending[version] = (held, seen)
                log(INFO, "version %d: evaluation by %d devices withheld (below eval-min-devices %d)", version,
                    len(seen), self.eval_min_devices)
                continue
            self._pending.pop(version, None)
            pool = dict(zip(VERSION_SUMS, held))
            users = round(pool["users"])  # a secure sum is an integer only up to rounding
            # a weight only from a pool in which every device sent its validation sums
            blend_ = {column: pool[VALIDATION_SUMS[column]] for column in BLEND_COLUMNS} \
                if self.blend and users and round(pool["blend_users"]) == users else None
            self.rollouts.record_evaluation(version, pool["persona_sse"], pool["persona_sae"], pool["n"], users,
                                            blend_)
        for persona in sorted(set(self.node_persona.values())):
            if self.rollouts.check_canary(persona, self.rollback_margin, self.rollback_min_devices):
                log(WARNING, "persona %d: canary rolled back automatically", persona)


TRAIN_METRICS = ("train_loss", "tokens_per_s", "gflops_per_s")
# What evaluation pools per served version: error sums for canary judgement, and the validation blend sums its
# serving weights are fitted on (`serve-blend`)
VERSION_SUMS = ("persona_sse", "persona_sae", "n", "users", "blend_users",
                "persona_val_rd", "persona_val_dd", "personal_val_rd", "personal_val_dd")
VALIDATION_SUMS = {"persona_rd": "persona_val_rd", "persona_dd": "persona_val_dd",  # registry column: its sum
                   "personal_rd": "personal_val_rd", "personal_dd": "personal_val_dd"}
SECURE_TRAIN = f"{MessageType.TRAIN}.secagg"  # train, then answer with the first secure-aggregation message
SECURE_EVALUATE = f"{MessageType.EVALUATE}.secagg"  # evaluate, likewise


def bound_sums(sums: dict[int, Arrays], counts, clip: float, coord_range: float,
               step: float) -> tuple[dict[int, Arrays], list[int]]:
    """Each persona's decoded sum limited to what its `counts[p]` devices could have sent honestly: every
    coordinate within count x range, the L2 norm within count x clip (devices clip to clip minus the worst
    rounding, `kslot.encode`). Masking hides single vectors, so a device could have sent anything modulo
    2**32; this is what bounds its influence (docs/secure_aggregation.md). Returns the sums and the personas
    that had to be bounded."""
    out, bounded = {}, []
    for p, arrays in sums.items():
        n = int(counts[p])
        limited = {k: np.clip(v, -n * coord_range, n * coord_range) for k, v in arrays.items()}
        norm = update_norm(limited)
        if norm > n * clip:
            limited = {k: v * (n * clip / norm) for k, v in limited.items()}
        if norm > n * clip or any(not np.array_equal(limited[k], arrays[k]) for k in arrays):
            bounded.append(p)
        out[p] = limited
    return out, bounded


class _Running:
    """One persona's running aggregate: weighted sum of deltas (float64), total weight, devices, and
    weighted sums of the train metrics — constant memory however many updates stream in."""

    def __init__(self, reference: Arrays, keep: bool = False):
        self.keys = list(reference)
        self.sum = [np.zeros(reference[k].shape, np.float64) for k in self.keys]
        self.kept: list[list[np.ndarray]] | None = [] if keep else None  # every update, for robust aggregation
        self.weight, self.devices = 0.0, 0
        self.metric_sums: dict[str, float] = defaultdict(float)
        self.metric_weights: dict[str, float] = defaultdict(float)

    def add(self, arrays: list[np.ndarray], weight: float, metrics) -> None:
        for total, a in zip(self.sum, arrays):
            total += weight * a
        self.weight += weight
        self.devices += 1
        if self.kept is not None:
            self.kept.append([a.astype(np.float32) for a in arrays])
        for key in TRAIN_METRICS:
            value = metrics.get(key)
            if isinstance(value, (int, float)):
                self.metric_sums[key] += weight * value
                self.metric_weights[key] += weight

    def combine(self, how: str, trim_fraction: float) -> Arrays:
        """The persona's aggregate delta: weighted mean, or coordinate-wise trimmed mean / median of the updates."""
        if how == "mean":
            return {k: v / self.weight for k, v in zip(self.keys, self.sum)}
        out = {}
        for i, key in enumerate(self.keys):
            stack = np.stack([update[i] for update in self.kept])
            out[key] = trim_mean(stack, trim_fraction) if how == "trimmed-mean" else np.median(stack, axis=0)
        return out

    def mean_metrics(self) -> dict[str, float]:
        means = {k: self.metric_sums[k] / self.metric_weights[k] for k in self.metric_sums if self.metric_weights[k]}
        return {k: v for k, v in means.items() if math.isfinite(v)}  # finite inputs can still overflow the sums

    @staticmethod
    def pooled(groups) -> dict[str, float]:
        sums, weights = defaultdict(float), defaultdict(float)
        for g in groups:
            for k in g.metric_sums:
                sums[k] += g.metric_sums[k]
                weights[k] += g.metric_weights[k]
        means = {k: sums[k] / weights[k] for k in sums if weights[k]}
        return {k: v for k, v in means.items() if math.isfinite(v)}
