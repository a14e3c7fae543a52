"""Cold-start serving on the coordinator: one base model in memory, many persona adapters resident.

A user too new to have a personal adapter is placed in a persona from their onboarding answers (the same naive
Bayes over aggregated onboarding counts the devices use) and scored with that persona's served version (stable,
or canary by their bucket). Adapters are peft named adapters on one `PeftModel` (`load_adapter` once, then
`set_adapter` per batch group; least recently used ones are unloaded beyond `max_resident`). A request may carry
several users; they are grouped by version so each adapter is switched to once per request.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pandas as pd
from fastapi import Depends, FastAPI
from peft import PeftModel
from pydantic import BaseModel, ConfigDict, Field

from common.config import PromptConfig
from common.model import load_base_model
from common.personas import FeatureSpace, Onboarding, cold_start_persona
from common.prompt import PromptBuilder, movie_text
from common.scoring import RatingHead, predict_with_prefix
from server.registry import PersonaRegistry, RegistryError

ONBOARDING_FILE = "onboarding.json"  # per-persona onboarding counts (aggregates), written by the ServerApp


def save_onboarding(path: Path, space: FeatureSpace, features: np.ndarray, counts: np.ndarray) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps({"space": asdict(space), "features": np.asarray(features).tolist(),
                                      "counts": np.asarray(counts).tolist()}))


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
    movies: list[int] = Field(min_length=1, max_length=500)


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
        self.resident: OrderedDict[int, str] = OrderedDict()  # version -> adapter name, least recent first
        self.lock = threading.Lock()  # one model: requests take turns (each is batched inside)
        tables = json.loads((registry.root / ONBOARDING_FILE).read_text())
        self.space = FeatureSpace(tuple(tables["space"]["occupations"]), tuple(tables["space"]["genres"]))
        self.features, self.counts = np.asarray(tables["features"]), np.asarray(tables["counts"])

    def assign(self, onboarding: Onboarding) -> int:
        return cold_start_persona(self.space.encode(onboarding), self.features, self.counts, self.space)

    def activate(self, version: int) -> None:
        """Make `version` the active adapter, loading it first if it is not resident."""
        name = f"v{version}"
        if version not in self.resident:
            path = str(self.registry.path(version))
            if self.model is None:
                self.model = PeftModel.from_pretrained(self.base, path, adapter_name=name)
            else:
                self.model.load_adapter(path, adapter_name=name)
            self.resident[version] = name
            if len(self.resident) > self.max_resident:
                old, old_name = self.resident.popitem(last=False)
                self.model.delete_adapter(old_name)
        self.resident.move_to_end(version)
        self.model.set_adapter(name)
        self.model.eval()

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
                for i, (v, profile, movies) in enumerate(jobs):
                    if v == version:
                        suffixes = [self.builder.suffix_ids(movie_text(self.items.loc[m])) for m in movies]
                        out[i] = predict_with_prefix(self.model, self.head, self.builder.prefix_ids(profile), suffixes)
        return out

    def mount(self, app: FastAPI, read, rollouts) -> None:
        """Add the cold-start endpoints to the admin API (`read` scope)."""
        service = self
        @app.post("/cold-start/assign")
        def assign(body: OnboardingIn, _=Depends(read)) -> dict:
            return {"persona": service.assign(body.parsed())}

        @app.post("/cold-start/score")
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
