"""Flower ServerApp: discover personas from aggregates, then train K persona adapters with PersonaStrategy.

Output directory (`out-dir`), which holds persona artefacts only:
    registry.db                  the persona registry (versions, rollouts, evaluations, audit events)
    onboarding.json              per-persona onboarding counts (aggregates) for cold-start serving
    personas/p{k}/r{round:04d}/  adapter_config.json, adapter_model.safetensors, manifest.json
    history.json                 per-round train and evaluation metrics, persona sizes, timings

A restart on the same directory resumes every persona from its registry head (newest candidate, else stable),
and its privacy history too: each version's manifest keeps every user-level release its lineage composed (earlier
runs' discovery and rounds), and a resumed persona's releases are added to its head's, so a version's
(epsilon, delta) covers everything its users' data went into across restarts.
"""

from __future__ import annotations

import json
import math
import random
import secrets
import time
from dataclasses import replace
from logging import INFO, WARNING
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp

from common.adapters import adapter_arrays, adapter_digest, add_lora, load_adapter_arrays, load_saved_adapter
from common.config import FederationConfig, UserDP
from common.data import load_movielens
from common import secure_vector
from common.item_factors import (USER_HALF_BOUND, ItemFactors, ItemFactorTrainer, cohort_size, gradient_shapes,
                                 release_arrays)
from common.item_stats import ItemStats, estimate, sensitivity
from common.model import load_base_model
from common.personas import EMBED_DIM, discovery_dim, elbow, onboarding_space, update_centroids
from common.timing import phase
from common.privacy import (Event, epsilon, events_from_json, lineage_history, poisson_rate, user_level_history,
                            user_level_noise)
from server.registry import PersonaRegistry
from server.rollouts import Rollouts
from server.serving import ITEM_FACTORS_FILE, ITEM_STATS_FILE, ONBOARDING_FILE, save_onboarding
from server.secure_aggregation import Aborted, read_advert, run_round
from server.strategy import PersonaStrategy, add_noise, clip, join_personas

# L2 bounds on one device's discovery contribution: a unit embedding plus a count of 1 in one slot; onboarding
# answers one-hot (age bracket, gender, occupation, up to 3 genres) plus a count of 1.
EMBED_BOUND = math.sqrt(2.0)
# With inertia: plus a squared distance of at most 4 between a unit embedding and a centroid (a mean of unit vectors).
INERTIA_BOUND = math.sqrt(1.0 + 1.0 + 4.0**2)
ONBOARDING_BOUND = math.sqrt(7.0)
STATS_BOUND = 1.0  # `common.item_stats.contribution`'s per-movie bound; the whole answer's is sensitivity() of it
# `extra` of the log records that are progress: a simulation's console (simulations.console) shows only those.
PROGRESS = {"progress": True}

def _query(grid: Grid, nodes: list[int], action: str, content: RecordDict, timeout: float) -> list[Message]:
    messages = [Message(content=content, message_type=f"{MessageType.QUERY}.{action}", dst_node_id=n) for n in nodes]
    replies = list(grid.send_and_receive(messages, timeout=timeout))
    ok = [r for r in replies if not r.has_error()]
    for r in replies:
        if r.has_error():
            log(WARNING, "query.%s: node %s failed: %s", action, r.metadata.src_node_id, r.error.reason)
    return ok


@phase("coordinator: discovery sums")
def _sum(replies: list[Message], shapes: dict[str, tuple[int, ...]], bound: float, noise: float,
         action: str, reproducible: bool = False, clip_always: bool = False) -> list[np.ndarray]:
    """Sum of the replies' arrays; with `noise` > 0 each reply is clipped to `bound` and the sum gets Gaussian
    noise of std noise x bound (Flower's DP helpers): a user-level Gaussian mechanism on the aggregate.

    A reply with a missing array, a wrong shape or a non-finite value is logged and left out; no valid reply at
    all is an error (there is nothing to discover personas from)."""
    total, used = [np.zeros(shape) for shape in shapes.values()], 0
    for r in replies:
        record = r.content["arrays"] if "arrays" in r.content else {}
        arrays = [record[k].numpy().astype(np.float64) if k in record else None for k in shapes]
        bad = [k for k, a in zip(shapes, arrays) if a is None or a.shape != shapes[k] or not np.isfinite(a).all()]
        if bad:
            log(WARNING, "query.%s: node %s sent malformed %s; left out", action, r.metadata.src_node_id, bad)
            continue
        if noise > 0 or clip_always:
            clip(arrays, bound)
        total, used = [t + a for t, a in zip(total, arrays)], used + 1
    if not used:
        raise RuntimeError(f"discovery: no device gave a valid answer to query.{action} "
                           f"({len(replies)} replies)")
    if noise > 0:
        total = add_noise(total, noise * bound, reproducible)
    return total


