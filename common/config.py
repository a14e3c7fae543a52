"""Typed configuration for the rating task, in one place."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SplitConfig:
    """Per-user temporal split: each user's oldest ratings train, newest test."""

    train_frac: float = 0.8
    min_ratings: int = 1  # users with fewer ratings are dropped
    max_ratings: int | None = None  # users with more ratings are dropped
    users: int | None = None  # then keep a seeded random sample of this many users (None = all)

    def __post_init__(self) -> None:
        if not 0.0 < self.train_frac < 1.0:
            raise ValueError(f"train_frac must be in (0, 1), got {self.train_frac}")
        if self.min_ratings < 1:
            raise ValueError(f"min_ratings must be >= 1, got {self.min_ratings}")
        if self.max_ratings is not None and self.max_ratings < self.min_ratings:
            raise ValueError("max_ratings must be >= min_ratings")
        if self.users is not None and self.users < 1:
            raise ValueError(f"users must be >= 1 or None, got {self.users}")


SPLIT_PRESETS: dict[str, SplitConfig] = {
    "default": SplitConfig(),
    # "Personas within Parameters" (arXiv 2509.09689): users with 100-200 ratings, 60/40 by time.
    "paper": SplitConfig(train_frac=0.6, min_ratings=100, max_ratings=200),
    # Every activity level, cold-start users included, at a size one machine simulates (one node per user):
    # a random 240 of all users, so light and heavy users appear as often as in the whole population.
    "mixed": SplitConfig(users=240),
}


def split_preset(name: str) -> SplitConfig:
    try:
        return SPLIT_PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown split preset {name!r}; choose one of {sorted(SPLIT_PRESETS)}") from None


@dataclass(frozen=True)
class PromptConfig:
    """What goes into a user's short-term memory profile and the prompt around it."""

    top_genres: int = 3  # favourite and disliked genres listed
    min_genre_count: int = 3  # a genre needs this many ratings to count as liked/disliked
    recent_items: int = 5  # most recent rated movies listed with their rating
    use_chat_template: bool = True
    instruction: str = (
        "You predict how a user rates movies on a scale from 1 (hated it) to 5 (loved it). "
        "Answer with a single digit."
    )


@dataclass(frozen=True)
class ScoringConfig:
    """Batching of rating prediction and the training loss."""

    batch_size: int = 32  # rating items per forward pass
    mse_weight: float = 0.0  # loss = CE over the five digit logits + mse_weight * MSE(expected, true)


@dataclass(frozen=True)
class LoraSettings:
    """LoRA shape shared by every persona and personal adapter (they must be interchangeable)."""

    rank: int = 8
    alpha: int = 16
    dropout: float = 0.0
    targets: tuple[str, ...] = ("q_proj", "v_proj")


@dataclass(frozen=True)
class TrainConfig:
    """Local training on one device."""

    steps: int = 4  # optimiser steps per round
    rows_per_step: int = 2  # packed sequences per step (one user's profile + several movies each)
    items_per_row: int = 8  # rated movies packed behind one profile prefix
    lr: float = 3e-4
    mse_weight: float = 0.0
    seed: int = 0


@dataclass(frozen=True)
class DeviceDP:
    """On-device DP-SGD. The unit is one record: a fixed group of <= items_per_row of the user's ratings."""

    noise_multiplier: float
    max_grad_norm: float
    delta: float
    budget: float  # lifetime epsilon of the device's example-level ledger
    # Records are hash buckets of item ids, a fixed number of them: how many never depends on the data, so adding a
    # rating changes its own record only, and the sample rate (rows per step / records) reveals nothing either.
    records: int = 16
    # Opacus' secure_mode noise (each coordinate a sum of 4 Gaussian draws, against floating-point attacks).
    secure_mode: bool = False
    # None: Poisson sampling and noise draw from a generator seeded with secret OS randomness (a deployed device).
    # An int: both are reproducible from it; public seeds let anyone replay which records were sampled, so
    # this is the simulations' labelled `reproducible` mode only.
    seed: int | None = None


