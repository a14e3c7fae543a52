"""A demo registry for the operator's web page (GET /dashboard), and the page's screenshot in docs/.

    python -m bench.dashboard_screenshot [--out docs/dashboard.png]

Seeds a registry in a temporary directory (four personas: a canary running, one promoted, one rolled back
automatically for a worse held-out RMSE, one paused), starts the real admin API on it with `python -m server.cli
serve` on loopback, opens the page in headless Chromium (Debian's `chromium` and `chromium-driver` packages,
driven by selenium), enters an admin token and saves a screenshot. `tests/server/test_dashboard.py` drives the same
page over the same demo registry, so this script cannot drift from what is tested.

The demo runs on a simulated clock (one hour per step from a fixed date) so that the RMSE chart spans days, as a
real rollout does, and the screenshot is the same on every run; its RMSE figures are drawn from a seeded RNG.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

import numpy as np

import server.registry
import server.rollouts
from common.config import LoraSettings
from server.registry import PersonaRegistry
from server.rollouts import Rollouts

START = 1_795_075_200.0  # 2026-11-19 08:00 UTC: a fixed start, so the page looks the same on every run
HOUR = 3600.0
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


class Clock:
    """Simulated time: every call to `time.time` during seeding is one hour after the previous one."""

    def __init__(self, start: float = START):
        self.now = start

    def __call__(self) -> float:
        self.now += HOUR
        return self.now


def _arrays(value: float) -> dict[str, np.ndarray]:
    return {"m.q_proj.lora_A.weight": np.full((2, 4), value, np.float32),
            "m.q_proj.lora_B.weight": np.full((4, 2), value, np.float32)}


def demo_registry(root: Path) -> PersonaRegistry:
    """Four personas with versions, rollouts, pooled evaluations and an audit trail, written through the same
    registry and rollout calls the coordinator uses."""
    registry = PersonaRegistry(root, lora=LoraSettings(rank=2, targets=("q_proj",)), base_model="demo")
    rollouts, rng = Rollouts(registry), np.random.default_rng(0)

    def evaluate(version: int, rmse: float) -> None:
        n, devices = float(rng.integers(250, 400)), int(rng.integers(6, 12))
        rmse = rmse + rng.normal(0, 0.006)
        rollouts.record_evaluation(version, sse=rmse**2 * n, sae=0.8 * rmse * n, n=n, devices=devices)

    # Only the registry's and the rollouts' clock is simulated (not the libraries', nor torch's import).
    clock = SimpleNamespace(time=Clock(), time_ns=time.time_ns)
    with mock.patch.object(server.registry, "time", clock), mock.patch.object(server.rollouts, "time", clock):
        first = {}
        for persona in range(4):
            first[persona] = registry.add_version(persona, 0, _arrays(0.0), 8, {"train_loss": 1.4})
            rollouts.make_stable(persona, first[persona], "federation", "first release")
        for step in range(4):  # stable versions serving everyone
            for persona in range(4):
                evaluate(first[persona], 1.02 - 0.03 * persona - 0.004 * step)
        # Persona 0: a better candidate on a 10 % canary, still running.
        v = registry.add_version(0, 5, _arrays(0.5), 9, {"train_loss": 1.2}, parent=first[0])
        rollouts.start_canary(0, v, 10, "ops-alice", "round 5 is 0.02 better offline")
        # Persona 1: a canary that did well and was promoted; a newer candidate waits.
        w = registry.add_version(1, 5, _arrays(0.5), 9, parent=first[1])
        rollouts.start_canary(1, w, 25, "ops-bob", "round 5")
        # Persona 2: a canary worse than stable by more than the margin, rolled back automatically.
        x = registry.add_version(2, 5, _arrays(0.5), 7, parent=first[2])
        rollouts.start_canary(2, x, 20, "ops-alice", "round 5, smaller cohort")
        # Persona 3: a canary paused by an operator.
        y = registry.add_version(3, 5, _arrays(0.5), 9, parent=first[3])
        rollouts.start_canary(3, y, 5, "ops-bob", "round 5")
        rollouts.pause(3, "ops-bob", "holiday freeze: hold the canary at stable")
        for step in range(6):
            for persona, canary, gain in ((0, v, -0.022), (1, w, -0.015), (2, x, 0.07)):
                if registry.rollout(persona)["canary"] == canary:
                    evaluate(canary, 1.0 - 0.03 * persona + gain - 0.003 * step)
                evaluate(registry.rollout(persona)["stable"], 1.0 - 0.03 * persona - 0.003 * step)
            rollouts.check_canary(2, margin=0.05, min_devices=5)
            if step == 2:
                rollouts.promote(1, "ops-bob", "canary 0.015 better over 3 evaluations")
        registry.add_version(1, 9, _arrays(0.7), 9, parent=w)
        for step in range(3):
            evaluate(registry.rollout(1)["stable"], 0.955 - 0.003 * step)
    return registry


def chromium(width: int = 1280, height: int = 900):
    """Headless Chromium from Debian's packages, driven by selenium through Debian's chromedriver (named
    explicitly, so selenium never tries to download a driver). Raises RuntimeError saying what is missing."""
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not Path(p).exists()]
    if missing:
        raise RuntimeError(f"{' and '.join(missing)} not found (apt-get install chromium chromium-driver)")
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError as e:
        raise RuntimeError(f"selenium is not installed ({e}); it is in the test extras") from None
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    # --no-sandbox: CI and these machines run as root, where Chromium's sandbox refuses to start.
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                f"--window-size={width},{height}", "--hide-scrollbars", "--force-device-scale-factor=1"):
        options.add_argument(arg)
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)


@contextlib.contextmanager
def admin_server(root: Path, tokens: Path):
    """`python -m server.cli serve` on a free loopback port; yields its URL."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    process = subprocess.Popen([sys.executable, "-m", "server.cli", "serve", "--root", str(root), "--tokens",
                                str(tokens), "--port", str(port)], env={**os.environ, "PYTHONUNBUFFERED": "1"})
    url = f"http://127.0.0.1:{port}"
    try:
        import httpx

        deadline = time.time() + 60
        while True:
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if process.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"the admin API did not start (exit code {process.poll()})")
            time.sleep(0.2)
        yield url
    finally:
        process.terminate()
        process.wait(10)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="docs/dashboard.png")
    args = p.parse_args(argv)
    from selenium.webdriver.support.ui import WebDriverWait

    root = Path(tempfile.mkdtemp(prefix="personafl-dashboard-"))
    try:
        demo_registry(root)
        token = "demo-admin-token-" + os.urandom(8).hex()
        (root / "tokens.json").write_text(json.dumps({"tokens": [{"name": "demo", "token": token,
                                                                 "scopes": ["admin"]}]}))
        with admin_server(root, root / "tokens.json") as url:
            driver = chromium()
            try:
                driver.get(url + "/dashboard")
                driver.find_element("id", "token-input").send_keys(token + "\n")
                WebDriverWait(driver, 30).until(
                    lambda d: d.execute_script("return document.querySelectorAll('#events tbody tr').length") > 0)
                # The whole page in one image: a viewport as tall as the page (resizing the headless window does
                # not resize its viewport).
                height = driver.execute_script("return document.documentElement.scrollHeight")
                driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                                       {"width": 1280, "height": height, "deviceScaleFactor": 1, "mobile": False})
                driver.save_screenshot(args.out)
            finally:
                driver.quit()
        print(f"saved {args.out}")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