def discovery_releases(cfg: FederationConfig) -> int:
    """Aggregates every device contributes to during discovery: the k-means iterations (for each candidate K
    when K is chosen from the data) and the onboarding tables."""
    # the per-movie statistics: one more sum over every device; each round of the item factors: one more; their
    # population centre: one more
    stats = (1 if cfg.item_stats else 0) + cfg.item_factors_rounds + (
        1 if cfg.item_factors_rounds and cfg.item_factors_centre else 0)
    if cfg.persona_candidates:
        return len(cfg.candidate_ks) * cfg.kmeans_iters + 1 + stats
    return (cfg.kmeans_iters if cfg.num_personas > 1 else 0) + 1 + stats


def release_item_stats(grid: Grid, nodes: list[int], cfg: FederationConfig, noise: float,
                       timeout: float = 3600) -> ItemStats:
    """Per-movie rating statistics from every device (`common.item_stats`): each answer is clipped to the
    contribution bound always (so no device, honest or not, moves the sums by more than one user can), and under
    user-level DP the sums get the discovery noise; the estimate after that is post-processing. The release is
    written next to the registry (`item_stats.npz`: means, counts, global mean; no per-device data) and counted
    in `discovery_releases`, so every persona version's (epsilon, delta) covers it."""
    n_items = int(load_movielens(cfg.dataset).items.index.max())  # the public catalogue
    bound = sensitivity(STATS_BOUND)
    sums, weights, volume = _release_sum(grid, nodes, "itemstats", RecordDict(),
                                         {"sums": (n_items,), "weights": (n_items,), "volume": (1,)}, bound, cfg,
                                         noise, timeout)
    stats = estimate(sums, weights, float(volume[0]), noise * bound)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    np.savez(out / ITEM_STATS_FILE, **stats.to_arrays())
    log(INFO, "item statistics released: %d movies, global mean %.3f%s", n_items, stats.mu,
        f", noise std {noise * bound:.3f} per coordinate" if noise > 0 else " (no noise)")
    return stats


def release_item_factors(grid: Grid, nodes: list[int], cfg: FederationConfig, noise: float,
                         timeout: float = 3600) -> ItemFactors:
    """The item half of matrix factorisation, learned over the devices (`common.item_factors`): each round sends
    the current item half to the round's devices (all, or a sample: `item-factors-fraction`), each fits its own
    user factors and answers with its gradient, each answer is clipped to `item-factors-clip` (always: no device
    moves a round by more than one user can), the sum gets the discovery noise under user-level DP, and the
    coordinator takes an Adam step. Each round is a release counted in `discovery_releases`. Written next to the
    registry (`item_factors.npz`, no per-device data)."""
    n_items = int(load_movielens(cfg.dataset).items.index.max())  # the public catalogue
    trainer = ItemFactorTrainer(ItemFactors.initial(n_items, cfg.item_factors_rank, cfg.seed), lr=cfg.item_factors_lr)
    shapes = gradient_shapes(n_items, cfg.item_factors_rank)
    # Each round asks a fresh uniform sample of the devices (`item-factors-fraction`): a stochastic gradient of the
    # same objective for a fraction of the messages, which at 943 devices are most of a federation's wall
    # (docs/results.md). Under DP every round is still accounted as if every device took part: an upper bound
    # (no amplification by sampling is claimed for a fixed-size sample drawn here).
    draw = random.Random(cfg.seed) if cfg.reproducible else secrets.SystemRandom()
    cohort = cohort_size(len(nodes), cfg.item_factors_fraction)

    def sample() -> list[int]:  # every round's cohort, and the centre's, from the one seeded draw
        return list(nodes) if cohort == len(nodes) else draw.sample(list(nodes), cohort)
    started = time.time()
    for t in range(1, cfg.item_factors_rounds + 1):
        asked = sample()
        release = ArrayRecord({k: Array(v) for k, v in trainer.model.to_arrays().items()})
        penalty = ConfigRecord({"item-factors-reg": cfg.item_factors_reg, "item-factors-prior": cfg.item_factors_prior})
        content = RecordDict({"item-factors": release, "config": penalty})
        summed = _release_sum(grid, asked, "itemfactors", content, shapes, cfg.item_factors_clip, cfg, noise,
                              timeout)
        # Adam is invariant to the gradient's scale; dividing by the device count only keeps the numbers tame
        trainer.step(dict(zip(shapes, summed)), float(len(asked)))
        if t % 10 == 0 or t == cfg.item_factors_rounds:
            log(INFO, "item factors: round %d/%d (%.0f s)", t, cfg.item_factors_rounds, time.time() - started,
                extra=PROGRESS)
    model = trainer.model
    if cfg.item_factors_centre:
        model = replace(model, centre=release_user_centre(grid, sample(), model, cfg, noise, timeout))
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    np.savez(out / ITEM_FACTORS_FILE, **release_arrays(model, cfg.item_factors_reg, cfg.item_factors_prior))
    noised = f", noise std {noise * cfg.item_factors_clip:.3f} per coordinate" if noise > 0 else " (no noise)"
    log(INFO, "item factors released: %d rounds of %d of %d devices, rank %d%s", cfg.item_factors_rounds, cohort,
        len(nodes), cfg.item_factors_rank, noised)
    return model


