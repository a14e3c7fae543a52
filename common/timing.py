"""Where a federation's wall time goes (issue #17, goal 4): named phases, timed exclusively, in every process.

A simulation's devices and coordinator run in different processes (Ray actors, the ServerApp's thread), so each
process keeps its own totals and, when `PERSONAFL_TIMING_DIR` names a directory, rewrites one small JSON file
there after each phase ends; `collect` sums them. Off (the variable unset), `phase` costs one dict lookup.

Phases nest and are *exclusive*: time inside a nested phase counts for the inner one only, so the totals of one
process never add up to more than its busy time, and a report can put them side by side with the wall. Devices
run one at a time in the simulation (each takes every core), so device phases never overlap each other either.
"""

from __future__ import annotations

import json
import os
import time
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path

ENV = "PERSONAFL_TIMING_DIR"

_totals: dict[str, float] = defaultdict(float)
_calls: dict[str, int] = defaultdict(int)
_stack: list[list] = []  # [name, started, time spent in nested phases]
_span: list[float] = []  # [first phase start, last phase end] in wall-clock seconds (time.time)
_clock = time.perf_counter


@contextmanager
def phase(name: str):
    directory = os.environ.get(ENV)
    if not directory:
        yield
        return
    started = _clock()
    if not _span:
        _span.extend([time.time(), time.time()])
    _stack.append([name, started, 0.0])
    try:
        yield
    finally:
        _, _, nested = _stack.pop()
        elapsed = _clock() - started
        _totals[name] += elapsed - nested
        _calls[name] += 1
        if _stack:
            _stack[-1][2] += elapsed
        _span[1] = time.time()
        if not _stack:  # write when the outermost phase ends: one small file per process, rewritten whole
            _write(Path(directory))


def _write(directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{os.getpid()}.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"totals": dict(_totals), "calls": dict(_calls), "span": list(_span)}))
    os.replace(tmp, path)


def reset() -> None:
    """Forget this process's totals (a new run in the same process)."""
    _totals.clear()
    _calls.clear()
    _stack.clear()
    _span.clear()


def collect(directory: Path) -> dict:
    """Totals and call counts summed over every process that wrote to `directory`, and the span from the first
    phase's start to the last phase's end."""
    totals: dict[str, float] = defaultdict(float)
    calls: dict[str, int] = defaultdict(int)
    first, last = None, None
    for path in sorted(Path(directory).glob("*.json")):
        part = json.loads(path.read_text())
        for k, v in part["totals"].items():
            totals[k] += v
        for k, v in part["calls"].items():
            calls[k] += v
        if part["span"]:
            first = part["span"][0] if first is None else min(first, part["span"][0])
            last = part["span"][1] if last is None else max(last, part["span"][1])
    return {"totals": dict(totals), "calls": dict(calls), "span": [first, last] if first is not None else []}


def breakdown(collected: dict, wall: float, started: float) -> dict[str, float]:
    """Seconds per phase, plus what no phase covers: start-up (the run's start to its first phase: Ray, Flower,
    the coordinator's set-up), and the rest (message passing, polling, idle devices, shut-down). The values add up
    to `wall` exactly; `rest` is negative only if phases overlapped, which the caller should treat as a bug."""
    out = dict(sorted(collected["totals"].items(), key=lambda kv: -kv[1]))
    span = collected.get("span") or []
    out["start-up (Ray, Flower, until the first phase)"] = max(0.0, span[0] - started) if span else 0.0
    out["rest (messaging, polling, idle, shut-down)"] = wall - sum(out.values())
    return out