@dataclass(frozen=True)
class UserDP:
    """Central user-level DP on persona releases (the unit is one device = one user)."""

    noise_multiplier: float
    clip: float  # L2 bound on one device's persona delta
    delta: float


@dataclass(frozen=True)
class SecureAggregation:
    """Secure aggregation of K-slot updates (docs/secure_aggregation.md): the coordinator unmasks only sums."""

    threshold: float  # fraction of a round's cohort that must stay to the end (> 1/2): fewer and the round aborts
    coord_range: float  # each coordinate of a delta is clipped to [-range, range] and quantised over it
    clip: float  # L2 bound on one device's delta, clipped on the device (the coordinator sees no single delta)


AGGREGATIONS = ("mean", "trimmed-mean", "median")
DISCOVERY_FEATURES = ("profile-embedding", "genre-deviation")
SERVER_LR_SCHEDULES = ("constant", "cosine")  # the server step over the rounds (PersonaStrategy.server_step)


# DP settings where 0 means "off" or "no limit" and anything else must be a finite positive number.
DP_NON_NEGATIVE = ("dp_device_noise", "dp_device_target_epsilon", "dp_device_budget", "dp_user_noise",
                   "dp_user_target_epsilon", "dp_discovery_noise")


@dataclass(frozen=True)
class FederationConfig:
    """Everything a federated run needs; read from `[tool.flwr.app.config]` (overridable with --run-config)."""

    num_rounds: int = 5
    num_personas: int = 4  # K; K=1 is the single shared adapter baseline
    kmeans_iters: int = 4  # Lloyd iterations, one federated query round each
    fraction_train: float = 0.06  # of all nodes, per round (13 of 216)
    min_train_nodes: int = 2
    local_steps: int = 2  # steps on the persona adapter per round
    # The on-device personal adapter: the newest persona adapter the device received, fine-tuned this many steps
    # on its own ratings at `personal_lr` (0: `lr`), again whenever a new persona version arrives. 3e-4 beat 2e-3
    # on the validation ratings at 2 and at 8 steps (`simulations.personal_tuning`, docs/results.md); 8 steps
    # scored better on validation still, but cost 4x the personal training's wall and scored worse on test.
    personal_steps: int = 2
    personal_lr: float = 3e-4
    rows_per_step: int = 1
    items_per_row: int = 8
    lr: float = 2e-3
    # The coordinator's step on each persona's mean delta (FedAvg's server learning rate, Reddi et al. 2021):
    # 1 is plain FedAvg. Averaging 13 devices' few Adam steps moves a persona about as far as one device's steps,
    # so each round is a few steps of progress; a larger server step takes more of it per round.
    server_lr: float = 1.0
    # One of SERVER_LR_SCHEDULES: "cosine" decays server-lr over num-rounds (`server.strategy.PersonaStrategy.
    # server_step`), so more rounds can refine rather than drift.
    server_lr_schedule: str = "constant"
    lora_rank: int = 8
    lora_alpha: int = 16
    lora_targets: str = "q_proj,v_proj"
    eval_every: int = 3  # evaluate after every n-th round and after the last
    eval_users: int = 20  # fixed seeded sample of devices scored at each evaluation
    cold_start_threshold: int = 20  # fewer training ratings than this: persona from onboarding answers
    dataset: str = "ml-100k"
    # The paper's protocol (216 users): Flower's simulation engine polls every node ten times a second, which
    # costs a CPU core at ~1,000 nodes on this 2-core machine; 216 nodes leave the cores to training.
    split: str = "paper"
    base_model: str = "smollm2-135m"
    min_nodes: int = 1  # wait for this many devices before persona discovery
    seed: int = 0  # training randomness (LoRA init, sampling, batches); repeated runs vary it
    eval_seed: int = 0  # the evaluation sample's seed, apart from `seed` so repeated runs score the same users
    out_dir: str = "results/federated"  # the coordinator's persona versions and history
    # Each simulated device's encrypted store lives in <device-dir>/node-<partition> (a deployed device names
    # its own with the node-config key `store-path`).
    device_dir: str = "results/devices"
    device_keep_versions: int = 2  # personal adapter versions a device keeps for rollback
    # On-device DP-SGD on the persona update (example level; the unit is a fixed record of <= items-per-row
    # ratings). Off when both noise and target are 0. A target epsilon is spread over num-rounds participations.
    dp_device_noise: float = 0.0
    dp_device_target_epsilon: float = 0.0
    dp_device_clip: float = 1.0
    dp_device_budget: float = 0.0  # lifetime epsilon per device; 0 = no limit
    dp_personal: bool = False  # DP-SGD for the personal adapter too (it never leaves the device, so optional)
    dp_device_records: int = 16  # records per device: each rating's record is a keyed hash of its item id
    dp_secure_mode: bool = False  # Opacus secure_mode noise on the devices (4 draws per coordinate)
    # Simulations only: DP-SGD's sampling and noise drawn from the public seed so runs replay exactly. Anyone who
    # knows the seed knows which records were sampled, so no privacy claim holds in this mode. The coordinator's
    # user-level round cohorts follow it too (Poisson draws from `seed` instead of secrets.SystemRandom).
    reproducible: bool = False
    # Central user-level DP on every persona release: each device's delta clipped to dp-user-clip, Gaussian noise
    # of dp-user-noise x clip on each persona's sum. A target epsilon over num-rounds sets the noise instead.
    dp_user_noise: float = 0.0
    dp_user_target_epsilon: float = 0.0
    dp_user_clip: float = 1.0
    dp_discovery_noise: float = 0.0  # noise multiplier on persona-discovery sums (embeddings, onboarding counts)
    dp_delta: float = 1e-5
    # Rollouts: each round's new persona version becomes stable at once (simulation), or stays a candidate for an
    # operator's canary (deployment). A canary worse than stable by more than the margin in held-out RMSE, over at
    # least the minimum number of evaluated devices each, is rolled back automatically.
    auto_promote: bool = True
    rollback_margin: float = 0.05
    rollback_min_devices: int = 5
    # Pooled evaluation metrics (overall, per persona, per user-activity bucket, per version) are released only when
    # they pool at least this many devices; below it they are withheld (logged). Per version, evaluations are held
    # back until this many distinct devices have been pooled, so the registry never shows fewer.
    eval_min_devices: int = 5
    # How one persona's deltas are combined: "mean" (example-weighted FedAvg, streamed in constant memory),
    # "trimmed-mean" (coordinate-wise, cutting trim-fraction of the updates at each end) or "median"
    # (coordinate-wise); the robust two hold a round's updates for a persona in memory and weigh devices equally.
    # max-update-norm > 0 rejects any delta with a larger L2 norm (under user-level DP deltas are clipped instead;
    # 0 = off). The default 100 is a sanity bound, not a poisoning defence: ~40x the largest honest update measured
    # (L2 2.3 at the defaults, docs/results.md); AdamW moves a parameter by at most ~3 x lr a step, so even the
    # worst case, 3 x lr x steps x sqrt(adapter size), is ~9 at the defaults (460,800 parameters) and ~15 for the
    # tests' tiny model at lr 0.01 and 8 steps. Every accepted delta is then finite and small enough that the
    # float64 sums and the float32 release cannot overflow (a 3e38 update would make an Inf persona). Tighten it
    # from the rounds' reported max_update_norm.
    aggregation: str = "mean"
    trim_fraction: float = 0.2
    max_update_norm: float = 100.0
    # A device's example count (its FedAvg weight) is its own claim, so it is capped: one device claiming 1e12
    # would otherwise set its persona's mean. 1000 is above every ML-100K user's training count (at most 590 at
    # the 80% split), so no honest device of the reference data is capped.
    max_examples: float = 1000.0
    # Seconds the coordinator waits for the replies of one query or round (Flower's default is 3600): a device that
    # never replies holds the round this long. A K=1 federation's 3 rounds, discovery included, took 316 s here,
    # so 900 s leaves ~10x for one round; raise it for much larger cohorts or slow devices.
    round_timeout: float = 900.0
    # K chosen from the data: comma-separated candidates (e.g. "1,2,4,8"); discovery then runs federated k-means
    # for each, the devices also return their squared distance to their centroid (summed, so only the inertia
    # per K reaches the coordinator), and K is taken at the elbow of inertia vs K. num-personas is then ignored.
    persona_candidates: str = ""
    # What persona discovery clusters: "genre-deviation" (the user's per-genre rating deviations from their own
    # mean, one dimension per catalogue genre) or "profile-embedding" (all-MiniLM-L6-v2 of the prompt's profile
    # text, 384 dimensions). Profile embeddings separate taste no better than random partitions and collapse into
    # one persona under user-level DP at eps 8; genre deviations separate 8-14x better and keep their personas
    # under that noise at 943 users (docs/personas_and_dp_scaling.md).
    discovery_features: str = "genre-deviation"
    # Long-term memory: each movie's prompt also quotes the user's this-many most similar past ratings (MiniLM
    # embeddings of the movie texts, on the device); 0 = profile (short-term memory) only, the paper's prompt.
    memory_items: int = 0
    # Collaborative signal: before discovery every device contributes its ratings to per-movie sums
    # (`common.item_stats`: a bounded contribution, clipped and noised with the discovery noise under user-level
    # DP, accounted as one more discovery release); the released means and counts go into each movie's prompt
    # ("Other users rated it 3.9/5 on average (212 ratings).") on every device.
    item_stats: bool = False
    # Each device's latest fraction of training ratings held out of all training as validation (0 = none). With
    # item-stats on, evaluation then also reports the private user+item bias model (released item statistics +
    # the device's own user bias) and each adapter blended with it, b + w (adapter - b), w fitted by least squares
    # on the pooled validation sums (`common.blend`); the simulation's baselines fit on the same remaining ratings.
    validation_fraction: float = 0.0
    # Serve what validation chose: with blend sums (item-stats and validation-fraction on), the coordinator records
    # each persona version's blend weights (persona and personal adapters, fitted on the validation sums pooled over
    # the devices it was served to, at least eval-min-devices of them) in the registry; its cold-start service
    # serves the persona adapter at that weight, and after every evaluation round it sends every device the personal
    # weights by version, which the device's local API then serves at. Off under DP: the weights come from the
    # un-noised evaluation sums, which no (epsilon, delta) covers (docs/privacy.md).
    serve_blend: bool = True
    # With K > 1 each persona version's weight is fitted on that persona's few evaluation devices: add this many
    # devices' worth of the pool of every persona's nearest evaluation to its own sums (`common.blend.shrunk_weight`),
    # so a persona's weight leaves the pooled one only as its own evidence outweighs the prior. No effect with K=1.
    # Default: eval-min-devices' default, the least evidence the coordinator acts on elsewhere. Recorded in each
    # version's manifest, so every server process serves a version alike.
    blend_prior_devices: float = 5.0
    # A public warm start (`simulations.warm_start`): a PEFT adapter directory trained on users outside the
    # federation, which every fresh persona's version 0 starts from instead of a fresh LoRA (B = 0). Public data, not
    # personal: version 0's privacy record names its path and digest. "" = a fresh, data-independent adapter.
    warm_start: str = ""
    # Boosting from the private bias model: every adapter (persona and personal) learns a correction to the private
    # user+item bias model (released item statistics + the device's own user bias) instead of the whole rating; its
    # five logits are added to a prior whose expected rating is that model's (`common.scoring.base_prior_logits`),
    # in training, evaluation and serving. A flat adapter then predicts exactly the bias model. Needs item-stats.
    residual_to_bias: bool = False
    # A private collaborative base (`common.item_factors`): after the item statistics, this many rounds of federated
    # matrix factorisation over every device (each fits its own user factors and answers with its clipped gradient
    # for the item half; each round is one more discovery release, noised and accounted like the statistics). The
    # released item factors then replace the bias model as the private base everywhere it is used: the evaluation's
    # private baseline, the blend and the residual target, with each device's user factors fitted on the device.
    # 0 = off. Needs item-stats. With secure-aggregation every round's sum (and the centre's) is a secure sum in
    # groups, as discovery's: only group sums are unmasked (each round costs several message exchanges a group).
    item_factors_rounds: int = 0
    item_factors_rank: int = 32
    item_factors_reg: float = 0.2  # per-rating L2 penalty, as classical MF's (chosen on validation: docs/results.md)
    # a device fits its user half with reg x (its ratings + this many): exact minimisation otherwise fits a light
    # user's few ratings harder than classical MF's early-stopped descent does (`common.item_factors.fit_user`)
    item_factors_prior: float = 0.0
    item_factors_lr: float = 0.02  # the coordinator's Adam step on the item half
    # Share of the devices each item-factors round asks (a fresh uniform sample a round, at least two; 1: all).
    # Under DP each round is still accounted as if every device took part (no amplification claimed).
    item_factors_fraction: float = 1.0
    # L2 bound on one device's gradient, always applied. 50 rarely binds (a device's gradient norm is 10-40 at the
    # start), so without DP every rating counts in full; under DP it is the sensitivity the noise scales with, and a
    # smaller bound pays better (the LM-free runs use 5: docs/results.md).
    item_factors_clip: float = 50.0
    # After the rounds, release the population's mean user half (one more release, noised and accounted like a
    # round): devices shrink their own user half toward it instead of zero, and a device with no rating predicts
    # with it (`common.item_factors`). Lowers per-user MSE in every population measured (docs/results.md).
    item_factors_centre: bool = True
    # Secure aggregation (off by default): every sampled device uploads its delta in its persona's slot of a
    # K-slot vector, quantised and masked (SecAgg: pairwise masks, Shamir-shared seeds), and the coordinator
    # unmasks only the K per-persona sums and counts. The delta is clipped on the device to dp-user-clip under
    # user-level DP, else to max-update-norm, and each coordinate to [-range, range] (AdamW moves a coordinate by
    # at most ~3 x lr x local-steps, 0.012 at the defaults). A round aborts, releasing nothing, when fewer than
    # threshold x its cohort devices stay to the end. Updates weigh the same (no example counts); trimmed mean
    # and median need single updates and are refused.
    secure_aggregation: bool = False
    secure_aggregation_threshold: float = 0.6
    secure_aggregation_range: float = 0.1
    # Discovery's secure sums ask every device; SecAgg's secret sharing grows with n x threshold per device, so they
    # run in random groups of about this many devices (the coordinator learns each group's sum, not single answers).
    secure_aggregation_group: int = 32

    def __post_init__(self) -> None:
        # Counts and rates every run needs; a refusal names the run-config key. NaN compares as false everywhere,
        # so the float checks are written `not low < x <= high`, which NaN fails too.
        for name, low in (("num_rounds", 1), ("num_personas", 1), ("kmeans_iters", 1), ("min_train_nodes", 1),
                          ("local_steps", 1), ("personal_steps", 0), ("rows_per_step", 1), ("items_per_row", 1),
                          ("lora_rank", 1), ("lora_alpha", 1), ("eval_every", 1), ("eval_users", 0),
                          ("cold_start_threshold", 0), ("min_nodes", 1), ("rollback_min_devices", 1),
                          ("device_keep_versions", 1), ("item_factors_rounds", 0), ("item_factors_rank", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name.replace('_', '-')} must be an integer >= {low}, got {value!r}")
        if not 0.0 < self.fraction_train <= 1.0:
            raise ValueError(f"fraction-train must be in (0, 1], got {self.fraction_train}")
        if not 0.0 < self.lr <= 1.0:
            raise ValueError(f"lr must be in (0, 1], got {self.lr}")
        if not 0.0 <= self.rollback_margin < float("inf"):
            raise ValueError(f"rollback-margin must be finite and >= 0, got {self.rollback_margin}")
        if self.persona_candidates:
            ks = self.candidate_ks
            if len(ks) < 3 or min(ks) < 1:
                raise ValueError(f"persona-candidates needs at least three K >= 1, got {self.persona_candidates!r}")
            if self.kmeans_iters < 2:
                raise ValueError("persona-candidates needs kmeans-iters >= 2 (inertia is measured against the "
                                 "previous iteration's centroids)")
        if self.secure_aggregation_group < 3:
            raise ValueError(f"secure-aggregation-group must be >= 3, got {self.secure_aggregation_group}")
        if not 0.0 < self.server_lr <= 100.0:
            raise ValueError(f"server-lr must be in (0, 100], got {self.server_lr}")
        if self.server_lr_schedule not in SERVER_LR_SCHEDULES:
            raise ValueError(f"server-lr-schedule must be one of {SERVER_LR_SCHEDULES}, "
                             f"got {self.server_lr_schedule!r}")
        if not 0.0 <= self.personal_lr <= 1.0:  # also rejects NaN
            raise ValueError(f"personal-lr must be in [0, 1] (0: lr), got {self.personal_lr}")
        if not 0.0 <= self.validation_fraction <= 0.5:
            raise ValueError(f"validation-fraction must be in [0, 0.5], got {self.validation_fraction}")
        if self.item_factors_rounds and not self.item_stats:
            raise ValueError("item-factors-rounds needs item-stats = true (the factors extend the released statistics)")
        for name in ("item_factors_reg", "item_factors_lr", "item_factors_clip"):
            if not 0.0 < getattr(self, name) < float("inf"):
                raise ValueError(f"{name.replace('_', '-')} must be finite and > 0, got {getattr(self, name)!r}")
        if not 0.0 < self.item_factors_fraction <= 1.0:  # also refuses NaN
            raise ValueError(f"item-factors-fraction must be in (0, 1], got {self.item_factors_fraction!r}")
        if not 0.0 <= self.item_factors_prior < float("inf"):
            raise ValueError(f"item-factors-prior must be finite and >= 0, got {self.item_factors_prior!r}")
        if self.residual_to_bias and not self.item_stats:
            raise ValueError("residual-to-bias corrects the private bias model, which needs item-stats = true")
        if self.memory_items < 0:
            raise ValueError(f"memory-items must be >= 0, got {self.memory_items}")
        if self.discovery_features not in DISCOVERY_FEATURES:
            raise ValueError(f"discovery-features must be one of {DISCOVERY_FEATURES}, got {self.discovery_features!r}")
        if self.aggregation not in AGGREGATIONS:
            raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {self.aggregation!r}")
        if not 0.0 <= self.trim_fraction < 0.5:
            raise ValueError(f"trim-fraction must be in [0, 0.5), got {self.trim_fraction}")
        if not 0 <= self.max_update_norm < float("inf"):
            raise ValueError(f"max-update-norm must be finite and >= 0 (0 = off), got {self.max_update_norm}")
        if not 0 < self.max_examples < float("inf"):
            raise ValueError(f"max-examples must be finite and > 0, got {self.max_examples}")
        if not 0 <= self.blend_prior_devices < float("inf"):
            raise ValueError(f"blend-prior-devices must be finite and >= 0, got {self.blend_prior_devices}")
        if not 0 < self.round_timeout < float("inf"):
            raise ValueError(f"round-timeout must be finite and > 0 seconds, got {self.round_timeout}")
        # A DP setting that is NaN, infinite or negative must stop the run: NaN noise compares as "off" (NaN > 0 is
        # False), so a typo would silently train without the privacy the operator asked for, and an infinite
        # target or a delta of 1 would be accounted as a guarantee it is not.
        for name in DP_NON_NEGATIVE:
            value = getattr(self, name)
            if not 0.0 <= value < float("inf"):
                raise ValueError(f"{name.replace('_', '-')} must be finite and >= 0, got {value}")
        for name in ("dp_device_clip", "dp_user_clip"):
            value = getattr(self, name)
            if not 0.0 < value < float("inf"):
                raise ValueError(f"{name.replace('_', '-')} must be finite and > 0, got {value}")
        if not 0.0 < self.dp_delta < 1.0:
            raise ValueError(f"dp-delta must be in (0, 1), got {self.dp_delta}")
        if self.dp_device_records < 1:
            raise ValueError(f"dp-device-records must be >= 1, got {self.dp_device_records}")
        if self.reproducible and self.dp_secure_mode:
            raise ValueError("dp-secure-mode draws secret randomness; it cannot be combined with reproducible = true")
        if self.eval_min_devices < 1:
            raise ValueError(f"eval-min-devices must be >= 1, got {self.eval_min_devices}")
        if self.aggregation != "mean" and self.user_dp_enabled:
            # The Gaussian mechanism's sensitivity is that of a clipped sum; a trimmed mean or median has another.
            raise ValueError("robust aggregation cannot be combined with user-level DP; use aggregation='mean'")

        if self.secure_aggregation:
            if self.aggregation != "mean":
                raise ValueError(f"aggregation {self.aggregation!r} needs single updates, which secure aggregation "
                                 "hides from the coordinator; use aggregation='mean'")
            if not 0.5 < self.secure_aggregation_threshold <= 1.0:
                raise ValueError("secure-aggregation-threshold must be in (0.5, 1] (a majority, so the coordinator "
                                 f"cannot gather both secrets of one device), got {self.secure_aggregation_threshold}")
            if not 0 < self.secure_aggregation_range < float("inf"):
                raise ValueError(f"secure-aggregation-range must be finite and > 0, got "
                                 f"{self.secure_aggregation_range}")
            if not self.user_dp_enabled and self.max_update_norm <= 0:
                raise ValueError("secure aggregation clips deltas on the device to max-update-norm (or dp-user-clip "
                                 "under user-level DP); it cannot be 0")

    @property
    def secure(self) -> SecureAggregation | None:
        if not self.secure_aggregation:
            return None
        clip = self.dp_user_clip if self.user_dp_enabled else self.max_update_norm
        return SecureAggregation(self.secure_aggregation_threshold, self.secure_aggregation_range, clip)

    @classmethod
    def from_run_config(cls, run_config: dict) -> "FederationConfig":
        known = {f.replace("_", "-"): f for f in cls.__dataclass_fields__}
        unknown = sorted(set(run_config) - set(known))
        if unknown:
            raise ValueError(f"unknown run-config keys {unknown}; known: {sorted(known)}")
        values = {}
        for key, value in run_config.items():
            name = known[key]
            kind = type(getattr(cls, name))
            values[name] = kind(value) if kind is not bool else str(value).lower() in ("1", "true", "yes")
        return cls(**values)

    @property
    def candidate_ks(self) -> list[int]:
        return sorted({int(k) for k in self.persona_candidates.split(",") if k.strip()})

    @property
    def lora(self) -> LoraSettings:
        return LoraSettings(rank=self.lora_rank, alpha=self.lora_alpha,
                            targets=tuple(t.strip() for t in self.lora_targets.split(",") if t.strip()))

    @property
    def device_dp_enabled(self) -> bool:
        return self.dp_device_noise > 0 or self.dp_device_target_epsilon > 0

    @property
    def user_dp_enabled(self) -> bool:
        return self.dp_user_noise > 0 or self.dp_user_target_epsilon > 0

    def train(self, steps: int, lr: float | None = None) -> TrainConfig:
        return TrainConfig(steps=steps, rows_per_step=self.rows_per_step, items_per_row=self.items_per_row,
                           lr=self.lr if lr is None else lr, seed=self.seed)

    def personal_train(self) -> TrainConfig:
        return self.train(self.personal_steps, self.personal_lr or self.lr)