def release_user_centre(grid: Grid, asked: list[int], model: ItemFactors, cfg: FederationConfig, noise: float,
                        timeout: float) -> np.ndarray | None:
    """The population's mean user half over the devices `asked`: each fits its own (b_u, p_u) to the final item
    half and answers it clipped to `USER_HALF_BOUND` (always), the sum gets the discovery noise under user-level DP
    (one more release in `discovery_releases`), and is divided by the number asked (public; a device that does not
    answer counts as zero, which only pulls the centre toward the zero it replaces). None when no device gave a valid
    answer (devices older than the query): the release then has no centre, as before it existed; it stays counted
    in `discovery_releases` (counting a release that was not made over-states epsilon, never under-states it)."""
    penalty = ConfigRecord({"item-factors-reg": cfg.item_factors_reg, "item-factors-prior": cfg.item_factors_prior})
    release = ArrayRecord({k: Array(v) for k, v in model.to_arrays().items()})
    content = RecordDict({"item-factors": release, "config": penalty})
    try:
        (summed,) = _release_sum(grid, asked, "usercentre", content, {"half": (1 + model.rank,)}, USER_HALF_BOUND,
                                 cfg, noise, timeout)
    except RuntimeError as e:  # e.g. devices older than the query: the item half is released without a centre
        log(WARNING, "item factors: released without a population centre (%s)", e)
        return None
    centre = summed / len(asked)
    log(INFO, "item factors: population centre from %d devices (user bias %.3f, factor norm %.3f)%s", len(asked),
        centre[0], float(np.linalg.norm(centre[1:])),
        f", noise std {noise * USER_HALF_BOUND / len(asked):.4f} per coordinate" if noise > 0 else "")
    return centre


def _release_sum(grid: Grid, nodes: list[int], action: str, content: RecordDict,
                 shapes: dict[str, tuple[int, ...]], bound: float, cfg: FederationConfig, noise: float,
                 timeout: float) -> list[np.ndarray]:
    """A sum over `nodes` of answers bounded by `bound` in L2, with the discovery noise under user-level DP: in the
    clear (each answer validated and clipped by the coordinator, always), or under secure aggregation (each device
    clips its own; the noise is added once, after unmasking: the trusted-noise model). RuntimeError when nothing
    can be released."""
    if cfg.secure_aggregation:
        summed = _secure_sum(grid, nodes, action, content, shapes, bound, cfg, timeout)
        return add_noise(summed, noise * bound, cfg.reproducible) if noise > 0 else summed
    replies = _query(grid, nodes, action, content, timeout)
    return _sum(replies, shapes, bound, noise, action, cfg.reproducible, clip_always=True)


