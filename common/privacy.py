"""Privacy accounting shared by devices and coordinator, on Opacus' RDP accountant.

- `PrivacyLedger`: a device's lifetime example-level budget. It holds the accountant's history of
  (noise multiplier, sample rate, steps) and refuses training that would push epsilon past the budget.
- `user_level_history` / `user_level_noise`: what persona releases cost their users (central DP, user-level),
  composing the persona-discovery releases (every device takes part: sample rate 1) with the training rounds,
  each a Poisson-sampled Gaussian mechanism at rate `poisson_rate` (the coordinator samples that way under DP).
- `lineage_history`: a persona version's full history across coordinator restarts: its parent's stored events,
  then the new run's.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

from opacus.accountants import RDPAccountant
from opacus.accountants.utils import get_noise_multiplier

Event = tuple[float, float, int]  # (noise multiplier, sample rate, steps), as Opacus' accountants record them


def epsilon(history: list[Event], delta: float) -> float:
    if not history:
        return 0.0
    if any(sigma <= 0 for sigma, _, _ in history):
        return math.inf
    # Composition commutes and RDP adds per step, so events with the same (noise, rate) merge into one with the
    # summed steps: the same epsilon, but one RDP evaluation per kind instead of one per round (a long persona
    # lineage is one event per release, and each release recounts it).
    merged: dict[tuple[float, float], int] = {}
    for sigma, rate, steps in history:
        merged[(float(sigma), float(rate))] = merged.get((float(sigma), float(rate)), 0) + int(steps)
    accountant = RDPAccountant()
    accountant.history = [(sigma, rate, steps) for (sigma, rate), steps in merged.items()]
    return float(accountant.get_epsilon(delta))


def noise_for_target(target_epsilon: float, delta: float, sample_rate: float, steps: int) -> float:
    """The smallest noise multiplier that keeps `steps` releases at `sample_rate` within `target_epsilon`."""
    return float(get_noise_multiplier(target_epsilon=target_epsilon, target_delta=delta, sample_rate=sample_rate,
                                      steps=steps, accountant="rdp"))


def poisson_rate(fraction: float, min_nodes: int, num_nodes: int) -> float:
    """The per-device inclusion probability of a round under user-level DP: `fraction` of the devices, raised so
    that `min_nodes` are expected. Devices are drawn independently with this probability (Poisson sampling),
    which is what the accountant's subsampled Gaussian assumes; a fixed-size draw would not be covered."""
    if num_nodes <= 0:
        return 0.0
    return min(1.0, max(fraction, min_nodes / num_nodes))


def events_from_json(raw) -> list[Event]:
    """Events as stored in a manifest (lists of [noise, rate, steps]) back to accountant tuples."""
    return [(float(sigma), float(rate), int(steps)) for sigma, rate, steps in raw or []]


def lineage_history(parent_releases: list[Event], run_events: list[Event]) -> list[Event]:
    """Everything a version's users took part in: the releases its parent already accounts (earlier runs of the
    coordinator included), then this run's (discovery, rounds). Composition only adds, so a child's epsilon is
    never below its parent's."""
    return [tuple(e) for e in parent_releases] + [tuple(e) for e in run_events]


class BudgetExhausted(Exception):
    """Training the requested steps would spend more than the device's lifetime privacy budget."""


@dataclass
class PrivacyLedger:
    """A device's cumulative example-level privacy spend; persisted (encrypted) with the device state."""

    budget: float  # lifetime epsilon; inf = no limit
    delta: float
    history: list[Event] = field(default_factory=list)

    @property
    def spent(self) -> float:
        return epsilon(self.history, self.delta)

    def cost_after(self, sigma: float, sample_rate: float, steps: int) -> float:
        return epsilon(self.history + [(sigma, sample_rate, steps)], self.delta)

    def check(self, sigma: float, sample_rate: float, steps: int) -> None:
        after = self.cost_after(sigma, sample_rate, steps)
        if after > self.budget:
            raise BudgetExhausted(f"budget exhausted: {steps} more steps would bring epsilon from {self.spent:.3f} "
                                  f"to {after:.3f}, over the lifetime budget {self.budget:g}")

    def record(self, events: list[Event]) -> None:
        self.history += [tuple(e) for e in events]

    def to_bytes(self) -> bytes:
        return json.dumps({"budget": self.budget if math.isfinite(self.budget) else None, "delta": self.delta,
                           "history": self.history}).encode()

    @classmethod
    def from_bytes(cls, raw: bytes) -> "PrivacyLedger":
        d = json.loads(raw)
        budget = math.inf if d["budget"] is None else float(d["budget"])
        return cls(budget, float(d["delta"]), [tuple(e) for e in d["history"]])


def user_level_history(discovery_noise: float, discovery_releases: int, round_noise: float,
                       sample_rate: float, rounds: int) -> list[Event]:
    """User-level releases a device's data has been part of: discovery sums, then persona rounds."""
    history: list[Event] = []
    if discovery_releases:
        history.append((discovery_noise, 1.0, discovery_releases))
    if rounds:
        history.append((round_noise, sample_rate, rounds))
    return history


def user_level_noise(target_epsilon: float, delta: float, discovery_releases: int, sample_rate: float,
                     rounds: int) -> float:
    """The smallest noise multiplier (used for discovery and rounds alike) whose composition stays within target."""
    def eps(sigma: float) -> float:
        return epsilon(user_level_history(sigma, discovery_releases, sigma, sample_rate, rounds), delta)

    low, high = 0.05, 1.0
    while eps(high) > target_epsilon:
        low, high = high, high * 2
        if high > 1e4:
            raise ValueError(f"epsilon {target_epsilon} is out of reach for {rounds} rounds")
    for _ in range(40):
        mid = (low + high) / 2
        low, high = (mid, high) if eps(mid) > target_epsilon else (low, mid)
    return high
