"""The device daemon a device owner runs.

    python -m client.daemon enrol  --home ~/.personafl --data ratings.jsonl --age 31 --gender F --occupation writer
    python -m client.daemon run    --home ~/.personafl --superlink coordinator.example:9092 --root-cert ca.pem
    python -m client.daemon status --home ~/.personafl
    python -m client.daemon forget --home ~/.personafl

`enrol` creates the device home (mode 0700): the SuperNode authentication key pair (EC P-384, OpenSSH format, as
`flower-supernode --auth-supernode-private-key` reads it; register the `.pub` with `flwr supernode register`), the
encrypted store and its key (a random key file, or a passphrase from an environment variable), a local API token,
and `device.json`. `run` starts `flower-supernode` with the project's ClientApp settings as node config (data
path, store path, key file, the path of the owner's answers, training policy) and serves the local inference API on a
Unix socket (or loopback). `status` shows persona, adapter versions, privacy budget left and last round; `forget`
crypto-shreds the owner's state.

The SuperNode's command line (readable by every local user) carries paths and the policy only; the owner's answers
are read from the owner-only `device.json`. The daemon owns its SuperNode: the child gets SIGTERM when the daemon
dies (PR_SET_PDEATHSIG), and a pidfile lets a restarted daemon kill whatever a dead one left behind.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import math
import os
import secrets
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from client.client_app import LEDGER, PERSONAL, STATE, load_state
from client.device import SERVING, read_serving_context
from client.keys import KeySourceError, PassphraseKey, RawKey
from client.store import EncryptedStore, EnvelopeError, StoreError
from common.config import FederationConfig
from common.privacy import PrivacyLedger

SETTINGS = "device.json"


def _private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def enrol(home: Path, data_path: Path, user_id: int, age: int, gender: str, occupation: str,
          passphrase_env: str | None = None, base_model: str | None = None, catalogue: str | None = None,
          dp_budget: float | None = None) -> dict:
    """`dp_budget`: the owner's lifetime epsilon for everything this device sends (None = no limit). It is kept in
    the encrypted device state, where the coordinator's settings can only lower it."""
    if dp_budget is not None and not dp_budget >= 0:
        raise SystemExit(f"--dp-budget must be a non-negative epsilon, got {dp_budget}")
    home = Path(home).expanduser()
    if (home / SETTINGS).exists():
        raise SystemExit(f"{home} is already enrolled ({home / SETTINGS}); use another --home or `forget` first")
    home.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(home, 0o700)  # mkdir's mode does not apply to a directory that already exists
    key = ec.generate_private_key(ec.SECP384R1())
    _private(home / "supernode.key", key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                                       serialization.NoEncryption()))
    _private(home / "supernode.key.pub", key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                                       serialization.PublicFormat.OpenSSH))
    if passphrase_env is None:
        _private(home / "store.key", RawKey.generate().raw.hex().encode())
    _private(home / "api.token", secrets.token_urlsafe(32).encode())
    defaults = FederationConfig()
    settings = {"home": str(home), "user_id": user_id, "data_path": str(Path(data_path).expanduser().resolve()),
                "age": age, "gender": gender, "occupation": occupation, "store_path": str(home / "store"),
                "key": {"kind": "passphrase", "env": passphrase_env} if passphrase_env else
                       {"kind": "file", "path": str(home / "store.key")},
                "base_model": base_model or defaults.base_model, "catalogue": catalogue or defaults.dataset}
    _private(home / SETTINGS, json.dumps(settings, indent=2).encode())  # the owner's sign-up answers: owner-only
    if dp_budget is not None and math.isfinite(dp_budget):
        open_store(settings).put_bytes(str(user_id), STATE, json.dumps({"dp_budget": float(dp_budget)}).encode())
    return settings


def load_settings(home: Path) -> dict:
    path = Path(home).expanduser() / SETTINGS
    if not path.exists():
        raise SystemExit(f"{path.parent} is not an enrolled device home: run `enrol` first")
    return json.loads(path.read_text())


