"""The device's local inference API: its owner's predictions from the personal adapter, on this device only.

Served on a Unix socket (owner-only permissions) or loopback, and every call needs the device's local API token
(`<home>/api.token`, mode 0600). The personal adapter is decrypted from the encrypted store into memory for each
request that needs it (never to a file); before the device has one, the base model scores with the profile only.
Two engines do the scoring: torch + peft (the reference) or ONNX Runtime (`client.onnx_serving`; the graphs are
exported once per base model and cached, and the decrypted adapter is a graph input).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from pathlib import Path

import numpy as np
from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field

from client.device import SERVING, Device, runtime
from client.local_data import LocalDataError, Owner, device_data, split_own
from client.store import EncryptedStore
from common.adapters import adapter_arrays, load_adapter_arrays
from common.config import FederationConfig, ScoringConfig
from common.scoring import encode_prefix, predict_with_prefix


class Movies(BaseModel):
    model_config = ConfigDict(extra="forbid")
    movies: list[int] = Field(min_length=1, max_length=1000)


class RankRequest(Movies):
    top_k: int = Field(10, ge=1, le=1000)


class NewRating(BaseModel):
    model_config = ConfigDict(extra="forbid")
    item: int
    rating: float = Field(ge=1, le=5, allow_inf_nan=False)
    ts: int | None = None


ENGINES = ("torch", "onnx")


def create_local_app(settings: dict, store: EncryptedStore, status, engine: str = "torch") -> FastAPI:
    """`settings`: the enrolment record (`client.daemon`); `status`: a callable giving the status dict; `engine`:
    "torch" or "onnx"."""
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
    cfg = FederationConfig(base_model=settings["base_model"], dataset=settings["catalogue"])
    scorer = None
    if engine == "onnx":
        from client.onnx_serving import OnnxScorer, export

        scorer = OnnxScorer(export(cfg.base_model, cfg.lora))
    # The owner's encoded profile prefix under their current adapter (keyed by both), in memory only: it changes
    # only when a rating arrives or a new adapter is stored, so a request usually pays for its movies alone.
    prefix_cache: dict[tuple, object] = {}
    owner = Owner(settings["user_id"], settings["age"], settings["gender"], settings["occupation"])
    data_path = Path(settings["data_path"])
    token = Path(settings["home"], "api.token").read_text().strip()
    bearer = HTTPBearer(auto_error=False)
    app = FastAPI(title="PersonaFL device API", version="1")

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        # FastAPI's own handler echoes every rejected value, and NaN or Infinity (which Python's JSON parser accepts
        # in a request) cannot be written back as JSON: it failed with a 500. Where and why is enough to fix a
        # request, so no value is echoed.
        return JSONResponse(status_code=422, content={"detail": [
            {"loc": [str(part) for part in e.get("loc", ())], "msg": str(e.get("msg", "")), "type": str(e.get("type", ""))}
            for e in exc.errors()]})

    def authorised(credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:
        if credentials is None or not hmac.compare_digest(credentials.credentials, token):
            raise HTTPException(401, "missing or wrong local API token", headers={"WWW-Authenticate": "Bearer"})

    def device() -> Device:
        try:
            data = device_data(data_path, cfg.dataset, owner)
        except LocalDataError as e:
            raise HTTPException(409, str(e)) from None
        # Serving scores with the owner's whole history as the profile, the rating posted a moment ago included.
        train, test = split_own(data.ratings)
        d = Device(owner.user, data, train, test, runtime(cfg.base_model, cfg.lora), ScoringConfig(),
                   cfg.memory_items)
        # Score the way the personal adapter was trained: the released statistics in the prompts, the prior of the
        # private bias model under a residual adapter, its blend weight (stored with the adapter by the client app).
        if store.versions(str(owner.user), SERVING):
            d.use_serving_context(store.get_bytes(str(owner.user), SERVING))
        return d

    def predict(d: Device, movies: list[int]) -> np.ndarray:
        unknown = [m for m in movies if m not in d.data.items.index]
        if unknown:
            raise HTTPException(404, f"unknown movie ids {unknown[:5]}")
        user = str(owner.user)
        if store.versions(user, "personal"):
            arrays = {k: v.numpy() for k, v in store.get_adapter(user, "personal").items()}
        else:  # no personal adapter yet: the base model (the adapter's zero-initialised state)
            arrays = {k: np.zeros_like(v) if "lora_B" in k else v for k, v in adapter_arrays(d.rt.model).items()}
        digest = hashlib.blake2b(digest_size=16)
        for k in sorted(arrays):
            digest.update(np.ascontiguousarray(arrays[k], np.float32).tobytes())
        key = (tuple(d.prefix), digest.digest())
        past = prefix_cache.get(key)
        if scorer is not None:
            try:
                flat = scorer.flatten(arrays)
            except ValueError as e:  # an adapter whose layout is not the exported graph's
                raise HTTPException(409, f"the ONNX engine cannot serve this adapter: {e}") from None
            past = scorer.encode_prefix(d.prefix, flat) if past is None else past
            pred = scorer.score(past, d._suffixes(movies), flat, base=d.bases(movies))
        else:
            load_adapter_arrays(d.rt.model, arrays)
            past = encode_prefix(d.rt.model, d.prefix) if past is None else past
            pred = predict_with_prefix(d.rt.model, d.rt.head, d.prefix, d._suffixes(movies), pad_id=d.rt.pad_id,
                                       cache=past, base=d.bases(movies))
        if key not in prefix_cache:
            prefix_cache.clear()
            prefix_cache[key] = past
        # The personal adapter blended with the private base at the weight the federation fitted for it on
        # validation ratings (`Device.served`; the adapter alone until one is sent).
        return d.served(pred, movies)

    @app.get("/status")
    def get_status(_=Depends(authorised)) -> dict:
        return status()

    @app.post("/score")
    def score(body: Movies, _=Depends(authorised)) -> dict:
        pred = predict(device(), body.movies)
        return {"ratings": [{"movie": m, "rating": round(float(p), 4)} for m, p in zip(body.movies, pred)]}

    @app.post("/rank")
    def rank(body: RankRequest, _=Depends(authorised)) -> dict:
        pred = predict(device(), body.movies)
        order = np.argsort(-pred, kind="stable")[: body.top_k]
        return {"ranking": [{"movie": body.movies[i], "rating": round(float(pred[i]), 4)} for i in order]}

    @app.post("/ratings")
    def record(body: NewRating, _=Depends(authorised)) -> dict:
        d = device()
        if body.item not in d.data.items.index:
            raise HTTPException(404, f"unknown movie id {body.item}")
        with open(data_path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"item": body.item, "rating": body.rating, "ts": body.ts or int(time.time())}) + "\n")
        return {"ratings": len(device().data.ratings)}

    return app
