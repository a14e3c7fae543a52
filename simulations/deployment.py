"""A real Flower deployment on this machine: TLS SuperLink with SuperNode authentication, N device daemons.

    python -m simulations.deployment --devices 3 --rounds 2          # tiny model, small MovieLens-like data
    python -m simulations.deployment --set secure-aggregation=true   # the same with secure aggregation

Steps (each a real process): make a self-signed CA and a SuperLink certificate for 127.0.0.1; start
`flower-superlink` with TLS and `--enable-supernode-auth`; enrol N devices (`client.daemon enrol`: SuperNode
key pair, encrypted store) from N users' ratings, register their public keys (`flwr supernode register`), start
them (`client.daemon run`: `flower-supernode` over TLS + the local API); submit the app (`flwr run`); wait for the
ServerApp's history; print the persona versions from the registry and from the admin API.
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_certificates(directory: Path) -> dict[str, Path]:
    """A self-signed CA and a server certificate for 127.0.0.1 / localhost signed by it (PEM files)."""
    directory.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca = (x509.CertificateBuilder().subject_name(name("PersonaFL local CA")).issuer_name(name("PersonaFL local CA"))
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=30))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP384R1())
    cert = (x509.CertificateBuilder().subject_name(name("127.0.0.1")).issuer_name(ca.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    paths = {"ca": directory / "ca.crt", "cert": directory / "server.pem", "key": directory / "server.key"}
    paths["ca"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths["cert"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths["key"].write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
    paths["key"].chmod(0o600)
    return paths


class Deployment:
    """The processes of a local deployment; `close()` stops them all."""

    def __init__(self, work: Path):
        self.work = Path(work)
        self.work.mkdir(parents=True, exist_ok=True)
        # flower-superlink / -supernode start flower-superexec and friends from PATH: put this environment first.
        # UV_OFFLINE: the app runs on this installed environment; nothing may fetch packages at run time (see
        # start_superlink).
        self.env = {**os.environ, "FLWR_HOME": str(self.work / "flwr-home"), "PYTHONPATH": str(ROOT),
                    "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "UV_OFFLINE": "1"}
        self.processes: dict[str, subprocess.Popen] = {}
        self.certs = make_certificates(self.work / "certificates")
        self.port = free_port()  # Flower 1.41 serves the Fleet, Control and Runtime APIs on one HTTPS port

    def _start(self, name: str, cmd: list[str]) -> subprocess.Popen:
        log = open(self.work / f"{name}.log", "ab")
        proc = subprocess.Popen(cmd, cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)  # its own process group: stop() reaches its children
        self.processes[name] = proc
        return proc

    def start_superlink(self) -> None:
        Path(self.env["FLWR_HOME"]).mkdir(parents=True, exist_ok=True)
        (Path(self.env["FLWR_HOME"]) / "config.toml").write_text(
            f'[superlink]\ndefault = "local-tls"\n\n[superlink.local-tls]\naddress = "127.0.0.1:{self.port}"\n'
            f'root-certificates = "{self.certs["ca"]}"\n')
        self._start("superlink", [str(BIN / "flower-superlink"), "--ssl-ca-certfile", str(self.certs["ca"]),
                                  "--ssl-certfile", str(self.certs["cert"]), "--ssl-keyfile", str(self.certs["key"]),
                                  "--enable-supernode-auth", "--host", "127.0.0.1", "--port", str(self.port),
                                  "--database", str(self.work / "superlink.db"),
                                  # Flower 1.41's SuperLink has its SuperExec `uv sync` every submitted app into a
                                  # fresh environment before the ServerApp starts (the whole of pyproject.toml: CUDA
                                  # torch, 97.6 s cold, a package index needed). The app is installed here already;
                                  # the ServerApp runs in this environment. (SuperNodes never sync by default.)
                                  "--disable-runtime-dependency-installation"])
        self._wait_port(self.port)

    def _wait_port(self, port: int, timeout: float = 60) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    return
            time.sleep(0.3)
        raise RuntimeError(f"nothing listens on 127.0.0.1:{port}; see the logs in {self.work}")

    def flwr(self, *args: str) -> str:
        result = subprocess.run([str(BIN / "flwr"), *args], cwd=ROOT, env=self.env, capture_output=True, text=True,
                                timeout=300)
        if result.returncode:
            raise RuntimeError(f"flwr {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")
        return result.stdout

    def enrol(self, name: str, data_file: Path, user: int, age: int, gender: str, occupation: str,
              catalogue: str) -> Path:
        home = self.work / "devices" / name
        subprocess.run([sys.executable, "-m", "client.daemon", "enrol", "--home", str(home), "--data", str(data_file),
                        "--user-id", str(user), "--age", str(age), "--gender", gender, "--occupation", occupation,
                        "--base-model", "tiny", "--catalogue", catalogue], cwd=ROOT, env=self.env, check=True,
                       capture_output=True)
        self.flwr("supernode", "register", str(home / "supernode.key.pub"), "local-tls")
        return home

    def start_device(self, name: str, eval_holdout: float = 0.4) -> None:
        """`eval_holdout`: the newest ratings each device keeps out of training to evaluate on (a demonstration
        measures; a real owner's device trains on all of them by default)."""
        home = self.work / "devices" / name
        ports = self.__dict__.setdefault("device_ports", {}).setdefault(name, (free_port(), free_port()))
        self._start(name, [sys.executable, "-m", "client.daemon", "run", "--home", str(home), "--superlink",
                           f"127.0.0.1:{self.port}", "--root-cert", str(self.certs["ca"]), "--api-port",
                           str(ports[0]), "--clientappio-port", str(ports[1]), "--min-ratings", "1",
                           "--eval-holdout", str(eval_holdout)])

    def kill(self, name: str) -> None:
        proc = self.processes.pop(name)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)

    def submit(self, run_config: dict) -> None:
        overrides = " ".join(f"{k}={json.dumps(v)}" for k, v in run_config.items())
        self.flwr("run", str(ROOT), "local-tls", "--run-config", overrides)

    def close(self) -> None:
        for name in list(self.processes):
            proc = self.processes.pop(name)
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(20)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)


