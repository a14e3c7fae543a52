"""Phase timing: exclusive nesting, one file per process, and a breakdown that adds up to the wall."""

import json

import pytest

from common import timing


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


@pytest.fixture
def clock(monkeypatch, tmp_path):
    fake = FakeClock()
    monkeypatch.setattr(timing, "_clock", fake)
    monkeypatch.setenv(timing.ENV, str(tmp_path / "t"))
    timing.reset()
    yield fake
    timing.reset()


def test_nested_phases_count_exclusively_and_add_up_to_the_outer_wall(clock, tmp_path):
    with timing.phase("handler"):
        clock.now += 1.0
        with timing.phase("training"):
            clock.now += 5.0
            with timing.phase("store"):
                clock.now += 0.5
        with timing.phase("store"):
            clock.now += 0.25
        clock.now += 2.0
    got = timing.collect(tmp_path / "t")
    assert got["totals"] == {"handler": 3.0, "training": 5.0, "store": 0.75}
    assert got["calls"] == {"handler": 1, "training": 1, "store": 2}
    assert sum(got["totals"].values()) == clock.now  # exclusive: nothing counted twice


def test_a_phase_that_raises_is_still_counted_and_the_stack_unwinds(clock, tmp_path):
    with pytest.raises(ValueError):
        with timing.phase("outer"):
            clock.now += 1.0
            with timing.phase("inner"):
                clock.now += 2.0
                raise ValueError
    with timing.phase("next"):
        clock.now += 1.0
    assert timing.collect(tmp_path / "t")["totals"] == {"outer": 1.0, "inner": 2.0, "next": 1.0}


def test_decorated_functions_are_phases(clock, tmp_path):
    @timing.phase("work")
    def work():
        clock.now += 2.0

    work()
    work()
    assert timing.collect(tmp_path / "t")["calls"] == {"work": 2}


def test_processes_are_summed_and_the_breakdown_adds_up_to_the_wall(tmp_path):
    (tmp_path / "1.json").write_text(json.dumps({"totals": {"a": 2.0, "b": 1.0}, "calls": {"a": 1, "b": 1},
                                                 "span": [105.0, 150.0]}))
    (tmp_path / "2.json").write_text(json.dumps({"totals": {"a": 3.0}, "calls": {"a": 2}, "span": [103.0, 140.0]}))
    got = timing.collect(tmp_path)
    assert got["totals"] == {"a": 5.0, "b": 1.0} and got["span"] == [103.0, 150.0]
    parts = timing.breakdown(got, wall=60.0, started=100.0)
    assert list(parts)[:2] == ["a", "b"]  # largest first
    assert parts["start-up (Ray, Flower, until the first phase)"] == 3.0
    assert sum(parts.values()) == pytest.approx(60.0) and parts["rest (messaging, polling, idle, shut-down)"] == 51.0


def test_without_the_variable_nothing_is_written_or_kept(monkeypatch, tmp_path):
    monkeypatch.delenv(timing.ENV, raising=False)
    timing.reset()
    with timing.phase("x"):
        pass
    assert timing.collect(tmp_path)["totals"] == {} and not timing._totals