def _secure_sum(grid: Grid, nodes: list[int], action: str, content: RecordDict,
                shapes: dict[str, tuple[int, ...]], bound: float, cfg: FederationConfig,
                timeout: float) -> list[np.ndarray]:
    """A discovery query answered through secure aggregation: each device clips its arrays to `bound` itself and
    masks them (`common.secure_vector`), and only sums over many devices are unmasked.

    Discovery asks every device, and SecAgg's secret sharing costs each device O(n x t) field operations (1.4 s
    for a 32-byte secret at n = 216, t = 130 with Flower's Shamir, several seconds with the private key: over ten
    minutes of device time per query on this machine), so the devices are split at random into groups of about
    `secure-aggregation-group` and each group runs its own secure round: the coordinator learns each group's sum
    (of at least threshold x the group's devices), never a single device's. The coordinator cannot clip single
    contributions any more, so the bound is the device's to keep: an honest device's contribution is within it by
    construction, and a dishonest one moves each coordinate of the sum by at most the quantisation range, `bound`
    (docs/secure_aggregation.md). Raises RuntimeError when a group's round aborts (fewer than its threshold stay,
    or its sum does not decode): the run stops rather than fall back to sums in the clear."""
    draw = random.Random(cfg.seed) if cfg.reproducible else secrets.SystemRandom()
    order = list(nodes)
    draw.shuffle(order)
    # Split positions, not ids: node ids are 64-bit and numpy would turn a list of large ones into floats.
    parts = np.array_split(np.arange(len(order)), max(1, math.ceil(len(order) / cfg.secure_aggregation_group)))
    groups = [[order[i] for i in part] for part in parts]
    total, survivors_total = [np.zeros(s) for s in shapes.values()], 0
    for group in groups:
        levels = secure_vector.levels_for(len(group))
        config = {"secagg-round": secrets.randbits(62), "secagg-levels": levels, "secagg-bound": float(bound),
                  "secagg-threshold": max(2, math.ceil(cfg.secure_aggregation_threshold * len(group)))}
        message = RecordDict(dict(content.items()))
        previous = dict(content["config"].items()) if "config" in content else {}
        message["config"] = ConfigRecord({**previous, **config})
        replies = _query(grid, group, action, message, timeout)
        adverts = {}
        for msg in replies:
            if (keys := read_advert(msg)) is not None and msg.metadata.src_node_id in group:
                adverts.setdefault(msg.metadata.src_node_id, keys)
        try:
            summed, survivors = run_round(grid, adverts, config["secagg-threshold"],
                                          secure_vector.length(list(shapes.values())), config["secagg-round"],
                                          timeout)
            arrays = secure_vector.decode(summed, len(survivors), list(shapes.values()), bound, levels)
        except (Aborted, ValueError) as e:
            raise RuntimeError(f"query.{action}: secure aggregation aborted, nothing released: {e}") from e
        total = [t + a for t, a in zip(total, arrays)]
        survivors_total += len(survivors)
    log(INFO, "query.%s: %d of %d devices' contributions summed under secure aggregation (%d groups)", action,
        survivors_total, len(nodes), len(groups))
    return total


def privacy_plan(cfg: FederationConfig, num_nodes: int) -> tuple[UserDP | None, float, list[Event]]:
    """(per-round DP, discovery noise multiplier, discovery releases as accountant events)."""
    if not cfg.user_dp_enabled:
        return None, 0.0, []
    rate = poisson_rate(cfg.fraction_train, cfg.min_train_nodes, num_nodes)  # the strategy samples at this rate
    noise = cfg.dp_user_noise
    if cfg.dp_user_target_epsilon > 0:
        noise = user_level_noise(cfg.dp_user_target_epsilon, cfg.dp_delta, discovery_releases(cfg), rate,
                                 cfg.num_rounds)
    discovery_noise = cfg.dp_discovery_noise or noise
    prior = user_level_history(discovery_noise, discovery_releases(cfg), noise, rate, 0)
    return UserDP(noise, cfg.dp_user_clip, cfg.dp_delta), discovery_noise, prior


def federated_kmeans(grid: Grid, nodes: list[int], k: int, iters: int, noise: float, timeout: float,
                     inertia: bool = False, dim: int = EMBED_DIM, reproducible: bool = False,
                     secure: FederationConfig | None = None) -> tuple[np.ndarray | None, float | None]:
    """Lloyd iterations from per-slot sums and counts only; with `inertia`, the devices' summed squared distances
    to the previous iteration's centroids come back too (clipped and noised with the sums). With `secure` (the
    run's config, secure aggregation on) every iteration's sums go through secure aggregation."""
    centroids, sse = None, None
    shapes = {"sums": (k, dim), "counts": (k,), **({"sse": (k,)} if inertia else {})}
    bound = INERTIA_BOUND if inertia else EMBED_BOUND
    for iteration in range(iters):
        content = RecordDict({"config": ConfigRecord({"iteration": iteration, "k": k})})
        if centroids is not None:
            content["centroids"] = ArrayRecord({"c": Array(centroids.astype(np.float32))})
        if secure is not None:
            content["config"] = ConfigRecord({"iteration": iteration, "k": k, "inertia": inertia})
            sums, counts, *rest = _secure_sum(grid, nodes, "embed", content, shapes, bound, secure, timeout)
            if noise > 0:  # added once, after unmasking (trusted-noise model)
                sums, counts, *rest = add_noise([sums, counts, *rest], noise * bound, reproducible)
        else:
            replies = _query(grid, nodes, "embed", content, timeout)
            sums, counts, *rest = _sum(replies, shapes, bound, noise, "embed", reproducible)
        if rest and centroids is not None:
            sse = float(max(rest[0].sum(), 0.0))
        centroids = update_centroids(sums, counts, centroids)
        log(INFO, "persona discovery K=%d, iteration %d: sizes %s%s", k, iteration, counts.astype(int).tolist(),
            f", inertia {sse:.2f}" if sse is not None else "")
    return centroids, sse