def open_store(settings: dict) -> EncryptedStore:
    key = settings["key"]
    if key["kind"] == "file":
        keys = RawKey.from_file(Path(key["path"]))
    else:
        if not os.environ.get(key["env"]):
            raise SystemExit(f"set the store passphrase in the environment variable {key['env']}")
        keys = PassphraseKey.for_store(Path(settings["store_path"]), os.environ[key["env"]])
    return EncryptedStore(Path(settings["store_path"]), keys)


def status(settings: dict, store: EncryptedStore | None = None) -> dict:
    store = store or open_store(settings)
    user = str(settings["user_id"])
    state = load_state(store, user) if store.users() else {}
    ledger = PrivacyLedger.from_bytes(store.get_bytes(user, LEDGER)) if store.users() and \
        store.versions(user, LEDGER) else None
    budget = None
    if ledger is not None:
        budget = {"spent": ledger.spent, "budget": ledger.budget if ledger.budget != float("inf") else None,
                  "left": ledger.budget - ledger.spent if ledger.budget != float("inf") else None,
                  "delta": ledger.delta}
    return {"user": user, "persona": state.get("persona"),
            "personal_adapter_versions": store.versions(user, PERSONAL) if store.users() else [],
            "last_round": max(state.get("contributed", []), default=None),
            "rounds_contributed": len(state.get("contributed", [])), "privacy": budget,
            "owner_budget": state.get("dp_budget"),  # set at enrol (--dp-budget); None = no limit
            # the personal adapter's weight in what the local API serves, blended with the private base (sent by
            # the coordinator for the adapter's version, `serve-blend`); 1: the adapter alone; None: no adapter yet
            "serving_blend_weight": read_serving_context(store.get_bytes(user, SERVING))[3]
            if store.users() and store.versions(user, SERVING) else None}


def node_config(settings: dict, policy: dict) -> str:
    """The node config string flower-supernode passes to the ClientApp (see client/client_app.py).

    It is on flower-supernode's command line, which every local user can read (`ps`), so it carries paths and the
    policy only: the owner's sign-up answers stay in the owner-only `device.json`, which the ClientApp reads."""
    values = {"data-path": settings["data_path"], "store-path": settings["store_path"],
              "user-id": settings["user_id"], "owner-file": str(Path(settings["home"]) / SETTINGS), **policy}
    if settings["key"]["kind"] == "file":
        values["store-key-file"] = settings["key"]["path"]
    return " ".join(f"{k}={json.dumps(v)}" for k, v in values.items())


def supernode_command(settings: dict, superlink: str, root_cert: str | None, policy: dict,
                      clientappio_port: int | None = None) -> list[str]:
    cmd = [str(BIN / "flower-supernode"), "--superlink", superlink,
           "--auth-supernode-private-key", str(Path(settings["home"]) / "supernode.key"),
           "--node-config", node_config(settings, policy)]
    cmd += ["--root-certificates", root_cert] if root_cert else ["--insecure"]
    if clientappio_port:
        cmd += ["--port", str(clientappio_port)]
    return cmd


# This environment's scripts (flower-supernode, and the flower-superexec it starts by name from PATH). Not resolved:
# a venv's python is a symlink to the base interpreter, whose directory has no Flower scripts.
BIN = Path(sys.executable).parent
PIDFILE = "daemon.pid"
SUPERNODE_LOG = "supernode.log"
_PR_SET_PDEATHSIG = 1


def _die_with_parent(parent: int):
    """A preexec_fn: the child gets SIGTERM when the daemon dies, even by SIGKILL (Linux PR_SET_PDEATHSIG). The
    SuperNode then stops gracefully, and its SuperExec and ClientApp processes follow (they watch their parent)."""
    prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up before the fork: the child only makes the call

    def preexec() -> None:
        if prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
            os._exit(111)
        if os.getppid() != parent:  # the daemon died before prctl: nobody will send the signal
            os._exit(112)
    return preexec


