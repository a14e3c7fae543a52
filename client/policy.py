"""When a device may train: the owner's conditions, read from the SuperNode's node config.

    train-window = "22:00-06:00"   local time window (may wrap midnight)
    max-load = 0.5                 "idle": 1-minute load average per CPU core below this
    max-steps = 4                  cap on local steps per round
    min-ratings = 5                fewer training ratings than this: nothing worth training yet

A refused round is answered with `skipped` and the reason; the privacy budget is checked separately (ledger).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import datetime, time


def _clock(text: str) -> time:
    hours, minutes = text.strip().split(":")
    return time(int(hours), int(minutes))


@dataclass(frozen=True)
class TrainingPolicy:
    window: tuple[time, time] | None = None
    max_load: float | None = None
    max_steps: int | None = None
    min_ratings: int = 1

    @classmethod
    def from_node_config(cls, node) -> "TrainingPolicy":
        try:
            window = None
            if node.get("train-window"):
                start, end = str(node["train-window"]).split("-")
                window = (_clock(start), _clock(end))
            return cls(window=window,
                       max_load=float(node["max-load"]) if "max-load" in node else None,
                       max_steps=int(node["max-steps"]) if "max-steps" in node else None,
                       min_ratings=int(node.get("min-ratings", 1)))
        except ValueError as e:
            raise ValueError(f"bad training policy in node config: {e} (train-window is like \"22:00-06:00\")") from e

    def steps(self, requested: int) -> int:
        return min(requested, self.max_steps) if self.max_steps is not None else requested

    def refusal(self, n_train: int, now: datetime | None = None, load: float | None = None) -> str | None:
        """Why the device must not train now, or None."""
        if n_train < self.min_ratings:
            return f"only {n_train} training ratings (policy: at least {self.min_ratings})"
        if self.window is not None:
            t = (now or datetime.now()).time()
            start, end = self.window
            inside = start <= t < end if start <= end else (t >= start or t < end)
            if not inside:
                return f"outside the training window {start:%H:%M}-{end:%H:%M} (now {t:%H:%M})"
        if self.max_load is not None:
            per_core = (load if load is not None else os.getloadavg()[0]) / (os.cpu_count() or 1)
            if per_core >= self.max_load:
                return f"device busy: load {per_core:.2f} per core (policy: below {self.max_load})"
        return None
