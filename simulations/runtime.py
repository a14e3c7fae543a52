"""The one place that starts a Flower simulation in this process (simulations and tests go through `simulate`).

It uses `flwr.simulation.run_simulation`, deprecated since Flower 1.41 in favour of `flwr run`. `flwr run` was
tried and measured (Flower 1.42, 6 SuperNodes, the tiny model, 2 rounds): 84 s against 33 s here, because it
starts a SuperLink daemon, builds and installs the app as a FAB and `uv sync`s a fresh environment for every run
(17 s with a warm cache), and it runs the FAB's copy of the code, so it cannot wrap the ClientApp in Python
objects as the robustness runs' simulated attackers do (`mods`). `flwr run .` still runs the same apps
(README); when `run_simulation` goes, this function is what changes.
"""

from __future__ import annotations

import logging
import os

# Ray's tip that it will stop overriding CUDA_VISIBLE_DEVICES for actors with num_gpus=0: the simulation's actors
# use no accelerator, so opting in to that future behaviour now changes nothing, and the tip is not printed.
RAY_ENV = {"RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0"}
LOG_ENV = "PERSONAFL_LOG"  # the run's log file, set by simulations.console
_DEPRECATION = "The `run_simulation` function is deprecated"


def _not_the_deprecation_banner(record: logging.LogRecord) -> bool:
    return not any(isinstance(a, str) and a.startswith(_DEPRECATION) for a in (record.args or ()))


def simulate(server_app, client_app, num_nodes: int, cpus_per_node: float | None = None) -> None:
    """Run `server_app` against `num_nodes` simulated SuperNodes running `client_app` (Ray backend), one node at a
    time with every core unless `cpus_per_node` says otherwise (2-core machines gain nothing from parallel model
    replicas)."""
    from flwr.common.logger import FLOWER_LOGGER
    from flwr.simulation import run_simulation

    for key, value in RAY_ENV.items():
        os.environ.setdefault(key, value)  # Ray's workers inherit the driver's environment at ray.init
    resources = {"num_cpus": cpus_per_node or float(os.cpu_count() or 1), "num_gpus": 0.0}
    # Under a console set up by simulations.console, workers' own output stays in Ray's session logs and their
    # logging goes to the run's log file (its `worker_logging` mod); otherwise Flower's default, shown here.
    init_args = {"log_to_driver": False} if os.environ.get(LOG_ENV) else {}
    # The deprecation is known and answered above: its banner is dropped, every other Flower record kept.
    FLOWER_LOGGER.addFilter(_not_the_deprecation_banner)
    try:
        run_simulation(server_app=server_app, client_app=client_app, num_supernodes=num_nodes,
                       backend_config={"client_resources": resources, "init_args": init_args})
    finally:
        FLOWER_LOGGER.removeFilter(_not_the_deprecation_banner)