def _proc_stat(pid: int) -> tuple[int, int] | None:
    """(parent pid, start time in clock ticks) of a live process, from /proc; None if there is none."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    fields = text[text.rindex(")") + 2:].split()  # after "pid (comm) "; comm may contain spaces
    return int(fields[1]), int(fields[19])


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (st := _proc_stat(int(entry.name))) is not None:
            children.setdefault(st[0], []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _kill_tree(pid: int, started: int | None = None) -> list[int]:
    """SIGKILL a process and its descendants (if `started` is given, only if `pid` is still that process)."""
    st = _proc_stat(pid)
    if st is None or (started is not None and st[1] != started):
        return []
    victims = [pid, *_descendants(pid)]
    for victim in victims:
        try:
            os.kill(victim, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return victims


def running_daemon(home: Path) -> int | None:
    """The pid of a live daemon serving this home, from its pidfile."""
    try:
        record = json.loads((Path(home) / PIDFILE).read_text())
    except (FileNotFoundError, ValueError):
        return None
    st = _proc_stat(int(record.get("daemon", 0)))
    return int(record["daemon"]) if st is not None and st[1] == record.get("daemon_start") else None


def claim_home(home: Path) -> list[int]:
    """Before starting: refuse if a daemon is already running here; kill what a dead one left (its SuperNode and
    that SuperNode's SuperExec and ClientApps, which would otherwise keep training and writing the store).
    Returns the pids killed."""
    home = Path(home)
    if (pid := running_daemon(home)) is not None:
        raise SystemExit(f"a daemon (pid {pid}) is already running for {home}")
    killed = []
    try:
        record = json.loads((home / PIDFILE).read_text())
    except (FileNotFoundError, ValueError):
        record = {}
    if record.get("supernode"):
        killed = _kill_tree(int(record["supernode"]), record.get("supernode_start"))
    _private(home / PIDFILE, json.dumps({"daemon": os.getpid(), "daemon_start": _proc_stat(os.getpid())[1]}).encode())
    return killed


class SuperNode:
    """The daemon's flower-supernode child and its real state (not just "the process exists")."""

    def __init__(self, cmd: list[str], home: Path):
        self.home = Path(home)
        env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
        self.proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     preexec_fn=_die_with_parent(os.getpid()))
        record = json.loads((self.home / PIDFILE).read_text())
        record.update(supernode=self.proc.pid, supernode_start=_proc_stat(self.proc.pid)[1])
        _private(self.home / PIDFILE, json.dumps(record).encode())
        self.node_id: str | None = None
        self.failure: str | None = None
        self.log = self.home / SUPERNODE_LOG
        threading.Thread(target=self._follow, daemon=True).start()

    def _follow(self) -> None:
        """Copies the SuperNode's output to <home>/supernode.log (owner-only) and notes when it has joined."""
        fd = os.open(self.log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        with os.fdopen(fd, "ab", buffering=0) as log:
            for line in self.proc.stdout:
                log.write(line)
                if b"SuperNode ID:" in line:
                    self.node_id = line.split(b"SuperNode ID:")[1].strip().decode(errors="replace")
                elif b"Exit Code:" in line:  # flwr_exit's error line: the SuperNode is going down
                    self.failure = line.strip().decode(errors="replace")

    def state(self) -> str:
        if self.proc.poll() is not None:
            return f"exited ({self.proc.returncode}); see {self.log}"
        # flower-supernode keeps running (its Runtime API thread) when it could not start its SuperExec: without
        # one it never runs a ClientApp, so it is not "running".
        superexec = [p for p in _descendants(self.proc.pid) if b"flower-superexec" in _cmdline(p)]
        if self.failure:
            return f"failing ({self.failure}); see {self.log}"
        if not superexec:
            return f"broken: no SuperExec; see {self.log}"
        return "online" if self.node_id else "connecting"

    def stop(self, timeout: float = 30) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                _kill_tree(self.proc.pid)
                self.proc.wait(timeout)


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return b""


def owner_only_socket(path: Path) -> socket.socket:
    """A bound Unix socket that only the owner can connect to (0600, created so: no window where it is open).

    uvicorn's own `uds=` chmods the socket to 0666 after creating it, so the daemon binds it itself."""
    path = Path(path)
    if path.is_socket():  # left by a daemon that was killed
        path.unlink()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o177)
    try:
        sock.bind(str(path))
    finally:
        os.umask(old_umask)
    os.chmod(path, 0o600)
    return sock


