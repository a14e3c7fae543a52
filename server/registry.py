"""The coordinator's durable persona registry: versions in SQL (SQLite by default), payloads as PEFT directories.

Only persona-level artefacts are ever stored here: each version is the (noised) mean of several devices' updates.

    <root>/registry.db                           SQLite in WAL mode (or any SQLAlchemy URL via `url`)
    <root>/personas/p{k}/r{round:04d}[-v{id}]/   adapter_config.json, adapter_model.safetensors, manifest.json

Version states: candidate -> canary -> stable -> retired (rollouts in `server.rollouts` move them).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import sqlalchemy as sa
from safetensors.numpy import load_file, save_file

from common.blend import shrunk_weight as blend_shrunk_weight
from common.blend import weight as blend_weight
from common.config import LoraSettings
from common.files import atomic_directory

STATES = ("candidate", "canary", "stable", "retired")

metadata = sa.MetaData()
versions = sa.Table(
    "versions", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("persona", sa.Integer, nullable=False, index=True),
    sa.Column("parent", sa.Integer, nullable=True),
    sa.Column("round", sa.Integer, nullable=False),
    sa.Column("devices", sa.Integer, nullable=False),
    sa.Column("epsilon", sa.Float, nullable=True),
    sa.Column("delta", sa.Float, nullable=True),
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("path", sa.String(512), nullable=False),
    sa.Column("manifest", sa.Text, nullable=False),
    sa.Column("created", sa.Float, nullable=False),
)
rollouts = sa.Table(
    "rollouts", metadata,
    sa.Column("persona", sa.Integer, primary_key=True),
    sa.Column("stable", sa.Integer, nullable=True),
    sa.Column("previous_stable", sa.Integer, nullable=True),
    sa.Column("canary", sa.Integer, nullable=True),
    sa.Column("percent", sa.Float, nullable=False, default=0.0),
    sa.Column("paused", sa.Boolean, nullable=False, default=False),
)
evaluations = sa.Table(  # pooled held-out error sums per version, from devices' evaluation replies
    "evaluations", metadata,
    sa.Column("version", sa.Integer, primary_key=True),
    sa.Column("sse", sa.Float, nullable=False, default=0.0),
    sa.Column("sae", sa.Float, nullable=False, default=0.0),
    sa.Column("n", sa.Float, nullable=False, default=0.0),
    sa.Column("devices", sa.Integer, nullable=False, default=0),
)
# Validation sums of each adapter's blend with the private base (`common.blend`), pooled per version over the
# devices it was served to, when every one of them sent them (with `serve-blend`): the weights serving applies come
# from these. A new table, so an existing registry gains it on open with no migration.
blend_sums = sa.Table(
    "blend_sums", metadata,
    sa.Column("version", sa.Integer, primary_key=True),
    sa.Column("persona_rd", sa.Float, nullable=False, default=0.0),
    sa.Column("persona_dd", sa.Float, nullable=False, default=0.0),
    sa.Column("personal_rd", sa.Float, nullable=False, default=0.0),
    sa.Column("personal_dd", sa.Float, nullable=False, default=0.0),
    sa.Column("devices", sa.Integer, nullable=False, default=0),
)
BLEND_COLUMNS = ("persona_rd", "persona_dd", "personal_rd", "personal_dd")
# One row per pooled evaluation as `Rollouts.record_evaluation` receives it (each pools at least the strategy's
# eval-min-devices devices), with the version's state then: the `evaluations` sums above only tell a version's error
# so far, this tells how stable's and canary's errors moved over time. A new table, so an existing registry gains
# it on open (create_all) with no migration; evaluations recorded before it existed have no history.
evaluation_history = sa.Table(
    "evaluation_history", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("at", sa.Float, nullable=False),
    sa.Column("persona", sa.Integer, nullable=True, index=True),
    sa.Column("version", sa.Integer, nullable=False),
    sa.Column("state", sa.String(16), nullable=True),
    sa.Column("sse", sa.Float, nullable=False),
    sa.Column("sae", sa.Float, nullable=False),
    sa.Column("n", sa.Float, nullable=False),
    sa.Column("devices", sa.Integer, nullable=False),
)
events = sa.Table(
    "events", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("at", sa.Float, nullable=False),
    sa.Column("actor", sa.String(128), nullable=False),
    sa.Column("action", sa.String(32), nullable=False),
    sa.Column("persona", sa.Integer, nullable=True),
    sa.Column("version", sa.Integer, nullable=True),
    sa.Column("reason", sa.Text, nullable=False, default=""),
    sa.Column("detail", sa.Text, nullable=False, default="{}"),
)


def _prior_from_manifest(manifest: str) -> float:
    """A version's `blend-prior-devices` from its manifest (JSON text as stored); 0 when absent or not a finite
    number >= 0 (a registry written before the setting existed: each version's own weight, as then)."""
    try:
        value = json.loads(manifest).get("serving", {}).get("blend_prior_devices", 0.0)
    except (ValueError, AttributeError):
        return 0.0
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return 0.0
    return float(value) if 0.0 <= value < float("inf") else 0.0


class RegistryError(Exception):
    """A request the registry cannot satisfy; `status` is the HTTP status the admin API answers with."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


def make_engine(url: str) -> sa.Engine:
    if not url.startswith("sqlite"):
        return sa.create_engine(url, pool_pre_ping=True)
    engine = sa.create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})

    # SQLAlchemy's documented pysqlite recipe: let SQLAlchemy emit BEGIN itself, and make it BEGIN IMMEDIATE so
    # concurrent read-modify-write transactions serialise instead of failing on lock upgrade.
    @sa.event.listens_for(engine, "connect")
    def _connect(dbapi_connection, _record):
        dbapi_connection.isolation_level = None
        dbapi_connection.execute("PRAGMA journal_mode=WAL")
        dbapi_connection.execute("PRAGMA busy_timeout=30000")

    @sa.event.listens_for(engine, "begin")
    def _begin(connection):
        connection.exec_driver_sql("BEGIN IMMEDIATE")

    return engine


def page(engine: sa.Engine, table: sa.Table, persona: int | None, limit: int, offset: int) -> tuple[list, int]:
    """One page of a table's rows in id order (optionally one persona's) and the total count."""
    query, count = sa.select(table), sa.select(sa.func.count()).select_from(table)
    if persona is not None:
        query, count = query.where(table.c.persona == persona), count.where(table.c.persona == persona)
    with engine.connect() as conn:
        rows = conn.execute(query.order_by(table.c.id).limit(limit).offset(offset)).all()
        return rows, int(conn.execute(count).scalar_one())


def _row(row) -> dict:
    d = dict(row._mapping)
    if "manifest" in d:
        d["manifest"] = json.loads(d["manifest"])
    return d


class PersonaRegistry:
    def __init__(self, root: Path | str, url: str | None = None, lora: LoraSettings | None = None,
                 base_model: str | None = None, serving: dict | None = None):
        """`serving`: what the versions this registry writes were trained against, recorded in each manifest so
        serving scores them alike (`{"item_stats": bool, "residual_to_bias": bool}`; absent: neither)."""
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.engine = make_engine(url or f"sqlite:///{self.root / 'registry.db'}")
        metadata.create_all(self.engine)
        self.lora, self.base_model = lora, base_model
        self.serving = {"item_stats": False, "residual_to_bias": False, **(serving or {})}

    # --- writing versions ----------------------------------------------------------------------------------
    def add_version(self, persona: int, round_: int, arrays: dict[str, np.ndarray], devices: int,
                    metrics: dict | None = None, privacy: dict | None = None, parent: int | None = None,
                    state: str = "candidate") -> int:
        """Write the PEFT directory (atomically), then its row; returns the version id."""
        if self.lora is None:
            raise RegistryError("this registry was opened read-only (no LoRA settings)", 500)
        if state not in STATES:
            raise RegistryError(f"unknown state {state!r}")
        privacy = privacy or {"dp": False}
        manifest = {"persona": persona, "round": round_, "parent": parent, "contributing_devices": devices,
                    "base_model": self.base_model, "created": time.time(),
                    "train_metrics": {k: float(v) for k, v in (metrics or {}).items()}, "privacy": privacy,
                    "serving": self.serving}
        target = self.root / "personas" / f"p{persona}" / f"r{round_:04d}"
        if target.exists():  # a resumed run writes a round again: keep both
            target = target.with_name(f"{target.name}-{time.time_ns()}")
        from common.adapters import lora_config  # imports torch and peft: only writers pay for it, not the admin API

        with atomic_directory(target) as tmp:
            config = lora_config(self.lora)
            config.base_model_name_or_path = self.base_model
            config.save_pretrained(tmp)
            save_file({k: np.ascontiguousarray(v, np.float32) for k, v in arrays.items()},
                      str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
            (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
        epsilon = privacy.get("epsilon") if privacy.get("dp") else None
        with self.engine.begin() as conn:
            version = conn.execute(versions.insert().values(
                persona=persona, parent=parent, round=round_, devices=devices, epsilon=epsilon,
                delta=privacy.get("delta"), state=state, path=str(target.relative_to(self.root)),
                manifest=json.dumps(manifest), created=manifest["created"])).inserted_primary_key[0]
            if conn.execute(sa.select(rollouts.c.persona).where(rollouts.c.persona == persona)).first() is None:
                conn.execute(rollouts.insert().values(persona=persona, percent=0.0, paused=False))
        return int(version)

    # --- reading -------------------------------------------------------------------------------------------
    def version(self, version: int) -> dict:
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(versions).where(versions.c.id == version)).first()
        if row is None:
            raise RegistryError(f"unknown version {version}", 404)
        return _row(row)

    def versions(self, persona: int | None = None, limit: int = 50, offset: int = 0) -> tuple[list[dict], int]:
        rows, total = page(self.engine, versions, persona, limit, offset)
        return [_row(r) for r in rows], total

    def path(self, version: int) -> Path:
        """The version's PEFT directory; 404 when its row exists but the directory was removed or never written."""
        path = self.root / self.version(version)["path"]
        if not path.is_dir():
            raise RegistryError(f"the payload of version {version} is missing from the registry", 404)
        return path

    def arrays(self, version: int) -> dict[str, np.ndarray]:
        return load_file(str(self.path(version) / "adapter_model.safetensors"))

    def personas(self) -> list[int]:
        with self.engine.connect() as conn:
            return [r[0] for r in conn.execute(sa.select(rollouts.c.persona).order_by(rollouts.c.persona))]

    def rollout(self, persona: int) -> dict:
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(rollouts).where(rollouts.c.persona == persona)).first()
        if row is None:
            raise RegistryError(f"unknown persona {persona}", 404)
        return _row(row)

    def head(self, persona: int) -> int | None:
        """Where training resumes for a persona: its newest candidate, else its stable version."""
        with self.engine.connect() as conn:
            newest = conn.execute(sa.select(versions.c.id).where(versions.c.persona == persona)
                                  .where(versions.c.state.in_(("candidate", "canary")))
                                  .order_by(versions.c.id.desc()).limit(1)).scalar()
            stable = conn.execute(sa.select(rollouts.c.stable).where(rollouts.c.persona == persona)).scalar()
        return newest if newest is not None and (stable is None or newest > stable) else stable

    def evaluation(self, version: int) -> dict:
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(evaluations).where(evaluations.c.version == version)).first()
        if row is None:
            return {"version": version, "devices": 0, "ratings": 0, "rmse": None, "mae": None,
                    **self._blend_weights(version)}
        r = row._mapping
        return {"version": version, "devices": r["devices"], "ratings": r["n"],
                "rmse": float(np.sqrt(r["sse"] / r["n"])) if r["n"] else None,
                "mae": r["sae"] / r["n"] if r["n"] else None, **self._blend_weights(version)}

    def blend_weights(self, version: int) -> dict[str, float] | None:
        """The version's serving blend weights {"persona": w, "personal": w} (`common.blend`), None when none were
        recorded (the adapters are then served alone)."""
        weights = self._blend_weights(version)
        if weights["blend_devices"] == 0:
            return None
        return {"persona": weights["persona_blend_weight"], "personal": weights["personal_blend_weight"]}

    def serving_weights(self, limit: int = 256, only: list[int] | None = None,
                        prior_devices: float | None = None) -> dict[int, tuple[dict[str, float], int]]:
        """For each of the newest `limit` versions (or the versions in `only`), the serving blend weights devices
        holding it should use and the version they were fitted on: its own when it was evaluated, else the nearest
        evaluated version of the same persona (by id; a tie goes to the later one). Evaluation runs every
        `eval-every` rounds while a device that trains derives its personal adapter from the version it trains on,
        so most devices hold versions never evaluated themselves; a neighbouring version of the same persona is the
        closest measurement there is. Versions of a persona with no evaluated version get none (the adapter is
        served alone).

        The weight is the fitted version's own validation sums plus `blend_prior_devices` devices' worth (from its
        manifest; 0 for versions written before it existed) of the pool of every persona's evaluated version
        nearest to it, that one included (`common.blend.shrunk_weight`): with K=1 the pool is the version itself.
        `prior_devices` overrides the manifests' (`simulations.rescore` measures other priors with it)."""
        with self.engine.connect() as conn:
            query = sa.select(versions.c.id, versions.c.persona)
            query = (query.where(versions.c.id.in_([int(v) for v in only])) if only is not None
                     else query.order_by(versions.c.id.desc()).limit(limit))
            rows = conn.execute(query).all()
            evaluated = conn.execute(sa.select(blend_sums, versions.c.persona)
                                     .join(versions, versions.c.id == blend_sums.c.version)
                                     .where(blend_sums.c.devices > 0)).all()
        by_persona: dict[int, list[int]] = {}
        for row in evaluated:
            by_persona.setdefault(row.persona, []).append(row.version)
        sums = {row.version: row for row in evaluated}

        def nearest(candidates: list[int], version: int) -> int:
            return min(candidates, key=lambda c: (abs(c - version), -c))

        out, fitted = {}, {}
        for version, persona in rows:
            if not (candidates := by_persona.get(persona)):
                continue
            source = nearest(candidates, version)
            if source not in fitted:
                own = sums[source]
                pool = [sums[nearest(c, source)] for c in by_persona.values()]
                prior = self._prior_devices(source) if prior_devices is None else prior_devices
                fitted[source] = {path: blend_shrunk_weight(
                    getattr(own, f"{path}_rd"), getattr(own, f"{path}_dd"),
                    sum(getattr(p, f"{path}_rd") for p in pool), sum(getattr(p, f"{path}_dd") for p in pool),
                    sum(p.devices for p in pool), prior) for path in ("persona", "personal")}
            out[version] = (fitted[source], source)
        return out

    def _prior_devices(self, version: int) -> float:
        with self.engine.connect() as conn:
            manifest = conn.execute(sa.select(versions.c.manifest).where(versions.c.id == version)).scalar()
        return _prior_from_manifest(manifest or "{}")

    def serving_weight(self, version: int, prior_devices: float | None = None) -> tuple[dict[str, float], int] | None:
        """`serving_weights` for one version (the cold-start service's): None when none apply."""
        return self.serving_weights(only=[version], prior_devices=prior_devices).get(version)

    def _blend_weights(self, version: int) -> dict:
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(blend_sums).where(blend_sums.c.version == version)).first()
        if row is None or not row.devices:
            return {"persona_blend_weight": None, "personal_blend_weight": None, "blend_devices": 0}
        return {"persona_blend_weight": blend_weight(row.persona_rd, row.persona_dd),
                "personal_blend_weight": blend_weight(row.personal_rd, row.personal_dd), "blend_devices": row.devices}