def discover_personas(grid: Grid, nodes: list[int], cfg: FederationConfig, noise: float = 0.0,
                      timeout: float = 3600) -> tuple[dict[int, int], list[int], dict]:
    """Federated k-means over profile embeddings (for each candidate K, then K at the elbow, when
    `persona-candidates` is set), then cold-start assignment; aggregates get DP noise `noise`.

    Returns node -> persona, the evaluation devices, and persona info (K, sizes, the inertia per candidate K).
    """
    info: dict = {"features": cfg.discovery_features}
    secure = cfg if cfg.secure_aggregation else None
    space = onboarding_space(cfg.dataset)
    dim = discovery_dim(cfg.discovery_features, space)
    if cfg.persona_candidates:
        runs = {k: federated_kmeans(grid, nodes, k, cfg.kmeans_iters, noise, timeout, inertia=True, dim=dim,
                                    reproducible=cfg.reproducible, secure=secure) for k in cfg.candidate_ks}
        info["inertia"] = {k: sse for k, (_, sse) in runs.items()}
        k = elbow(info["inertia"])
        centroids = runs[k][0]
        log(INFO, "persona discovery: inertia per K %s -> K=%d at the elbow",
            {c: round(v, 2) for c, v in info["inertia"].items()}, k)
    else:
        k = cfg.num_personas
        centroids, _ = federated_kmeans(grid, nodes, k, cfg.kmeans_iters if k > 1 else 0, noise, timeout, dim=dim,
                                        reproducible=cfg.reproducible, secure=secure)
    if centroids is None:
        centroids = np.zeros((k, dim))
    content = RecordDict({"centroids": ArrayRecord({"c": Array(centroids.astype(np.float32))}),
                          "config": ConfigRecord({"k": k})})
    shapes = {"features": (k, space.size), "counts": (k,)}
    if secure is not None:
        features, counts = _secure_sum(grid, nodes, "assign", content, shapes, ONBOARDING_BOUND, cfg, timeout)
        if noise > 0:  # added once, after unmasking (trusted-noise model)
            features, counts = add_noise([features, counts], noise * ONBOARDING_BOUND, cfg.reproducible)
    else:
        assigned = _query(grid, nodes, "assign", content, timeout)
        features, counts = _sum(assigned, shapes, ONBOARDING_BOUND, noise, "assign", cfg.reproducible)
    counts = np.maximum(counts, 0.0)  # post-processing keeps the noisy tables valid counts
    features = np.clip(features, 0.0, counts[:, None])
    tables = ArrayRecord({"features": Array(features.astype(np.float32)),
                          "counts": Array(counts.astype(np.float32))})
    save_onboarding(Path(cfg.out_dir) / ONBOARDING_FILE, space, features,
                    counts)  # for cold-start serving: the schema of the data set and the aggregated tables only
    replies = _query(grid, nodes, "cold", RecordDict({"tables": tables, "config": ConfigRecord({"k": k})}), timeout)
    node_persona = {}
    for r in replies:
        persona = r.content["metrics"].get("persona", -1)
        if not 0 <= persona < k or persona != int(persona):
            log(WARNING, "query.cold: node %s answered persona %r of %d; left out", r.metadata.src_node_id, persona, k)
            continue
        node_persona[r.metadata.src_node_id] = int(persona)
    replies = [r for r in replies if r.metadata.src_node_id in node_persona]
    # Cohorts are drawn in the order of `nodes` (`draw_order`), not in the order replies arrived.
    node_persona = {n: node_persona[n] for n in nodes if n in node_persona}
    # Membership of the evaluation sample is a seeded coin the device reports; it says nothing about its data.
    eval_nodes = sorted(r.metadata.src_node_id for r in replies if r.content["metrics"].get("eval"))
    cold = sum(int(r.content["metrics"].get("cold", 0)) for r in replies)  # under DP devices keep this flag
    sizes = np.bincount(list(node_persona.values()), minlength=k).tolist()
    log(INFO, "personas: sizes %s (%d cold-start devices placed from onboarding answers)", sizes, cold,
        extra=PROGRESS)
    return node_persona, eval_nodes, {"k": k, "sizes": sizes, "cold_start_devices": cold, **info}


# What version 0's adapter is, in its privacy record's note: a fresh LoRA, or (`warm-start`) the public warm start.
FRESH_ADAPTER, WARM_START_ADAPTER = "data-independent adapter", "public warm start (users outside the federation)"


def version_zero_privacy(dp: UserDP | None, discovery: list[Event]) -> dict:
    """Version 0's privacy record: its adapter is data-independent, but the persona it starts is defined by the
    discovery releases, so under DP it carries their (epsilon, delta) and events."""
    if dp is None:
        return {"dp": False, "note": FRESH_ADAPTER}
    return {"dp": True, "level": "user", "epsilon": epsilon(discovery, dp.delta), "delta": dp.delta,
            "releases": [list(e) for e in discovery],
            "note": f"{FRESH_ADAPTER}; the persona-discovery releases that defined the persona"}


def warm_start_dir(cfg: FederationConfig) -> Path | None:
    """`warm-start`'s PEFT directory (None without one); checked when the run starts, not minutes later when the
    first version is written."""
    if not cfg.warm_start:
        return None
    path = Path(cfg.warm_start)
    if not (path / "adapter_model.safetensors").is_file():
        raise ValueError(f"warm-start {path}: no PEFT adapter there (adapter_model.safetensors); build one with "
                         "python -m simulations.warm_start")
    return path


def initial_adapter(cfg: FederationConfig) -> tuple[dict[str, np.ndarray], dict | None]:
    """A fresh persona's first adapter: a fresh LoRA (B = 0: the base model), or with `warm-start` the public
    adapter in that PEFT directory, with its provenance (path and digest) for version 0's privacy record. An adapter
    of another shape, keys or with NaN/Inf values is refused, not partly loaded."""
    model = add_lora(load_base_model(cfg.base_model)[0], cfg.lora, seed=cfg.seed)
    path = warm_start_dir(cfg)
    if path is None:
        return adapter_arrays(model), None
    arrays = load_saved_adapter(model, path)
    load_adapter_arrays(model, arrays)  # the federation's LoRA shape, and finite
    log(INFO, "every fresh persona starts from the public warm start %s", path)
    return arrays, {"path": str(path.resolve()), "digest": adapter_digest(arrays)}


def starting_versions(registry: PersonaRegistry, rollouts: Rollouts, cfg: FederationConfig,
                      zero_privacy: dict) -> tuple[dict[int, int], set[int]]:
    """Each persona's version to train from: its registry head after a restart, else a fresh data-independent
    adapter released as version 0 (with `zero_privacy`) and made stable. Returns the heads and the personas
    whose version 0 was created now."""
    heads, fresh = {}, set()
    initial = None
    for persona in range(cfg.num_personas):
        head = registry.head(persona) if persona in registry.personas() else None
        if head is None:
            if initial is None:
                initial, warm = initial_adapter(cfg)
                if warm is not None:
                    zero_privacy = {**zero_privacy, "warm_start": warm,
                                    "note": zero_privacy["note"].replace(FRESH_ADAPTER, WARM_START_ADAPTER)}
            head = registry.add_version(persona, 0, initial, 0, {}, zero_privacy)
            rollouts.make_stable(persona, head, "server", "initial adapter")
            fresh.add(persona)
        else:
            log(INFO, "persona %d resumes from version %d", persona, head)
        heads[persona] = head
    return heads, fresh


def resumed_histories(registry: PersonaRegistry, heads: dict[int, int], fresh: set[int],
                      discovery: list[Event]) -> dict[int, list[Event]]:
    """Per persona, the user-level events its next version composes: a fresh persona's version 0 already holds
    this run's discovery; a resumed one adds this run's discovery to everything its head accounted."""
    histories = {}
    for persona, head in heads.items():
        if persona in fresh:
            histories[persona] = list(discovery)
            continue
        version = registry.version(head)
        privacy = version["manifest"].get("privacy") or {}
        if not privacy.get("dp") and version["round"] > 0:
            raise RuntimeError(f"persona {persona} resumes from version {head}, released without user-level DP: "
                               "no (epsilon, delta) can cover its users; start a DP run in a fresh out-dir")
        histories[persona] = lineage_history(events_from_json(privacy.get("releases")), discovery)
    return histories


def serves_blend(cfg: FederationConfig) -> bool:
    """Whether this run records and serves blend weights (`serve-blend`): they are fitted on the un-noised
    evaluation sums, which no (epsilon, delta) covers, so never in a DP run."""
    return cfg.serve_blend and not (cfg.user_dp_enabled or cfg.device_dp_enabled)


