"""Persona rollouts: a stable version and at most one canary per persona, with an audit trail.

Every change runs in one database transaction (BEGIN IMMEDIATE on SQLite) that reads the rollout row, checks
the transition, writes the new state and appends an event, so concurrent requests leave a consistent state.

Devices are bucketed by a hash of (device id, persona): a device stays in its bucket, and the canary serves
the buckets below its percentage.
"""

from __future__ import annotations

import hashlib
import json
import math
import time

import sqlalchemy as sa

from server.registry import (
    BLEND_COLUMNS,
    PersonaRegistry,
    RegistryError,
    blend_sums,
    evaluation_history,
    evaluations,
    events,
    page,
    rollouts,
    versions,
)


def bucket(device: int | str, persona: int) -> float:
    """A device's stable position in [0, 100) for one persona."""
    digest = hashlib.sha256(f"{device}:{persona}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 * 100


class Rollouts:
    def __init__(self, registry: PersonaRegistry):
        self.registry = registry
        self.engine = registry.engine

    # --- helpers -------------------------------------------------------------------------------------------
    def _rollout(self, conn, persona: int) -> dict:
        row = conn.execute(sa.select(rollouts).where(rollouts.c.persona == persona).with_for_update()).first()
        if row is None:
            raise RegistryError(f"unknown persona {persona}", 404)
        return dict(row._mapping)

    def _version(self, conn, version: int, persona: int) -> dict:
        row = conn.execute(sa.select(versions).where(versions.c.id == version)).first()
        if row is None:
            raise RegistryError(f"unknown version {version}", 404)
        if row.persona != persona:
            raise RegistryError(f"version {version} belongs to persona {row.persona}, not {persona}", 409)
        return dict(row._mapping)

    @staticmethod
    def _event(conn, actor: str, action: str, persona: int | None, version: int | None, reason: str = "",
               **detail) -> None:
        conn.execute(events.insert().values(at=time.time(), actor=actor, action=action, persona=persona,
                                            version=version, reason=reason, detail=json.dumps(detail)))

    @staticmethod
    def _set_state(conn, version: int | None, state: str) -> None:
        if version is not None:
            conn.execute(versions.update().where(versions.c.id == version).values(state=state))

    # --- transitions ---------------------------------------------------------------------------------------
    def make_stable(self, persona: int, version: int, actor: str, reason: str = "") -> None:
        """Make a version stable directly (first release of a persona, or an operator's override)."""
        with self.engine.begin() as conn:
            r = self._rollout(conn, persona)
            self._version(conn, version, persona)
            if r["canary"] is not None:
                raise RegistryError(f"persona {persona} has canary {r['canary']} running: promote or roll it back", 409)
            if r["stable"] == version:  # else it would become its own previous stable and rollback would be a no-op
                raise RegistryError(f"version {version} is already persona {persona}'s stable version", 409)
            self._set_state(conn, r["stable"], "retired")
            self._set_state(conn, version, "stable")
            conn.execute(rollouts.update().where(rollouts.c.persona == persona)
                         .values(stable=version, previous_stable=r["stable"]))
            self._event(conn, actor, "stable", persona, version, reason, previous=r["stable"])

    def start_canary(self, persona: int, version: int, percent: float, actor: str, reason: str = "") -> None:
        if not (0 < percent <= 100) or not math.isfinite(percent):
            raise RegistryError(f"percent must be in (0, 100], got {percent}", 422)
        with self.engine.begin() as conn:
            r = self._rollout(conn, persona)
            v = self._version(conn, version, persona)
            if r["canary"] is not None:
                raise RegistryError(f"persona {persona} already has canary {r['canary']}", 409)
            if v["state"] != "candidate":
                raise RegistryError(f"version {version} is {v['state']}; only a candidate can become a canary", 409)
            self._set_state(conn, version, "canary")
            conn.execute(rollouts.update().where(rollouts.c.persona == persona)
                         .values(canary=version, percent=percent, paused=False))
            self._event(conn, actor, "canary", persona, version, reason, percent=percent)

    def promote(self, persona: int, actor: str, reason: str = "") -> int:
        with self.engine.begin() as conn:
            r = self._rollout(conn, persona)
            if r["canary"] is None:
                raise RegistryError(f"persona {persona} has no canary to promote", 409)
            self._set_state(conn, r["stable"], "retired")
            self._set_state(conn, r["canary"], "stable")
            conn.execute(rollouts.update().where(rollouts.c.persona == persona).values(
                stable=r["canary"], previous_stable=r["stable"], canary=None, percent=0.0, paused=False))
            self._event(conn, actor, "promote", persona, r["canary"], reason, previous=r["stable"])
            return r["canary"]

    def rollback(self, persona: int, actor: str, reason: str = "", **detail) -> int:
        """With a canary running: stop it (it is retired). Otherwise: the previous stable becomes stable again.
        Returns the version now serving everyone."""
        with self.engine.begin() as conn:
            r = self._rollout(conn, persona)
            if r["canary"] is not None:
                self._set_state(conn, r["canary"], "retired")
                conn.execute(rollouts.update().where(rollouts.c.persona == persona)
                             .values(canary=None, percent=0.0, paused=False))
                self._event(conn, actor, "rollback", persona, r["canary"], reason, serving=r["stable"], **detail)
                return r["stable"]
            # previous == stable: a registry written before make_stable refused re-setting the stable version.
            if r["previous_stable"] is None or r["previous_stable"] == r["stable"]:
                raise RegistryError(f"persona {persona} has no canary and no previous stable to roll back to", 409)
            self._set_state(conn, r["stable"], "retired")
            self._set_state(conn, r["previous_stable"], "stable")
            conn.execute(rollouts.update().where(rollouts.c.persona == persona)
                         .values(stable=r["previous_stable"], previous_stable=None))
            self._event(conn, actor, "rollback", persona, r["stable"], reason, serving=r["previous_stable"], **detail)
            return r["previous_stable"]

    def pause(self, persona: int, actor: str, reason: str = "", paused: bool = True) -> None:
        """Pause (or resume) a canary: while paused every device gets the stable version."""
        with self.engine.begin() as conn:
            r = self._rollout(conn, persona)
            if r["canary"] is None:
                raise RegistryError(f"persona {persona} has no canary to {'pause' if paused else 'resume'}", 409)
            conn.execute(rollouts.update().where(rollouts.c.persona == persona).values(paused=paused))
            self._event(conn, actor, "pause" if paused else "resume", persona, r["canary"], reason)

    # --- serving and evaluation ----------------------------------------------------------------------------
    def assign(self, device: int | str, persona: int) -> int | None:
        """The version this device should use for this persona: its bucket says canary or stable."""
        r = self.registry.rollout(persona)
        if r["canary"] is not None and not r["paused"] and bucket(device, persona) < r["percent"]:
            return r["canary"]
        return r["stable"]

    def record_evaluation(self, version: int, sse: float, sae: float, n: float, devices: int,
                          blend: dict[str, float] | None = None) -> None:
        """Add a pooled evaluation to the version's sums, and log it with the version's state (for the history);
        `blend`: the same devices' pooled validation blend sums (`registry.BLEND_COLUMNS`), added to the version's."""
        with self.engine.begin() as conn:
            if blend is not None:
                row = conn.execute(sa.select(blend_sums).where(blend_sums.c.version == version)).first()
                if row is None:
                    conn.execute(blend_sums.insert().values(version=version, devices=devices,
                                                            **{k: float(blend[k]) for k in BLEND_COLUMNS}))
                else:
                    conn.execute(blend_sums.update().where(blend_sums.c.version == version).values(
                        devices=row.devices + devices,
                        **{k: getattr(row, k) + float(blend[k]) for k in BLEND_COLUMNS}))
            v = conn.execute(sa.select(versions.c.persona, versions.c.state).where(versions.c.id == version)).first()
            conn.execute(evaluation_history.insert().values(
                at=time.time(), persona=v.persona if v else None, version=version, state=v.state if v else None,
                sse=sse, sae=sae, n=n, devices=devices))
            row = conn.execute(sa.select(evaluations).where(evaluations.c.version == version)).first()
            if row is None:
                conn.execute(evaluations.insert().values(version=version, sse=sse, sae=sae, n=n, devices=devices))
            else:
                conn.execute(evaluations.update().where(evaluations.c.version == version).values(
                    sse=row.sse + sse, sae=row.sae + sae, n=row.n + n, devices=row.devices + devices))

    def check_canary(self, persona: int, margin: float, min_devices: int) -> bool:
        """Auto-rollback: roll the canary back when its held-out RMSE is worse than stable's by more than
        `margin`, once both were evaluated on at least `min_devices` devices. Returns whether it rolled back."""
        r = self.registry.rollout(persona)
        if r["canary"] is None or r["stable"] is None:
            return False
        canary, stable = self.registry.evaluation(r["canary"]), self.registry.evaluation(r["stable"])
        if min(canary["devices"], stable["devices"]) < min_devices or canary["rmse"] is None or stable["rmse"] is None:
            return False
        if canary["rmse"] <= stable["rmse"] + margin:
            return False
        try:
            self.rollback(persona, "auto-rollback", f"canary RMSE {canary['rmse']:.4f} > stable {stable['rmse']:.4f} "
                          f"+ margin {margin}", canary_rmse=canary["rmse"], stable_rmse=stable["rmse"],
                          canary_devices=canary["devices"], stable_devices=stable["devices"])
        except RegistryError:  # someone else changed the rollout meanwhile
            return False
        return True

    def evaluation_history(self, persona: int, limit: int = 50, offset: int = 0) -> tuple[list[dict], int]:
        """One persona's pooled evaluations in the order they were recorded: each one's own RMSE and MAE, and the
        version's state when it was recorded (so stable's and canary's errors can be told apart over time)."""
        self.registry.rollout(persona)  # 404 for an unknown persona, rather than an empty page
        rows, total = page(self.engine, evaluation_history, persona, limit, offset)
        return [{"id": r.id, "at": r.at, "version": r.version, "state": r.state, "devices": r.devices,
                 "ratings": r.n, "rmse": math.sqrt(r.sse / r.n) if r.n > 0 and r.sse >= 0 else None,
                 "mae": r.sae / r.n if r.n > 0 else None} for r in rows], total

    def events(self, persona: int | None = None, limit: int = 50, offset: int = 0) -> tuple[list[dict], int]:
        rows, total = page(self.engine, events, persona, limit, offset)
        return [{**dict(r._mapping), "detail": json.loads(r.detail)} for r in rows], total
