"""Cold-start serving on the coordinator: one base model in memory, many persona adapters resident.

A user too new to have a personal adapter is placed in a persona from their onboarding answers (the same naive
Bayes over aggregated onboarding counts the devices use) and scored with that persona's served version (stable,
or canary by their bucket). Persona versions stay resident in memory as tensors (least recently used ones
dropped beyond `max_resident`); switching copies the requested version's LoRA matrices into the one adapter slot
of a peft model — a ~1.8 MB copy for SmolLM2, independent of how many are resident (peft's own `set_adapter` walks
every adapter of every layer: 114 ms per switch with 64 loaded, measured). A request may carry several users;
they are grouped by version so each adapter is switched to once per request.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from dataclasses import asdict
from functools import cached_property
from pathlib import Path
from typing import Annotated

import numpy as np
import pandas as pd
import torch
from fastapi import Depends, FastAPI
from peft import PeftModel
from pydantic import BaseModel, ConfigDict, Field

from common.config import PromptConfig
from common.model import load_base_model
from common.personas import FeatureSpace, Onboarding, cold_start_persona
from common.item_factors import ItemFactors, predict as mf_predict, zero_user
from common.item_stats import ItemStats, predict as bias_predict
from common.prompt import PromptBuilder, item_stats_text, movie_text
from common.scoring import RatingHead, predict_with_prefix
from server.registry import PersonaRegistry, RegistryError

ONBOARDING_FILE = "onboarding.json"  # per-persona onboarding counts (aggregates), written by the ServerApp
ITEM_STATS_FILE = "item_stats.npz"  # the released per-movie statistics, written by the ServerApp with item-stats
ITEM_FACTORS_FILE = "item_factors.npz"  # the released item half of MF, written with item-factors-rounds > 0


def save_onboarding(path: Path, space: FeatureSpace, features: np.ndarray, counts: np.ndarray) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps({"space": asdict(space), "features": np.asarray(features).tolist(),
                                      "counts": np.asarray(counts).tolist()}))


def load_onboarding(path: Path) -> tuple[FeatureSpace, np.ndarray, np.ndarray]:
    """The cold-start rule's tables as `save_onboarding` wrote them: (layout, per-persona feature counts K x F,
    persona sizes K)."""
    tables = json.loads(Path(path).read_text())
    space = FeatureSpace(tuple(tables["space"]["occupations"]), tuple(tables["space"]["genres"]))
    return space, np.asarray(tables["features"]), np.asarray(tables["counts"])


def onboarding_profile(o: Onboarding) -> str:
    """What the prompt says about a user known only from sign-up answers."""
    liked = ", ".join(o.liked_genres) or "no genre in particular"
    return (f"This user has not rated any movie yet. At sign-up they said: age {o.age}, gender {o.gender}, "
            f"occupation {o.occupation}; they like {liked}.")


class OnboardingIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    age: int = Field(ge=1, le=120)
    gender: str = Field(max_length=16)
    occupation: str = Field(max_length=64)
    liked_genres: list[str] = Field(default_factory=list, max_length=10)

    def parsed(self) -> Onboarding:
        return Onboarding(self.age, self.gender, self.occupation, tuple(self.liked_genres))


class ScoreIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    device_id: str = Field(min_length=1, max_length=128, description="bucketing key for canaries")
    onboarding: OnboardingIn
    # Bounded like every id of the admin API: a 70-bit movie id is a 422, not an overflow in the catalogue lookup.
    movies: list[Annotated[int, Field(ge=0, le=2**31 - 1)]] = Field(min_length=1, max_length=500)


class ScoreBatch(BaseModel):
    model_config = ConfigDict(extra="forbid")
    requests: list[ScoreIn] = Field(min_length=1, max_length=256)


class ColdStartService:
    def __init__(self, registry: PersonaRegistry, base_model: str, items: pd.DataFrame, max_resident: int = 64,
                 device: str | None = None):
        self.registry = registry
        self.items = items
        self.max_resident = max_resident
        self.base, tokenizer = load_base_model(base_model, device=device)
        self.head = RatingHead(tokenizer)
        self.builder = PromptBuilder(tokenizer, PromptConfig())
        self.model: PeftModel | None = None
        self.slots: list[tuple[str, torch.nn.Parameter]] = []  # the model's one adapter slot, by state-dict key
        self.resident: OrderedDict[int, list[torch.Tensor]] = OrderedDict()  # least recently used first
        self.active: int | None = None
        self.lock = threading.Lock()  # one model: requests take turns (each is batched inside)
        # The released per-movie statistics (written by the ServerApp with item-stats): versions trained with them
        # quote them in each movie's prompt, and residual versions correct the item-bias model they give.
        stats_file = registry.root / ITEM_STATS_FILE
        self.stats = ItemStats.from_arrays(dict(np.load(stats_file))) if stats_file.is_file() else None
        factors_file = registry.root / ITEM_FACTORS_FILE
        self.factors = ItemFactors.from_arrays(dict(np.load(factors_file))) if factors_file.is_file() else None
        self.space, self.features, self.counts = load_onboarding(registry.root / ONBOARDING_FILE)

    def assign(self, onboarding: Onboarding) -> int:
        return cold_start_persona(self.space.encode(onboarding), self.features, self.counts, self.space)

    def activate(self, version: int) -> None:
        """Make `version` the active adapter: copy its resident LoRA matrices into the model's adapter slot."""
        if version not in self.resident:
            arrays = self.registry.arrays(version)
            if self.model is None:  # the first version's PEFT directory gives the adapter shape
                self.model = PeftModel.from_pretrained(self.base, str(self.registry.path(version))).eval()
                self.slots = [(n.replace(".default", ""), p) for n, p in self.model.named_parameters() if "lora_" in n]
            if set(arrays) != {k for k, _ in self.slots} or any(arrays[k].shape != tuple(p.shape) for k, p in self.slots):
                raise RegistryError(f"version {version} does not have the served adapter shape", 409)
            self.resident[version] = [torch.from_numpy(arrays[k]).to(p.device, p.dtype) for k, p in self.slots]
            if len(self.resident) > self.max_resident:
                self.resident.popitem(last=False)
        self.resident.move_to_end(version)
        if self.active != version:
            with torch.no_grad():
                for (_, slot), tensor in zip(self.slots, self.resident[version]):
                    slot.copy_(tensor)
            self.active = version

    def score(self, jobs: list[tuple[int, str, list[int]]]) -> list[np.ndarray]:
        """Expected ratings for (version, profile text, movie ids) jobs, grouped by version."""
        for _, _, movies in jobs:
            unknown = [m for m in movies if m not in self.items.index]
            if unknown:
                raise RegistryError(f"unknown movie ids {unknown[:5]}", 404)
        out: list[np.ndarray | None] = [None] * len(jobs)
        with self.lock:
            for version in sorted({v for v, _, _ in jobs}):
                self.activate(version)
                quote, residual, factors = self._serving(version)
                weight = self._blend_weight(version, quote)
                for i, (v, profile, movies) in enumerate(jobs):
                    if v == version:
                        suffixes = [self.builder.suffix_ids(self._movie(m, quote)) for m in movies]
                        # a user known from sign-up answers only has no user half: the item half is the base (MF's
                        # zero user, or the item-bias model)
                        base = None if not (residual or weight < 1.0) else (
                            mf_predict(zero_user(self.factors), np.asarray(movies), self.factors) if factors
                            else bias_predict(0.0, np.asarray(movies), self.stats))
                        pred = predict_with_prefix(self.model, self.head, self.builder.prefix_ids(profile), suffixes,
                                                   base=base if residual else None)
                        # the persona adapter blended with that base at the weight fitted for this version on its
                        # devices' validation ratings (`serve-blend`; they had their own user half: a new user's
                        # base is the item half alone, so this weight is the devices', not one fitted on new users)
                        out[i] = pred if weight >= 1.0 else base + weight * (pred - base)
        return out

    def _blend_weight(self, version: int, quote: bool) -> float:
        """The persona adapter's serving blend weight for `version` (`PersonaRegistry.serving_weights`: fitted on its
        own evaluation or its persona's nearest one, with the prior toward the other personas'), 1 (the adapter
        alone) without one.
        `quote`: the version was trained with the released statistics (`_serving`, which has checked they and any
        factors it needs are here); devices blend only against them (`Device.can_blend`), so a version trained
        without them has no weight that means anything here."""
        served = self.registry.serving_weight(version)  # the devices' rule: own, else nearest evaluated version
        return 1.0 if served is None or not quote else float(served[0]["persona"])

    def _serving(self, version: int) -> tuple[bool, bool, bool]:
        """(quote the statistics, correct a private base, that base is MF) for a version, from its manifest."""
        serving = self.registry.version(version)["manifest"].get("serving", {})
        wants = bool(serving.get("item_stats")), bool(serving.get("residual_to_bias")), bool(serving.get("item_factors"))
        if any(wants) and self.stats is None:
            raise RegistryError(f"version {version} was trained with the released item statistics, which are "
                                f"missing from the registry ({ITEM_STATS_FILE})", 409)
        if wants[2] and self.factors is None:
            raise RegistryError(f"version {version} was trained with the released item factors, which are "
                                f"missing from the registry ({ITEM_FACTORS_FILE})", 409)
        return wants

    def _movie(self, item: int, quote: bool) -> str:
        text = movie_text(self.items.loc[item])
        return f"{text}\n{item_stats_text(item, self._stats_frame)}" if quote else text

    @cached_property
    def _stats_frame(self) -> pd.DataFrame:
        return self.stats.frame()

    def mount(self, app: FastAPI, read, rollouts, responses: dict | None = None) -> None:
        """Add the cold-start endpoints to the admin API (`read` scope); `responses`: their documented errors."""
        service = self
        @app.post("/cold-start/assign", responses=responses)
        def assign(body: OnboardingIn, _=Depends(read)) -> dict:
            return {"persona": service.assign(body.parsed())}

        @app.post("/cold-start/score", responses=responses)
        def score(body: ScoreBatch, _=Depends(read)) -> dict:
            jobs, meta = [], []
            for r in body.requests:
                onboarding = r.onboarding.parsed()
                persona = service.assign(onboarding)
                version = rollouts.assign(r.device_id, persona)
                if version is None:
                    raise RegistryError(f"persona {persona} has no served version yet", 409)
                jobs.append((version, onboarding_profile(onboarding), r.movies))
                meta.append((persona, version))
            results = service.score(jobs)
            return {"results": [{"persona": p, "version": v, "ratings": [round(float(x), 4) for x in pred]}
                                for (p, v), pred in zip(meta, results)]}