@phase("coordinator: serving blend weights")
def send_blend_weights(grid: Grid, nodes: list[int], registry: PersonaRegistry, timeout: float = 3600) -> dict:
    """Send every device the personal adapters' serving blend weights, one per recent version, named by the
    version's digest (`client.client_app`'s "blend" query; a device keeps the one its personal adapter was derived
    from). A version never evaluated itself gets the weight of the nearest evaluated version of its persona
    (`PersonaRegistry.serving_weights`). Returns what was sent: {"versions": {version: weight}, "fitted_on":
    {version: the version its weight was fitted on}, "devices": answers}."""
    weights = registry.serving_weights()
    if not weights or not nodes:
        return {"versions": {}, "fitted_on": {}, "devices": 0}
    versions = sorted(weights)
    content = RecordDict({"config": ConfigRecord({
        "digests": [adapter_digest(registry.arrays(v)) for v in versions],
        "weights": [float(weights[v][0]["personal"]) for v in versions]})})
    replies = _query(grid, nodes, "blend", content, timeout)
    log(INFO, "serving blend weights of %d version(s) (fitted on %d evaluated) sent to %d devices (%d answered)",
        len(versions), len({s for _, s in weights.values()}), len(nodes), len(replies))
    return {"versions": {str(v): weights[v][0]["personal"] for v in versions},
            "fitted_on": {str(v): weights[v][1] for v in versions}, "devices": len(replies)}


def round_summary(server_round: int, num_rounds: int, metrics: dict, seconds: float) -> str:
    """One line of a round's key figures from its aggregated train and evaluate metrics."""
    train, evaluate = metrics.get("train") or {}, metrics.get("evaluate") or {}
    parts = [f"round {server_round}/{num_rounds}"]
    devices = sum(int(v) for k, v in train.items() if k.startswith("p") and k.endswith("_devices"))
    trained = f"{devices} device{'s' * (devices != 1)} trained" if devices else "no update released"
    if "train_loss" in train:
        trained += f", loss {train['train_loss']:.3f}"
    epsilons = [v for k, v in train.items() if k.endswith("_epsilon")]
    if epsilons:
        trained += f", user-level epsilon up to {max(epsilons):.2f}"
    problems = [f"{int(train[k])} {k}" for k in ("failed", "skipped", "rejected", "refused") if train.get(k)]
    parts.append(trained + (f" ({', '.join(problems)})" if problems else ""))
    if "persona_rmse" in evaluate:
        parts.append(f"evaluation by {int(evaluate['users'])} users: persona RMSE {evaluate['persona_rmse']:.4f}, "
                     f"personal RMSE {evaluate['personal_rmse']:.4f}"
                     # the private base: MF with released item factors, else the user+item bias model
                     + (f", private base {evaluate['bias_rmse']:.4f}, personal + base "
                        f"{evaluate['personal_blend_rmse']:.4f} (w {evaluate['personal_blend_weight']:.2f})"
                        if "bias_rmse" in evaluate else ""))
    parts.append(f"{seconds:.0f} s")
    return " | ".join(parts)


def draw_order(grid: Grid, nodes: list[int], cfg: FederationConfig, timeout: float = 3600) -> list[int]:
    """The order every seeded draw over devices goes over (MF round samples, training cohorts, secure-aggregation
    groups): by node id, or, in a `reproducible` simulation, by the devices' partition. Flower's simulation gives
    nodes new random ids each run, so drawing over ids, the same seed would pick other users. Asked once, before
    any draw; a device that does not answer with a partition keeps its place by id, after those that do."""
    if not cfg.reproducible:
        return sorted(nodes)
    replies = _query(grid, nodes, "order", RecordDict(), timeout)
    order = {r.metadata.src_node_id: r.content["metrics"]["order"] for r in replies
             if isinstance(r.content["metrics"].get("order"), int)}
    return sorted(nodes, key=lambda n: (n not in order, order.get(n, 0), n))


def wait_for_nodes(grid: Grid, expected: int, timeout: float = 600) -> list[int]:
    deadline = time.time() + timeout
    while len(nodes := sorted(grid.get_node_ids())) < expected and time.time() < deadline:
        time.sleep(1)
    return nodes