def run(settings: dict, superlink: str, root_cert: str | None, policy: dict, api_socket: str | None,
        api_port: int | None, clientappio_port: int | None = None, engine: str = "torch") -> None:
    import uvicorn

    from client.local_api import create_local_app

    home = Path(settings["home"])
    killed = claim_home(home)
    if killed:
        print(f"killed processes {killed} left by a daemon that died", flush=True)
    cmd = supernode_command(settings, superlink, root_cert, policy, clientappio_port)
    print("starting:", shlex.join(cmd), flush=True)
    supernode = SuperNode(cmd, home)
    sock = None
    try:
        store = open_store(settings)
        app = create_local_app(settings, store, lambda: {**status(settings, store), "supernode": supernode.state()},
                               engine)
        if api_port:
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a restarted daemon's port may be in TIME_WAIT
            sock.bind(("127.0.0.1", api_port))
        else:
            sock = owner_only_socket(Path(api_socket) if api_socket else home / "api.sock")
        uvicorn.Server(uvicorn.Config(app, log_level="warning")).run(sockets=[sock])
    finally:
        supernode.stop()
        if sock is not None and sock.family == socket.AF_UNIX:
            Path(sock.getsockname()).unlink(missing_ok=True)
        (home / PIDFILE).unlink(missing_ok=True)


def _shred(path: Path) -> bool:
    """Overwrite a file in place, fsync, unlink. Returns whether there was a file."""
    if not path.is_file() or path.is_symlink():
        return False
    with open(path, "r+b") as f:
        size = f.seek(0, os.SEEK_END)
        f.seek(0)
        f.write(os.urandom(size))
        f.flush()
        os.fsync(f.fileno())
    path.unlink()
    return True


# What `enrol` and `run` put in the home: the KEK first (without it no copy of the store opens), then what identifies
# the owner or the device.
_HOME_FILES = ("store.key", SETTINGS, "api.token", "supernode.key", "supernode.key.pub", SUPERNODE_LOG, PIDFILE)


