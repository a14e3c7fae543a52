"""What a simulation's console shows: progress (one line per round), its results, and errors. Everything else that
libraries log or warn goes to a log file, named on the first line.

Known noise is not filtered here but stopped where it starts: the scoring code passes transformers' `cache=`, the
`run_simulation` banner and Ray's accelerator tip are handled in `simulations.runtime`, Opacus' secure-RNG
warning in `common.training`. Other warnings are kept, in the log file (`logging.captureWarnings`), not ignored.
"""

from __future__ import annotations

import logging
import os
import sys
from contextlib import contextmanager
from pathlib import Path

from simulations.runtime import LOG_ENV

# A log record with this attribute set (`extra={PROGRESS: True}`) is progress and is shown on the console; the
# server's per-round line is one (server.server_app).
PROGRESS = "progress"
_FORMAT = "%(asctime)s %(process)d %(levelname)s %(name)s: %(message)s"
_configured = False


def _shown(record: logging.LogRecord) -> bool:
    return bool(getattr(record, PROGRESS, False)) or record.levelno >= logging.ERROR


def _to_file(path: Path, mode: str) -> list[logging.Handler]:
    """This process's logging (root, Flower's, transformers') and its warnings to `path`, none to the console;
    returns the handlers it added."""
    global _configured
    root, flwr = logging.getLogger(), logging.getLogger("flwr")
    root.setLevel(logging.INFO)
    # Console handlers of others: Opacus' basicConfig at import (stderr) and Flower's ConsoleHandler. Subclasses
    # that are not plain consoles (pytest's capture, files) stay.
    from flwr.common.logger import ConsoleHandler

    for logger in (root, flwr):
        for handler in list(logger.handlers):
            if type(handler) in (logging.StreamHandler, ConsoleHandler):
                logger.removeHandler(handler)
    flwr.propagate = True
    file = logging.FileHandler(path, mode=mode, encoding="utf-8")
    file.setLevel(logging.INFO)
    file.setFormatter(logging.Formatter(_FORMAT))
    root.addHandler(file)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_default_handler()
    hf_logging.enable_propagation()
    hf_logging.disable_progress_bar()  # "Loading weights" bars, once per model load and node
    logging.captureWarnings(True)
    _configured = True
    return [file]


@contextmanager
def session(log_file: str | Path):
    """This run's console and log file (overwritten), the log file's path printed first; on exit the logging
    set-up before it is restored (tests run several mains in one process)."""
    from transformers.utils import logging as hf_logging

    global _configured
    root, flwr, hf = logging.getLogger(), logging.getLogger("flwr"), hf_logging.get_logger()
    saved = (root.level, list(root.handlers), list(flwr.handlers), flwr.propagate, list(hf.handlers), hf.propagate,
             hf_logging.is_progress_bar_enabled(), os.environ.get(LOG_ENV))
    path = Path(log_file).resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    os.environ[LOG_ENV] = str(path)  # for the simulation's workers (`worker_logging`), which inherit it
    # Emptied, then appended to (O_APPEND) by this process and the workers alike: a handler writing at its own
    # offset ("w") would overwrite the workers' lines.
    path.write_text("")
    added = _to_file(path, mode="a")
    console = logging.StreamHandler(sys.stdout)
    console.addFilter(_shown)
    console.setFormatter(logging.Formatter("%(message)s"))
    root.addHandler(console)
    print(f"log file (library logging and warnings): {path}", flush=True)
    try:
        yield path
    finally:
        for handler in (*added, console):
            handler.close()
        level, root.handlers[:], flwr.handlers[:], flwr.propagate, hf.handlers[:], hf.propagate, bars, env = saved
        root.setLevel(level)
        if bars:
            hf_logging.enable_progress_bar()
        if env is None:
            os.environ.pop(LOG_ENV, None)
        else:
            os.environ[LOG_ENV] = env
        logging.captureWarnings(False)
        _configured = False


def worker_logging(message, context, call_next):
    """ClientApp mod: in a simulation worker, on its first message, send its logging to the run's log file."""
    if not _configured and os.environ.get(LOG_ENV):
        _to_file(Path(os.environ[LOG_ENV]), mode="a")
    return call_next(message, context)
