"""Admin API (FastAPI) for persona versions and rollouts. OpenAPI page at /docs.

Scopes: `read` for GET endpoints and cold-start serving, `rollout` for canary / promote / rollback / pause /
resume, `admin` for everything plus the audit log and setting a stable version directly. /health is open.
Nothing here is per user: personas, persona versions and pooled metrics only.
"""

from __future__ import annotations

import io
import tarfile
from typing import Annotated, Any

from fastapi import Depends, FastAPI, HTTPException, Query, Request
from fastapi.responses import JSONResponse, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field

from server.auth import Principal, TokenStore
from server.registry import PersonaRegistry, RegistryError
from server.rollouts import Rollouts


class Reason(BaseModel):
    model_config = ConfigDict(extra="forbid")
    reason: str = Field("", max_length=1000)


class CanaryRequest(Reason):
    version: int
    percent: float = Field(gt=0, le=100, description="share of the persona's devices served the canary")


class StableRequest(Reason):
    version: int


class Page(BaseModel):
    items: list[dict[str, Any]]
    total: int
    limit: int
    offset: int


Limit = Annotated[int, Query(ge=1, le=500)]
Offset = Annotated[int, Query(ge=0)]


def create_app(registry: PersonaRegistry, tokens: TokenStore, serving=None) -> FastAPI:
    """`serving`: an optional `server.serving.ColdStartService` for the cold-start endpoints."""
    rollouts = Rollouts(registry)
    app = FastAPI(title="PersonaFL coordinator admin API", version="1")
    bearer = HTTPBearer(auto_error=False)

    def require(scope: str):
        def check(credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> Principal:
            if credentials is None:
                raise HTTPException(401, "missing bearer token", headers={"WWW-Authenticate": "Bearer"})
            principal = tokens.authenticate(credentials.credentials)
            if principal is None:
                raise HTTPException(401, "invalid token", headers={"WWW-Authenticate": "Bearer"})
            if not principal.allows(scope):
                raise HTTPException(403, f"token {principal.name!r} lacks the {scope!r} scope")
            return principal
        return check

    @app.exception_handler(RegistryError)
    def registry_error(_request: Request, exc: RegistryError) -> JSONResponse:
        return JSONResponse(status_code=exc.status, content={"detail": str(exc)})

    def persona_view(persona: int) -> dict:
        r = registry.rollout(persona)
        view = {k: r[k] for k in ("persona", "stable", "previous_stable", "canary", "percent", "paused")}
        view["versions"] = registry.versions(persona, limit=1)[1]
        view["stable_metrics"] = registry.evaluation(r["stable"]) if r["stable"] is not None else None
        view["canary_metrics"] = registry.evaluation(r["canary"]) if r["canary"] is not None else None
        return view

    def version_view(version: int) -> dict:
        v = registry.version(version)
        return {**{k: v[k] for k in v if k not in ("manifest", "path")}, "evaluation": registry.evaluation(version)}

    @app.get("/health")
    def health() -> dict:
        return {"status": "ok", "personas": len(registry.personas())}

    @app.get("/personas", response_model=Page)
    def list_personas(limit: Limit = 50, offset: Offset = 0, _: Principal = Depends(require("read"))) -> dict:
        personas = registry.personas()
        return {"items": [persona_view(p) for p in personas[offset:offset + limit]], "total": len(personas),
                "limit": limit, "offset": offset}

    @app.get("/personas/{persona}")
    def get_persona(persona: int, _: Principal = Depends(require("read"))) -> dict:
        return persona_view(persona)

    @app.get("/versions", response_model=Page)
    def list_versions(persona: int | None = None, limit: Limit = 50, offset: Offset = 0,
                      _: Principal = Depends(require("read"))) -> dict:
        items, total = registry.versions(persona, limit, offset)
        return {"items": [version_view(v["id"]) for v in items], "total": total, "limit": limit, "offset": offset}

    @app.get("/versions/{version}")
    def get_version(version: int, _: Principal = Depends(require("read"))) -> dict:
        return version_view(version)

    @app.get("/versions/{version}/manifest")
    def get_manifest(version: int, _: Principal = Depends(require("read"))) -> dict:
        return registry.version(version)["manifest"]

    @app.get("/versions/{version}/download")
    def download(version: int, _: Principal = Depends(require("read"))) -> StreamingResponse:
        """The version as a PEFT adapter directory in a .tar.gz (`PeftModel.from_pretrained` loads it unpacked)."""
        path = registry.path(version)
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
            tar.add(path, arcname=f"persona-version-{version}")
        buffer.seek(0)
        return StreamingResponse(buffer, media_type="application/gzip", headers={
            "Content-Disposition": f'attachment; filename="persona-version-{version}.tar.gz"'})

    @app.post("/personas/{persona}/canary")
    def canary(persona: int, body: CanaryRequest, who: Principal = Depends(require("rollout"))) -> dict:
        rollouts.start_canary(persona, body.version, body.percent, who.name, body.reason)
        return persona_view(persona)

    @app.post("/personas/{persona}/promote")
    def promote(persona: int, body: Reason, who: Principal = Depends(require("rollout"))) -> dict:
        rollouts.promote(persona, who.name, body.reason)
        return persona_view(persona)

    @app.post("/personas/{persona}/rollback")
    def rollback(persona: int, body: Reason, who: Principal = Depends(require("rollout"))) -> dict:
        rollouts.rollback(persona, who.name, body.reason)
        return persona_view(persona)

    @app.post("/personas/{persona}/pause")
    def pause(persona: int, body: Reason, who: Principal = Depends(require("rollout"))) -> dict:
        rollouts.pause(persona, who.name, body.reason, paused=True)
        return persona_view(persona)

    @app.post("/personas/{persona}/resume")
    def resume(persona: int, body: Reason, who: Principal = Depends(require("rollout"))) -> dict:
        rollouts.pause(persona, who.name, body.reason, paused=False)
        return persona_view(persona)

    @app.post("/personas/{persona}/stable")
    def set_stable(persona: int, body: StableRequest, who: Principal = Depends(require("admin"))) -> dict:
        rollouts.make_stable(persona, body.version, who.name, body.reason)
        return persona_view(persona)

    @app.get("/events", response_model=Page)
    def list_events(persona: int | None = None, limit: Limit = 50, offset: Offset = 0,
                    _: Principal = Depends(require("admin"))) -> dict:
        items, total = rollouts.events(persona, limit, offset)
        return {"items": items, "total": total, "limit": limit, "offset": offset}

    if serving is not None:
        serving.mount(app, require("read"), rollouts)
    return app