def write_user_files(dataset: str, users: list[int], directory: Path) -> list[tuple[Path, dict]]:
    """Each user's ratings as the JSONL file their device reads, with their sign-up answers."""
    from common.data import load_movielens

    data = load_movielens(dataset)
    directory.mkdir(parents=True, exist_ok=True)
    out = []
    for user in users:
        rows = data.ratings[data.ratings["user"] == user]
        path = directory / f"user-{user}.jsonl"
        path.write_text("".join(json.dumps({"item": int(r.item), "rating": float(r.rating), "ts": int(r.ts)}) + "\n"
                                for r in rows.itertuples()))
        u = data.users.loc[user]
        out.append((path, {"user": user, "age": int(u["age"]), "gender": str(u["gender"]),
                           "occupation": str(u["occupation"])}))
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--devices", type=int, default=3)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--dataset", default="ml-100k", help="catalogue and the users whose ratings the devices hold")
    p.add_argument("--work", default="results/deployment")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="run-config override, e.g. --set secure-aggregation=true (repeatable)")
    args = p.parse_args(argv)
    overrides = {}
    for item in args.set:
        key, _, value = item.partition("=")
        overrides[key] = value

    work = Path(args.work).resolve()
    deployment = Deployment(work)

    def stop(signum, _frame):  # SIGTERM / SIGHUP end the run like Ctrl-C: through `finally`, which stops every process
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGHUP, stop)
    try:
        deployment.start_superlink()
        from common.data import load_movielens

        users = sorted(load_movielens(args.dataset).ratings["user"].unique())[: args.devices]
        for i, (path, who) in enumerate(write_user_files(args.dataset, users, work / "device-data")):
            deployment.enrol(f"device{i}", path, who["user"], who["age"], who["gender"], who["occupation"],
                             args.dataset)
            deployment.start_device(f"device{i}")
        out = work / "coordinator"
        deployment.submit({"base-model": "tiny", "dataset": args.dataset, "num-rounds": args.rounds,
                           "num-personas": 2, "kmeans-iters": 1, "fraction-train": 1.0, "eval-every": 1,
                           "min-nodes": args.devices, "out-dir": str(out), **overrides})
        deadline = time.time() + 1800
        while not (out / "history.json").exists() and time.time() < deadline:
            time.sleep(2)
        from server.registry import PersonaRegistry

        versions, total = PersonaRegistry(out).versions(limit=500)
        print(f"{total} persona versions in {out / 'registry.db'}:")
        for v in versions:
            print(f"  v{v['id']} persona {v['persona']} round {v['round']} devices {v['devices']} {v['state']}")
    finally:
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGHUP, signal.SIGINT})  # finish cleaning up
        deployment.close()


if __name__ == "__main__":
    main()