def forget(settings: dict) -> dict:
    """Crypto-shred the owner's state: the store's user key (EncryptedStore.forget), then the store's key file, so no
    copy of the store taken before (backup, snapshot) can be decrypted with anything left here; then the sign-up
    answers, the API token and the device's identity. Reports what it erased and what it could not."""
    home = Path(settings["home"])
    if (pid := running_daemon(home)) is not None:
        raise SystemExit(f"stop the daemon (pid {pid}) first: it holds the store open and would write to it")
    report: dict = {"user": str(settings["user_id"])}
    try:
        report["store"] = open_store(settings).forget(str(settings["user_id"]))
    except (KeySourceError, EnvelopeError, StoreError, OSError) as e:  # e.g. no key file: shred the rest
        report["store"] = {"error": f"{type(e).__name__}: {e}"}
    shredded = [name for name in _HOME_FILES if _shred(home / name)]
    store_root = Path(settings["store_path"])
    if store_root.is_dir():  # what the store keeps beside the users' files (kdf.json) and the empty directories
        for p in sorted(store_root.rglob("*"), key=lambda p: len(p.parts), reverse=True):
            if p.is_file() and _shred(p):
                shredded.append(str(p.relative_to(home) if p.is_relative_to(home) else p))
            elif p.is_dir():
                p.rmdir()
        store_root.rmdir()
    sock = home / "api.sock"
    if sock.is_socket():
        sock.unlink()
    left = sorted(str(p.relative_to(home)) for p in home.rglob("*")) if home.is_dir() else []
    if home.is_dir() and not left:
        home.rmdir()
    not_erased = [
        f"{settings['data_path']}: your interactions file is yours (outside the device home); delete it to remove "
        "your ratings",
        "the coordinator still lists this device's public key until it runs `flwr supernode unregister`",
        "files were overwritten before deletion, but flash storage and journaling or copy-on-write file systems may "
        "keep old blocks; full-disk encryption is what covers those",
    ]
    if settings["key"]["kind"] == "passphrase":
        not_erased.insert(0, "the store key comes from your passphrase: a copy of the store taken before forget still "
                             "opens with it")
    if left:
        not_erased.append(f"files in {home} that the daemon did not create were left: {left[:10]}")
    report.update(shredded=shredded, home_removed=not home.exists(), not_erased=not_erased)
    return report


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    e = sub.add_parser("enrol")
    e.add_argument("--data", required=True, help="interactions file (MovieLens u.data style or JSONL)")
    e.add_argument("--user-id", type=int, default=0)
    e.add_argument("--age", type=int, required=True)
    e.add_argument("--gender", required=True)
    e.add_argument("--occupation", required=True)
    e.add_argument("--passphrase-env", help="read the store passphrase from this variable instead of a key file")
    e.add_argument("--base-model")
    e.add_argument("--catalogue", help="movie catalogue data set (default ml-100k)")
    e.add_argument("--dp-budget", type=float, help="lifetime privacy budget (epsilon) for what this device sends; "
                   "the coordinator can ask for less, never more (default: no limit)")
    r = sub.add_parser("run")
    r.add_argument("--superlink", required=True, help="SuperLink Fleet API host:port")
    r.add_argument("--root-cert", help="PEM CA certificate of the SuperLink (omit only for --insecure tests)")
    r.add_argument("--api-socket", help="Unix socket for the local API (default <home>/api.sock)")
    r.add_argument("--api-port", type=int, help="serve the local API on 127.0.0.1:PORT instead of a socket")
    r.add_argument("--clientappio-port", type=int, help="flower-supernode's local port (several daemons per host)")
    r.add_argument("--train-window", help='e.g. "22:00-06:00"')
    r.add_argument("--max-load", type=float, help="train only when the load per core is below this")
    r.add_argument("--max-steps", type=int)
    r.add_argument("--min-ratings", type=int, default=5)
    r.add_argument("--eval-holdout", type=float,
                   help="hold out this fraction of the newest ratings for on-device evaluation (default: none; every "
                        "rating trains)")
    r.add_argument("--engine", choices=("torch", "onnx"), default="torch",
                   help="local API scoring: torch + peft, or ONNX Runtime (exported once per base model, cached)")
    for s in (e, r, sub.add_parser("status"), sub.add_parser("forget")):
        s.add_argument("--home", default="~/.personafl", help="the device home (default ~/.personafl)")
    args = p.parse_args(argv)

    if args.command == "enrol":
        settings = enrol(Path(args.home), Path(args.data), args.user_id, args.age, args.gender, args.occupation,
                         args.passphrase_env, args.base_model, args.catalogue, args.dp_budget)
        print(f"enrolled {settings['home']}; register {settings['home']}/supernode.key.pub with the coordinator")
        return
    settings = load_settings(Path(args.home))
    if args.command == "status":
        print(json.dumps(status(settings), indent=2))
    elif args.command == "forget":
        print(json.dumps(forget(settings), indent=2))
    else:
        policy = {k: v for k, v in {"train-window": args.train_window, "max-load": args.max_load,
                                    "max-steps": args.max_steps, "min-ratings": args.min_ratings,
                                    "eval-holdout": args.eval_holdout}.items()
                  if v is not None}
        run(settings, args.superlink, args.root_cert, policy, args.api_socket, args.api_port, args.clientappio_port,
            args.engine)


if __name__ == "__main__":
    main()
