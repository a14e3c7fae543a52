"""Admin API (FastAPI) for persona versions and rollouts. OpenAPI page at /docs.

Scopes: `read` for GET endpoints and cold-start serving, `rollout` for canary / promote / rollback / pause /
resume, `admin` for everything plus the audit log and setting a stable version directly. /health is open, and so
is /dashboard, the operator's web page (`server/dashboard.html`): it holds no data, asks for a token and calls the
endpoints here with it, so every figure it shows and every button it has is behind the same checks.
Nothing here is per user: personas, persona versions and pooled metrics only.

Order of checks for every request: bearer token (401) and scope (403) first, from the headers alone; then the body
is read up to `max_body` bytes (413) and must be UTF-8 JSON without NaN/Infinity (422, 415 for another content
type); then FastAPI validates the fields (422), and the registry answers 404 / 409. Every status an operation can
answer is in its OpenAPI entry.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import math
import re
import tarfile
from collections.abc import Callable
from pathlib import Path as FilePath
from typing import Annotated, Any, Generic, Literal, TypeVar

from fastapi import Depends, FastAPI, HTTPException, Path, Query, Request
from fastapi.dependencies.models import Dependant
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.routing import APIRoute
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

from server.auth import Principal, TokenStore
from server.registry import PersonaRegistry, RegistryError
from server.rollouts import Rollouts

# Ids and offsets fit PostgreSQL's INTEGER (and so SQLite's 64-bit one): larger values are a 422, not an
# OverflowError from the database driver.
MAX_ID = 2**31 - 1
MAX_BODY = 1 << 20  # bytes; the largest legitimate body (a full /cold-start/score batch) is well under this
DASHBOARD = FilePath(__file__).with_name("dashboard.html")


Item = TypeVar("Item")


class Reason(BaseModel):
    model_config = ConfigDict(extra="forbid")
    # No NUL: PostgreSQL's text type cannot hold one (a 500 there, stored on SQLite).
    reason: str = Field("", max_length=1000, pattern=r"^[^\x00]*$")


def _json_integer(value: Any) -> Any:
    """JSON Schema's integer, which the OpenAPI document promises: 5 and 5.0, but not `true` or "5" (pydantic's lax
    mode would take those as 5, its strict mode would refuse 5.0)."""
    if isinstance(value, (bool, str)):
        raise ValueError("must be a JSON integer")
    return value


JsonInt = Annotated[int, BeforeValidator(_json_integer)]


# Typed as JSON Schema types them (query and path values are text, so those stay lax).
class CanaryRequest(Reason):
    model_config = ConfigDict(extra="forbid", json_schema_extra={
        "examples": [{"version": 2, "percent": 10, "reason": "round 2 looks better offline"}]})
    version: JsonInt = Field(ge=0, le=MAX_ID)
    percent: float = Field(gt=0, le=100, allow_inf_nan=False, strict=True,
                           description="share of the persona's devices served the canary")


class StableRequest(Reason):
    version: JsonInt = Field(ge=0, le=MAX_ID)


class Evaluation(BaseModel):
    """Pooled held-out error of one version over the evaluation devices that were served it."""
    version: int
    devices: int
    ratings: float
    rmse: float | None
    mae: float | None
    # the blend with the private base, b + w (adapter - b), fitted on this version's own evaluation devices'
    # validation sums (`serve-blend`); None: not recorded (no validation hold-out, a DP run, or too few devices yet).
    # What serving applies (with K > 1 shrunk toward every persona's pool) is the version view's `served_blend`.
    persona_blend_weight: float | None = None
    personal_blend_weight: float | None = None
    blend_devices: int = 0


class EvaluationPoint(BaseModel):
    """One pooled evaluation of a version as it was recorded (several devices' sums), for RMSE over time."""
    id: int
    at: float
    version: int
    state: Literal["candidate", "canary", "stable", "retired"] | None = Field(
        description="the version's state when the evaluation was recorded")
    devices: int
    ratings: float
    rmse: float | None
    mae: float | None


class ServedBlend(BaseModel):
    """The blend weights serving applies to a version (`PersonaRegistry.serving_weights`): fitted on its own
    evaluation or its persona's nearest evaluated version (`fitted_on`), with `blend-prior-devices` devices' worth of
    every persona's nearest evaluation added (with one persona: the same as the version's own)."""
    persona: float
    personal: float
    fitted_on: int


class PersonaView(BaseModel):
    persona: int
    stable: int | None
    previous_stable: int | None
    canary: int | None
    percent: float = Field(description="share of devices served the canary (0 without one)")
    paused: bool
    versions: int = Field(description="how many versions the persona has")
    stable_metrics: Evaluation | None
    canary_metrics: Evaluation | None


class VersionView(BaseModel):
    model_config = ConfigDict(extra="allow")  # a column added to the registry shows up without a change here
    id: int
    persona: int
    parent: int | None
    round: int
    devices: int
    epsilon: float | None
    delta: float | None
    state: Literal["candidate", "canary", "stable", "retired"]
    created: float
    evaluation: Evaluation
    served_blend: ServedBlend | None = Field(
        None, description="the weights devices and the cold-start service apply (None: the adapter is served alone)")


class Event(BaseModel):
    id: int
    at: float
    actor: str
    action: str
    persona: int | None
    version: int | None
    reason: str
    detail: dict[str, Any]


class Page(BaseModel, Generic[Item]):
    items: list[Item]
    total: int
    limit: int
    offset: int


class Issue(BaseModel):
    loc: list[str | int]
    msg: str
    type: str


class Error(BaseModel):
    """Every 4xx body: a message, or (422) the list of problems with the request."""
    detail: str | list[Issue]


ERRORS = {
    401: "missing or invalid bearer token", 403: "the token lacks the scope", 404: "unknown persona or version",
    409: "the transition is not allowed in the current state", 413: f"body larger than {MAX_BODY} bytes",
    415: "body is not application/json", 422: "invalid parameter or body",
}


def responses(*codes: int) -> dict:
    return {code: {"model": Error, "description": ERRORS[code]} for code in codes}


def json_responses(*codes: int) -> dict:
    """For a route whose own response class is not JSON: FastAPI would give `model` errors that media type."""
    error = {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}
    return {code: {"description": ERRORS[code], "content": error} for code in codes}


READ = responses(401, 403, 422)
READ_ONE = responses(401, 403, 404, 422)
WRITE = responses(401, 403, 404, 409, 413, 415, 422)

PersonaId = Annotated[int, Path(ge=0, le=MAX_ID, examples=[0])]
VersionId = Annotated[int, Path(ge=0, le=MAX_ID, examples=[1])]
PersonaFilter = Annotated[int | None, Query(ge=0, le=MAX_ID)]
Limit = Annotated[int, Query(ge=1, le=500)]
Offset = Annotated[int, Query(ge=0, le=MAX_ID)]


class FiniteJSONResponse(JSONResponse):
    """JSON with non-finite floats (a NaN training loss in a manifest, say) as null: Starlette's JSONResponse
    refuses them with a ValueError, i.e. a 500."""

    def render(self, content: Any) -> bytes:
        return json.dumps(_finite(content), ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode()


class GzipResponse(Response):
    media_type = "application/gzip"


def _finite(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _invalid_body(msg: str, pos: int = 0) -> RequestValidationError:
    return RequestValidationError([{"type": "json_invalid", "loc": ("body", pos), "msg": msg}])


def _no_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e999
        raise ValueError(f"{text[:32]} is out of the float range")
    return value


def parse_json_body(body: bytes) -> Any:
    """Strict JSON: UTF-8, no NaN/Infinity/1e999, no lone surrogates (they cannot be stored); else a 422."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as e:
        raise _invalid_body(f"the body is not UTF-8 (byte {e.start})", e.start) from None
    try:
        value = json.loads(text, parse_constant=_no_constant, parse_float=_finite_float)
    except json.JSONDecodeError as e:
        raise _invalid_body(f"JSON decode error: {e.msg}", e.pos) from None
    except (ValueError, RecursionError) as e:  # the hooks above, ints beyond Python's digit limit, deep nesting
        raise _invalid_body(f"JSON decode error: {str(e)[:200]}") from None
    stack = [value]
    while stack:  # iterative: the parser's nesting limit is about the recursion limit
        item = stack.pop()
        if isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                raise _invalid_body("the body holds a lone surrogate (\\ud800-\\udfff) escape") from None
    return value


def dashboard_page(path: FilePath = DASHBOARD) -> tuple[str, dict[str, str]]:
    """The operator's page and its headers. The Content-Security-Policy lets the browser run only the page's own
    inline style and script (by SHA-256: an injected element or attribute does not run) and talk only to this API;
    the page may not be framed (its buttons cannot be clicked through another site's page)."""
    html = path.read_text(encoding="utf-8")

    def hashes(tag: str) -> str:
        blocks = re.findall(rf"<{tag}>(.*?)</{tag}>", html, re.S)
        return " ".join(f"'sha256-{base64.b64encode(hashlib.sha256(b.encode()).digest()).decode()}'" for b in blocks)

    policy = (f"default-src 'none'; script-src {hashes('script')}; style-src {hashes('style')}; connect-src 'self'; "
              "img-src data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
    return html, {"Content-Security-Policy": policy, "X-Content-Type-Options": "nosniff",
                  "Referrer-Policy": "no-referrer", "Cache-Control": "no-cache"}


def _scope_of(dependant: Dependant) -> str | None:
    """The scope a route's `require(scope)` dependency asks for, if any."""
    for dep in dependant.dependencies:
        scope = getattr(dep.call, "scope", None) or _scope_of(dep)
        if scope:
            return scope
    return None


def create_app(registry: PersonaRegistry, tokens: TokenStore, serving=None, max_body: int = MAX_BODY) -> FastAPI:
    """`serving`: an optional `server.serving.ColdStartService` for the cold-start endpoints."""
    rollouts = Rollouts(registry)
    app = FastAPI(title="PersonaFL coordinator admin API", version="1", default_response_class=FiniteJSONResponse)
    bearer = HTTPBearer(auto_error=False)

    def authorize(credentials: HTTPAuthorizationCredentials | None, scope: str) -> Principal:
        if credentials is None:
            raise HTTPException(401, "missing bearer token", headers={"WWW-Authenticate": "Bearer"})
        principal = tokens.authenticate(credentials.credentials)
        if principal is None:
            raise HTTPException(401, "invalid token", headers={"WWW-Authenticate": "Bearer"})
        if not principal.allows(scope):
            raise HTTPException(403, f"token {principal.name!r} lacks the {scope!r} scope")
        return principal

    def require(scope: str) -> Callable:
        def check(credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> Principal:
            return authorize(credentials, scope)
        check.scope = scope  # read by AuthFirstRoute
        return check

    class AuthFirstRoute(APIRoute):
        """FastAPI reads and parses a route's body before it runs any dependency, so an unauthenticated caller
        could make the server hold (and parse) any body, and got parser errors instead of 401. This route checks
        the token and scope from the headers first, then reads the body up to `max_body` and parses it strictly,
        and hands FastAPI's own handler the checked bytes."""

        def get_route_handler(self) -> Callable:
            handler = super().get_route_handler()
            scope, has_body = _scope_of(self.dependant), self.body_field is not None

            async def checked(request: Request) -> Response:
                if scope is not None:
                    authorize(await bearer(request), scope)
                if not has_body:
                    return await handler(request)
                length = request.headers.get("content-length", "")
                if length.isdigit() and int(length) > max_body:  # refused before a byte of it is read
                    raise HTTPException(413, f"body larger than {max_body} bytes")
                chunks, size = [], 0
                async for chunk in request.stream():
                    size += len(chunk)
                    if size > max_body:
                        raise HTTPException(413, f"body larger than {max_body} bytes")
                    chunks.append(chunk)
                body = b"".join(chunks)
                if body:
                    content_type = request.headers.get("content-type", "application/json").split(";")[0].strip()
                    if content_type.lower() != "application/json" and not content_type.lower().endswith("+json"):
                        raise HTTPException(415, f"body must be application/json, not {content_type[:64]!r}")
                    parse_json_body(body)
                return await handler(Request(request.scope, _replay(body, request.receive)))

            return checked

    app.router.route_class = AuthFirstRoute

    @app.exception_handler(RegistryError)
    def registry_error(_request: Request, exc: RegistryError) -> JSONResponse:
        return JSONResponse(status_code=exc.status, content={"detail": str(exc)})

    @app.exception_handler(RequestValidationError)
    def validation_error(_request: Request, exc: RequestValidationError) -> JSONResponse:
        # FastAPI's default handler echoes each rejected value ("input"), which fails on NaN/Infinity (a 500 after
        # the 422 was decided) and would echo whatever was sent; where, what and why are enough to fix a request.
        return JSONResponse(status_code=422, content={"detail": [
            {"loc": [x if isinstance(x, int) else str(x) for x in e.get("loc", ())], "msg": str(e.get("msg", "")),
             "type": str(e.get("type", ""))} for e in exc.errors()]})

    def persona_view(persona: int) -> dict:
        r = registry.rollout(persona)
        view = {k: r[k] for k in ("persona", "stable", "previous_stable", "canary", "percent", "paused")}
        view["versions"] = registry.versions(persona, limit=1)[1]
        view["stable_metrics"] = registry.evaluation(r["stable"]) if r["stable"] is not None else None
        view["canary_metrics"] = registry.evaluation(r["canary"]) if r["canary"] is not None else None
        return view

    def version_views(rows: list[dict]) -> list[dict]:
        # the serving weights of a whole page in one registry pass, not one pass over every evaluation per version
        served = registry.serving_weights(only=[v["id"] for v in rows])
        return [{**{k: v[k] for k in v if k not in ("manifest", "path")}, "evaluation": registry.evaluation(v["id"]),
                 "served_blend": {**served[v["id"]][0], "fitted_on": served[v["id"]][1]} if v["id"] in served else None}
                for v in rows]

    @app.get("/health")
    def health() -> dict:
        return {"status": "ok", "personas": len(registry.personas())}

    page_html, page_headers = dashboard_page()

    # Open: a browser cannot send a bearer header when it navigates to a page, and the page itself holds no data.
    @app.get("/dashboard", response_class=HTMLResponse,
             responses={200: {"description": "the operator's page; it asks for a token and calls this API"}})
    def dashboard() -> HTMLResponse:
        """A web page for following and steering rollouts: personas, versions, canary share, stable vs canary RMSE
        over time and the audit trail, with promote and roll-back buttons (the rollout scope, checked here)."""
        return HTMLResponse(page_html, headers=page_headers)

    @app.get("/personas", response_model=Page[PersonaView], responses=READ)
    def list_personas(limit: Limit = 50, offset: Offset = 0, _: Principal = Depends(require("read"))) -> dict:
        personas = registry.personas()
        return {"items": [persona_view(p) for p in personas[offset:offset + limit]], "total": len(personas),
                "limit": limit, "offset": offset}

    @app.get("/personas/{persona}", response_model=PersonaView, responses=READ_ONE)
    def get_persona(persona: PersonaId, _: Principal = Depends(require("read"))) -> dict:
        return persona_view(persona)

    @app.get("/personas/{persona}/evaluations", response_model=Page[EvaluationPoint], responses=READ_ONE)
    def list_evaluations(persona: PersonaId, limit: Limit = 50, offset: Offset = 0,
                         _: Principal = Depends(require("read"))) -> dict:
        """The persona's pooled evaluations in the order they were recorded, each with its version's state then."""
        items, total = rollouts.evaluation_history(persona, limit, offset)
        return {"items": items, "total": total, "limit": limit, "offset": offset}

    @app.get("/versions", response_model=Page[VersionView], responses=READ)
    def list_versions(persona: PersonaFilter = None, limit: Limit = 50, offset: Offset = 0,
                      _: Principal = Depends(require("read"))) -> dict:
        items, total = registry.versions(persona, limit, offset)
        return {"items": version_views(items), "total": total, "limit": limit, "offset": offset}

    @app.get("/versions/{version}", response_model=VersionView, responses=READ_ONE)
    def get_version(version: VersionId, _: Principal = Depends(require("read"))) -> dict:
        return version_views([registry.version(version)])[0]

    @app.get("/versions/{version}/manifest", responses=READ_ONE)
    def get_manifest(version: VersionId, _: Principal = Depends(require("read"))) -> dict:
        return registry.version(version)["manifest"]

    @app.get("/versions/{version}/download", response_class=GzipResponse, responses={
        **json_responses(401, 403, 404, 422), 200: {"description": "the PEFT adapter directory as a .tar.gz",
                          "content": {"application/gzip": {"schema": {"type": "string", "format": "binary"}}}}})
    def download(version: VersionId, _: Principal = Depends(require("read"))) -> GzipResponse:
        """The version as a PEFT adapter directory in a .tar.gz (`PeftModel.from_pretrained` loads it unpacked)."""
        path = registry.path(version)  # 404 when the directory is missing
        buffer = io.BytesIO()
        try:
            with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
                tar.add(path, arcname=f"persona-version-{version}")
        except FileNotFoundError:  # removed while being packed
            raise RegistryError(f"the payload of version {version} is missing from the registry", 404) from None
        return GzipResponse(buffer.getvalue(), headers={
            "Content-Disposition": f'attachment; filename="persona-version-{version}.tar.gz"'})

    @app.post("/personas/{persona}/canary", response_model=PersonaView, responses=WRITE)
    def canary(persona: PersonaId, body: CanaryRequest, who: Principal = Depends(require("rollout"))) -> dict:
        rollouts.start_canary(persona, body.version, body.percent, who.name, body.reason)
        return persona_view(persona)

    @app.post("/personas/{persona}/promote", response_model=PersonaView, responses=WRITE)
    def promote(persona: PersonaId, body: Reason, who: Principal = Depends(require("rollout"))) -> dict:
        rollouts.promote(persona, who.name, body.reason)
        return persona_view(persona)

    @app.post("/personas/{persona}/rollback", response_model=PersonaView, responses=WRITE)
    def rollback(persona: PersonaId, body: Reason, who: Principal = Depends(require("rollout"))) -> dict:
        rollouts.rollback(persona, who.name, body.reason)
        return persona_view(persona)

    @app.post("/personas/{persona}/pause", response_model=PersonaView, responses=WRITE)
    def pause(persona: PersonaId, body: Reason, who: Principal = Depends(require("rollout"))) -> dict:
        rollouts.pause(persona, who.name, body.reason, paused=True)
        return persona_view(persona)

    @app.post("/personas/{persona}/resume", response_model=PersonaView, responses=WRITE)
    def resume(persona: PersonaId, body: Reason, who: Principal = Depends(require("rollout"))) -> dict:
        rollouts.pause(persona, who.name, body.reason, paused=False)
        return persona_view(persona)

    @app.post("/personas/{persona}/stable", response_model=PersonaView, responses=WRITE)
    def set_stable(persona: PersonaId, body: StableRequest, who: Principal = Depends(require("admin"))) -> dict:
        rollouts.make_stable(persona, body.version, who.name, body.reason)
        return persona_view(persona)

    @app.get("/events", response_model=Page[Event], responses=READ)
    def list_events(persona: PersonaFilter = None, limit: Limit = 50, offset: Offset = 0,
                    _: Principal = Depends(require("read"))) -> dict:
        # Read scope (issue #19: the operator page shows the audit trail to readers): actors are token names and
        # reasons are what operators typed; neither holds user data.
        items, total = rollouts.events(persona, limit, offset)
        return {"items": items, "total": total, "limit": limit, "offset": offset}

    if serving is not None:
        serving.mount(app, require("read"), rollouts, WRITE)
    return app


def _replay(body: bytes, receive: Callable) -> Callable:
    """An ASGI receive that gives the already-read body once, then defers to the connection (disconnects)."""
    sent = False

    async def replay() -> dict:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay
