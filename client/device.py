"""One user's device: their ratings, their prompts, local training and scoring. Knows nothing of Flower.

The base model is loaded once per process and shared by every device object in it (in a simulation one
process plays many devices); each device swaps its adapter weights in before it uses the model.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field, replace
from functools import cached_property, lru_cache

import numpy as np
import pandas as pd
import torch

from common import blend
from common.adapters import adapter_arrays, add_lora, load_adapter_arrays
from common.config import DeviceDP, LoraSettings, PromptConfig, ScoringConfig, TrainConfig
from common.data import MovieLens
from common.item_factors import (ItemFactors, fit_user, out_of_fold, predict as mf_predict, read_release,
                                 release_arrays)
from common.item_stats import ItemStats, predict as bias_predict, user_bias
from common.memory import catalogue_embeddings, recalled_text
from common.model import load_base_model
from common.personas import Onboarding
from common.timing import phase
from common.prompt import PromptBuilder, item_stats_text, movie_text, user_profile
from common.privacy import PrivacyLedger
from common.scoring import RatingHead, predict_with_prefix, rating_nll
from common.training import PackedRow, pack, packed_rating_logits, train_local, train_local_dp


@dataclass
class Runtime:
    """The process-wide base model with one LoRA slot, its tokenizer and the rating head."""

    model: object
    tokenizer: object
    head: RatingHead
    builder: PromptBuilder
    pad_id: int


SERVING = "serving-context"  # the store name of what the personal adapter was trained against (`serving_context`)


@lru_cache(maxsize=2)
def runtime(base_model: str, lora: LoraSettings, device: str | None = None) -> Runtime:
    model, tokenizer = load_base_model(base_model, device=device)
    peft_model = add_lora(model, lora)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return Runtime(peft_model, tokenizer, RatingHead(tokenizer), PromptBuilder(tokenizer, PromptConfig()), pad)


@dataclass
class Device:
    user: int
    data: MovieLens
    train: pd.DataFrame  # this user's training ratings only
    test: pd.DataFrame  # this user's held-out ratings only
    rt: Runtime
    scoring: ScoringConfig = field(default_factory=ScoringConfig)
    memory_items: int = 0  # long-term memory: similar past ratings recalled into each movie's prompt
    # released per-movie statistics (`common.item_stats`): quoted in each movie's prompt, and the item half of the
    # private user+item bias model the blend leans on; None: neither
    released: ItemStats | None = None
    # this user's latest training ratings held out of all training (`validation-fraction`): blend weights are
    # fitted on them, never on test ratings
    val: pd.DataFrame | None = None
    # the adapter learns a correction to the private user+item bias model (`residual-to-bias`): its logits are
    # added to a prior whose expected rating is that model's prediction, in training and in every prediction
    residual: bool = False
    # released item factors (`common.item_factors`, `item-factors-rounds`) and the penalty (per rating, prior
    # count) to fit the user half with: with them the private base is MF (this device's user factors, fitted
    # here) instead of the bias model; None: bias
    factors: ItemFactors | None = None
    factors_reg: float = 0.2
    factors_prior: float = 0.0
    # the personal adapter's weight in what serving returns, b + w (adapter - b) with b the private base
    # (`common.blend`): fitted by the coordinator on pooled validation sums for the persona version this adapter was
    # derived from, and sent back (`client.client_app`'s "blend" query). 1: the adapter alone (no weight known yet).
    # Evaluation always scores the adapter itself; only serving (`served`) applies the weight.
    blend_weight: float = 1.0
    FOLDS = 5  # out-of-fold user factors for the training targets' base (`training_bases`)

    def use_item_stats(self, stats: ItemStats) -> "Device":
        self.released = stats
        for derived in ("_stats_frame", "_user_bias"):  # views of the previous release, if any
            self.__dict__.pop(derived, None)
        return self

    def use_item_factors(self, factors: ItemFactors, reg: float, prior: float = 0.0) -> "Device":
        self.factors, self.factors_reg, self.factors_prior = factors, reg, prior
        for derived in ("_user_half", "_out_of_fold"):  # fitted against the previous release, if any
            self.__dict__.pop(derived, None)
        return self

    def serving_context(self) -> bytes:
        """What this device's predictions depend on besides the adapter and its ratings: the released statistics its
        prompts quote and whether the adapter corrects the private bias model. Stored beside the personal adapter,
        so on-device serving scores the way that adapter was trained (npz; no pickles)."""
        buf = io.BytesIO()
        factors = {} if self.factors is None else {
            f"mf-{k}": v for k, v in release_arrays(self.factors, self.factors_reg, self.factors_prior).items()}
        np.savez(buf, residual=np.array([self.residual]), blend_weight=np.array([self.blend_weight]),
                 **({} if self.released is None else self.released.to_arrays()), **factors)
        return buf.getvalue()

    def use_serving_context(self, payload: bytes) -> "Device":
        released, residual, factors, self.blend_weight = read_serving_context(payload)
        if released is not None:
            self.use_item_stats(released)
        if factors is not None:
            self.use_item_factors(*factors)
        self.residual = residual and self.released is not None  # nothing to correct without the statistics
        return self

    def served(self, pred: np.ndarray, items) -> np.ndarray:
        """What serving returns for `items` given the adapter's predictions `pred`: the blend with the private base
        at `blend_weight` (the adapter alone at 1, or when there is no base: no released statistics)."""
        if self.blend_weight >= 1.0 or self.released is None:
            return pred
        base = self.bias_of(items)
        return base + self.blend_weight * (np.asarray(pred, np.float64) - base)

    @cached_property
    def _stats_frame(self) -> pd.DataFrame:
        return self.released.frame()

    @cached_property
    def profile(self) -> str:
        return user_profile(self.train, self.data.items)

    @cached_property
    def prefix(self) -> list[int]:
        return self.rt.builder.prefix_ids(self.profile)

    def _movie(self, item) -> str:
        text = movie_text(self.data.items.loc[item])
        return text if self.released is None else f"{text}\n{item_stats_text(item, self._stats_frame)}"

    def _suffixes(self, items) -> list[list[int]]:
        catalogue = self.data.items
        if self.memory_items <= 0:
            return [self.rt.builder.suffix_ids(self._movie(i)) for i in items]
        embeddings, history = catalogue_embeddings(catalogue), self.train[["item", "rating"]]
        return [self.rt.builder.suffix_ids(self._movie(i),
                                           recalled_text(i, history, catalogue, embeddings, self.memory_items))
                for i in items]

    @cached_property
    def _target_rows(self) -> pd.DataFrame:
        """Training targets exclude the few movies quoted in the profile, whose rating the prompt gives away."""
        quoted = set(self.train.sort_values(["ts", "item"]).tail(PromptConfig().recent_items)["item"])
        rows = self.train[~self.train["item"].isin(quoted)]
        return self.train if rows.empty else rows

    @cached_property
    def train_examples(self) -> tuple[list[list[int]], np.ndarray]:
        with phase("device: building prompts"):
            rows = self._target_rows
            return self._suffixes(rows["item"]), rows["rating"].to_numpy(np.float64)

    @property
    def train_items(self) -> np.ndarray:
        """The item id of each training example (the DP records are keyed hashes of these)."""
        return self._target_rows["item"].to_numpy()

    @cached_property
    def test_examples(self) -> tuple[list[list[int]], np.ndarray]:
        with phase("device: building prompts"):
            return self._suffixes(self.test["item"]), self.test["rating"].to_numpy(np.float64)

    @cached_property
    def val_examples(self) -> tuple[list[list[int]], np.ndarray]:
        val = self.test.iloc[:0] if self.val is None else self.val
        with phase("device: building prompts"):
            return self._suffixes(val["item"]), val["rating"].to_numpy(np.float64)

    @property
    def n_train(self) -> int:
        return len(self.train)

    def onboarding(self, space_genres: int = 3) -> Onboarding:
        """The answers this user would give at sign-up: demographics and a few liked genres."""
        u = self.data.users.loc[self.user]
        genres = self.train.assign(g=self.data.items.loc[self.train["item"], "genres"].to_numpy()).explode("g")
        liked = genres[genres["rating"] >= 4]["g"].dropna().value_counts().index[:space_genres]
        return Onboarding(int(u["age"]), str(u["gender"]), str(u["occupation"]), tuple(liked))

    def train_adapter(self, arrays: dict[str, np.ndarray], cfg: TrainConfig, dp: DeviceDP | None = None,
                      ledger: PrivacyLedger | None = None) -> tuple[dict[str, np.ndarray], dict]:
        """Start from `arrays`, train locally (DP-SGD charged to `ledger` when `dp` is given); returns the trained
        weights and metrics. Raises `BudgetExhausted` (nothing trained) when the ledger cannot afford it."""
        load_adapter_arrays(self.rt.model, arrays)
        suffixes, ratings = self.train_examples
        bases = self.training_bases()
        if dp is None:  # non-private training: reproducible per user from the run's seed
            cfg = replace(cfg, seed=cfg.seed * 1_000_003 + self.user)
            metrics = train_local(self.rt.model, self.rt.head, self.prefix, suffixes, ratings, cfg,
                                  pad_id=self.rt.pad_id, bases=bases)
        else:  # DP-SGD draws secret randomness unless the simulation's reproducible mode gave a seed
            if dp.seed is not None:
                dp = replace(dp, seed=dp.seed * 1_000_003 + self.user)
            metrics = train_local_dp(self.rt.model, self.rt.head, self.prefix, suffixes, ratings, cfg, dp, ledger,
                                     pad_id=self.rt.pad_id, items=self.train_items,
                                     record_key=str(self.user).encode(), bases=bases)
        return adapter_arrays(self.rt.model), metrics

    def predict(self, arrays: dict[str, np.ndarray], held_out: str = "test") -> np.ndarray:
        """Expected ratings of the `held_out` ("test" or "val") ratings under `arrays`."""
        load_adapter_arrays(self.rt.model, arrays)
        suffixes, _ = self.test_examples if held_out == "test" else self.val_examples
        if not suffixes:
            return np.empty(0)
        return predict_with_prefix(self.rt.model, self.rt.head, self.prefix, suffixes,
                                   batch_size=self.scoring.batch_size, pad_id=self.rt.pad_id,
                                   base=self.bases(self._held_out(held_out)["item"]))

    @torch.no_grad()
    def train_losses(self, arrays: dict[str, np.ndarray], limit: int, items_per_row: int = 8) -> np.ndarray:
        """Cross-entropy of up to `limit` of this user's training ratings under `arrays` (membership tests)."""
        load_adapter_arrays(self.rt.model, arrays)
        suffixes, ratings = self.train_examples
        bases = self.training_bases()
        rows = [PackedRow(self.prefix, suffixes[i:i + items_per_row], list(ratings[i:i + items_per_row]),
                          None if bases is None else list(bases[i:i + items_per_row]))
                for i in range(0, min(limit, len(suffixes)), items_per_row)]
        batch = pack(rows, self.rt.pad_id)
        logits = packed_rating_logits(self.rt.model, self.rt.head, batch)
        return rating_nll(logits, batch.ratings.to(logits.device)).cpu().numpy()[:limit]

    def errors(self, arrays: dict[str, np.ndarray]) -> dict[str, float]:
        """Sums of squared and absolute errors on the held-out ratings (sums aggregate exactly)."""
        return _error_sums(self.predict(arrays), self.test_examples[1])

    @property
    def can_blend(self) -> bool:
        return self.released is not None and self.val is not None and len(self.val) > 0

    def bias(self, held_out: str = "test") -> np.ndarray:
        """The private user+item bias model's predictions of the `held_out` ratings."""
        return self.bias_of(self._held_out(held_out)["item"])

    def bias_of(self, items) -> np.ndarray:
        """The private base model's predictions for `items`: with released item factors, MF (their item half, this
        device's own user factors); else user+item bias (released item statistics, this device's own user bias).
        The user half is fitted on the device, on its training ratings."""
        if self.released is None:
            raise ValueError("the private bias model needs released item statistics (item-stats)")
        if self.factors is not None:
            return mf_predict(self._user_half, np.asarray(items), self.factors)
        return bias_predict(self._user_bias, np.asarray(items), self.released)

    @cached_property
    def _user_half(self) -> tuple[float, np.ndarray]:
        return fit_user(self.train["item"].to_numpy(), self.train["rating"].to_numpy(), self.factors,
                        self.factors_reg, self.factors_prior)

    def training_bases(self) -> np.ndarray | None:
        """The base the adapter corrects on its own training targets (`_target_rows`), None without `residual`.
        MF's user factors fitted on the very ratings they score have absorbed much of those ratings' residual, so
        the adapter would learn to correct errors far smaller than those it meets on new ratings: each target's
        base comes from user factors fitted on the other folds of this device's ratings instead (the bias model's
        single shrunk user bias barely overfits and keeps its in-sample base)."""
        if not self.residual:
            return None
        if self.factors is None:
            return self.bias_of(self._target_rows["item"])
        return self._out_of_fold

    @cached_property
    def _out_of_fold(self) -> np.ndarray:
        every = out_of_fold(self.train["item"].to_numpy(), self.train["rating"].to_numpy(), self.factors,
                            self.factors_reg, self.factors_prior, self.FOLDS, seed=self.user)
        return every[self.train.index.get_indexer(self._target_rows.index)]

    @cached_property
    def _user_bias(self) -> float:
        return user_bias(self.train["item"].to_numpy(), self.train["rating"].to_numpy(), self.released)

    def bases(self, items) -> np.ndarray | None:
        """What the adapter corrects for `items`: the private bias model's predictions with `residual`, else None."""
        return self.bias_of(items) if self.residual else None

    def _held_out(self, held_out: str) -> pd.DataFrame:
        return self.test if held_out == "test" else self.test.iloc[:0] if self.val is None else self.val

    def evaluation_sums(self, adapters: dict[str, dict[str, np.ndarray]]) -> dict[str, float]:
        """Error sums of each named adapter on the test ratings ("<name>_sse", "<name>_sae", "n"); with released
        item statistics and validation ratings also the private bias model's ("bias_sse", "bias_sae") and each
        adapter's blend sums on validation and test ("<name>_val_rd", ..., `common.blend`), "n_val"."""
        true = self.test_examples[1]
        out: dict[str, float] = {"n": float(len(true))}
        blend_ = self.can_blend
        if blend_:
            b_test, b_val, y_val = self.bias("test"), self.bias("val"), self.val_examples[1]
            out.update(bias_sse=float(((b_test - true) ** 2).sum()), bias_sae=float(np.abs(b_test - true).sum()),
                       n_val=float(len(y_val)))
        scored: dict[int, tuple[np.ndarray, np.ndarray | None]] = {}  # the same adapter under two names: scored once
        for name, arrays in adapters.items():
            if id(arrays) not in scored:
                scored[id(arrays)] = (self.predict(arrays), self.predict(arrays, "val") if blend_ else None)
            pred, pred_val = scored[id(arrays)]
            errors = _error_sums(pred, true)
            out.update({f"{name}_sse": errors["sse"], f"{name}_sae": errors["sae"]})
            if blend_:
                for held_out, p, b, y in (("test", pred, b_test, true),
                                          ("val", pred_val, b_val, y_val)):
                    sums = blend.residual_sums(p, b, y)
                    out.update({f"{name}_{held_out}_{k}": sums[k] for k in ("rd", "dd")})
        return out


def read_serving_context(payload: bytes) -> tuple[ItemStats | None, bool, tuple[ItemFactors, float, float] | None,
                                                 float]:
    """(released statistics or None, residual flag, (item factors, penalty, prior count) or None, blend weight)
    from `Device.serving_context`'s bytes. A context written before blend weights existed serves the adapter alone
    (weight 1); a weight that is not one number in [0, 1] is refused (ValueError)."""
    with np.load(io.BytesIO(payload), allow_pickle=False) as stored:
        arrays = {k: stored[k] for k in stored.files}
    residual = bool(arrays.pop("residual").reshape(-1)[0])
    weight = arrays.pop("blend_weight", np.array([1.0]))
    if weight.size != 1 or weight.dtype.kind not in "fiu" or not 0.0 <= float(weight.reshape(-1)[0]) <= 1.0:
        raise ValueError("the serving context's blend weight must be one number in [0, 1]")
    mf = {k[3:]: arrays.pop(k) for k in list(arrays) if k.startswith("mf-")}
    factors = read_release(mf) if mf else None
    return (ItemStats.from_arrays(arrays) if arrays else None), residual, factors, float(weight.reshape(-1)[0])


def _error_sums(pred: np.ndarray, true: np.ndarray) -> dict[str, float]:
    return {"sse": float(((pred - true) ** 2).sum()), "sae": float(np.abs(pred - true).sum()), "n": float(len(true))}