def build_app(overrides: dict | None = None) -> ServerApp:
    """The ServerApp; `overrides` (run-config keys) take precedence over the run's config (used by simulations)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        run(grid, FederationConfig.from_run_config({**dict(context.run_config), **(overrides or {})}))

    return app


def run(grid: Grid, cfg: FederationConfig) -> None:
    out = Path(cfg.out_dir)
    started = time.time()
    warm_start_dir(cfg)
    nodes = draw_order(grid, wait_for_nodes(grid, cfg.min_nodes), cfg, cfg.round_timeout)
    log(INFO, "%d devices online", len(nodes))

    dp, discovery_noise, prior = privacy_plan(cfg, len(nodes))
    if dp:
        log(INFO, "user-level DP: noise multiplier %.3f (discovery %.3f), clip %.3g, delta %g", dp.noise_multiplier,
            discovery_noise, dp.clip, dp.delta)
    extra = {}
    if cfg.item_stats:
        stats = release_item_stats(grid, nodes, cfg, discovery_noise, cfg.round_timeout)
        extra["item-stats"] = ArrayRecord({k: Array(v) for k, v in stats.to_arrays().items()})
    if cfg.item_factors_rounds:
        factors = release_item_factors(grid, nodes, cfg, discovery_noise, cfg.round_timeout)
        released = release_arrays(factors, cfg.item_factors_reg, cfg.item_factors_prior)
        extra["item-factors"] = ArrayRecord({k: Array(v) for k, v in released.items()})
    node_persona, eval_nodes, persona_info = discover_personas(grid, nodes, cfg, discovery_noise, cfg.round_timeout)
    cfg = replace(cfg, num_personas=persona_info["k"])  # K may have been chosen from the data
    registry = PersonaRegistry(out, lora=cfg.lora, base_model=cfg.base_model,
                               serving={"item_stats": cfg.item_stats, "residual_to_bias": cfg.residual_to_bias,
                                        "item_factors": bool(cfg.item_factors_rounds),
                                        "blend_prior_devices": cfg.blend_prior_devices})
    rollouts = Rollouts(registry)
    heads, fresh = starting_versions(registry, rollouts, cfg, version_zero_privacy(dp, prior))
    histories = resumed_histories(registry, heads, fresh, prior) if dp else {}

    @phase("coordinator: registry writes")
    def release(round_, persona, arrays, devices, metrics, privacy) -> int:
        version = registry.add_version(persona, round_, arrays, devices, metrics, privacy, parent=heads[persona])
        heads[persona] = version
        if cfg.auto_promote:
            rollouts.make_stable(persona, version, "server", f"auto-promote: round {round_}")
        return version

    strategy = PersonaStrategy(node_persona, cfg.fraction_train, cfg.min_train_nodes, eval_nodes,
                               cfg.eval_every, cfg.num_rounds, on_release=release, seed=cfg.seed,
                               dp=dp, prior_releases=histories, rollouts=rollouts,
                               sample_rate=poisson_rate(cfg.fraction_train, cfg.min_train_nodes, len(nodes)),
                               reproducible=cfg.reproducible, eval_min_devices=cfg.eval_min_devices,
                               rollback=(cfg.rollback_margin, cfg.rollback_min_devices),
                               aggregation=cfg.aggregation, trim_fraction=cfg.trim_fraction,
                               max_update_norm=cfg.max_update_norm, max_examples=cfg.max_examples,
                               extra_content=extra, secure=cfg.secure,
                               secure_timeout=cfg.round_timeout, server_lr=cfg.server_lr,
                               server_lr_schedule=cfg.server_lr_schedule, blend=serves_blend(cfg),
                               blend_prior_devices=cfg.blend_prior_devices)
    if cfg.secure:
        log(INFO, "secure aggregation: threshold %.2f of each cohort, coordinate range %g, device clip %g",
            cfg.secure.threshold, cfg.secure.coord_range, cfg.secure.clip)
    round_started = time.time()
    blend_sent = None

    def round_done(server_round: int, _arrays) -> None:
        """Flower's end-of-round hook (its `evaluate_fn`, called after the round's federated evaluation; the
        server evaluates nothing itself): progress, and after an evaluation the serving blend weights."""
        nonlocal round_started, blend_sent
        if server_round:
            log(INFO, "%s", round_summary(server_round, cfg.num_rounds, strategy.round_metrics[server_round],
                                          time.time() - round_started), extra=PROGRESS)
            # What validation chose is what devices serve: after every evaluation (the last round always has one)
            # every device gets the personal weights, so in a long run a device waits at most eval-every rounds
            # for the weight of a new adapter, not until the run ends.
            if serves_blend(cfg) and strategy.round_metrics[server_round].get("evaluate"):
                blend_sent = send_blend_weights(grid, sorted(grid.get_node_ids()), registry, cfg.round_timeout)
        round_started = time.time()

    result = strategy.start(grid, join_personas({p: registry.arrays(v) for p, v in heads.items()}),
                            num_rounds=cfg.num_rounds, timeout=cfg.round_timeout, train_config=ConfigRecord(),
                            evaluate_config=ConfigRecord(), evaluate_fn=round_done)
    history = {
        "config": {k: getattr(cfg, k) for k in cfg.__dataclass_fields__},
        "serving_blend": blend_sent,
        "devices": len(nodes),
        "personas": persona_info,
        "privacy": {str(p): h for p, h in strategy.privacy_history.items()} if dp else None,
        "train": {r: dict(m) for r, m in result.train_metrics_clientapp.items()},
        "evaluate": {r: dict(m) for r, m in result.evaluate_metrics_clientapp.items()},
        "seconds": time.time() - started,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "history.json").write_text(json.dumps(history, indent=2))
    log(INFO, "wrote %s", out / "history.json")


app = build_app()
