"""The device daemon a device owner runs.

    python -m client.daemon enrol  --home ~/.personafl --data ratings.jsonl --age 31 --gender F --occupation writer
    python -m client.daemon run    --home ~/.personafl --superlink coordinator.example:9092 --root-cert ca.pem
    python -m client.daemon status --home ~/.personafl
    python -m client.daemon forget --home ~/.personafl

`enrol` creates the device home (mode 0700): the SuperNode authentication key pair (EC P-384, OpenSSH format, as
`flower-supernode --auth-supernode-private-key` reads it; register the `.pub` with `flwr supernode register`), the
encrypted store and its key (a random key file, or a passphrase from an environment variable), a local API token,
and `device.json`. `run` starts `flower-supernode` with the project's ClientApp settings as node config (data
path, store path, key file, owner's sign-up answers, training policy) and serves the local inference API on a
Unix socket (or loopback). `status` shows persona, adapter versions, privacy budget left and last round; `forget`
crypto-shreds the owner's state.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shlex
import subprocess
import sys
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from client.client_app import LEDGER, PERSONAL, load_state
from client.keys import PassphraseKey, RawKey
from client.store import EncryptedStore
from common.config import FederationConfig
from common.privacy import PrivacyLedger

SETTINGS = "device.json"


def _private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def enrol(home: Path, data_path: Path, user_id: int, age: int, gender: str, occupation: str,
          passphrase_env: str | None = None, base_model: str | None = None, catalogue: str | None = None) -> dict:
    home = Path(home).expanduser()
    if (home / SETTINGS).exists():
        raise SystemExit(f"{home} is already enrolled ({home / SETTINGS}); use another --home or `forget` first")
    home.mkdir(parents=True, exist_ok=True, mode=0o700)
    key = ec.generate_private_key(ec.SECP384R1())
    _private(home / "supernode.key", key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                                       serialization.NoEncryption()))
    (home / "supernode.key.pub").write_bytes(key.public_key().public_bytes(serialization.Encoding.OpenSSH,
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
    (home / SETTINGS).write_text(json.dumps(settings, indent=2))
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
            "rounds_contributed": len(state.get("contributed", [])), "privacy": budget}


def node_config(settings: dict, policy: dict) -> str:
    """The node config string flower-supernode passes to the ClientApp (see client/client_app.py)."""
    values = {"data-path": settings["data_path"], "store-path": settings["store_path"],
              "user-id": settings["user_id"], "owner-age": settings["age"], "owner-gender": settings["gender"],
              "owner-occupation": settings["occupation"], **policy}
    if settings["key"]["kind"] == "file":
        values["store-key-file"] = settings["key"]["path"]
    return " ".join(f"{k}={json.dumps(v)}" for k, v in values.items())


def supernode_command(settings: dict, superlink: str, root_cert: str | None, policy: dict,
                      clientappio_port: int | None = None) -> list[str]:
    cmd = [str(Path(sys.executable).with_name("flower-supernode")), "--superlink", superlink,
           "--auth-supernode-private-key", str(Path(settings["home"]) / "supernode.key"),
           "--node-config", node_config(settings, policy)]
    cmd += ["--root-certificates", root_cert] if root_cert else ["--insecure"]
    if clientappio_port:
        cmd += ["--port", str(clientappio_port)]
    return cmd


def run(settings: dict, superlink: str, root_cert: str | None, policy: dict, api_socket: str | None,
        api_port: int | None, clientappio_port: int | None = None, engine: str = "torch") -> None:
    import uvicorn

    from client.local_api import create_local_app

    cmd = supernode_command(settings, superlink, root_cert, policy, clientappio_port)
    print("starting:", shlex.join(cmd), flush=True)
    supernode = subprocess.Popen(cmd)
    store = open_store(settings)
    app = create_local_app(settings, store, lambda: {**status(settings, store),
                                                     "supernode": "running" if supernode.poll() is None else
                                                     f"exited ({supernode.returncode})"}, engine)
    try:
        if api_port:
            uvicorn.run(app, host="127.0.0.1", port=api_port, log_level="warning")
        else:
            socket_path = api_socket or str(Path(settings["home"]) / "api.sock")
            old_umask = os.umask(0o177)  # the socket is created owner-only
            try:
                uvicorn.run(app, uds=socket_path, log_level="warning")
            finally:
                os.umask(old_umask)
    finally:
        supernode.terminate()
        supernode.wait(30)


def forget(settings: dict) -> dict:
    report = open_store(settings).forget(str(settings["user_id"]))
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
    r.add_argument("--engine", choices=("torch", "onnx"), default="torch",
                   help="local API scoring: torch + peft, or ONNX Runtime (exported once per base model, cached)")
    for s in (e, r, sub.add_parser("status"), sub.add_parser("forget")):
        s.add_argument("--home", default="~/.personafl", help="the device home (default ~/.personafl)")
    args = p.parse_args(argv)

    if args.command == "enrol":
        settings = enrol(Path(args.home), Path(args.data), args.user_id, args.age, args.gender, args.occupation,
                         args.passphrase_env, args.base_model, args.catalogue)
        print(f"enrolled {settings['home']}; register {settings['home']}/supernode.key.pub with the coordinator")
        return
    settings = load_settings(Path(args.home))
    if args.command == "status":
        print(json.dumps(status(settings), indent=2))
    elif args.command == "forget":
        print(json.dumps(forget(settings), indent=2))
    else:
        policy = {k: v for k, v in {"train-window": args.train_window, "max-load": args.max_load,
                                    "max-steps": args.max_steps, "min-ratings": args.min_ratings}.items()
                  if v is not None}
        run(settings, args.superlink, args.root_cert, policy, args.api_socket, args.api_port, args.clientappio_port,
            args.engine)


if __name__ == "__main__":
    main()
