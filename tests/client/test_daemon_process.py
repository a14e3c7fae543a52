"""The device daemon as a real process: `python -m client.daemon run` with a real flower-supernode (over TLS, towards
a SuperLink that is not there, so it stays connecting), its local API on the owner-only Unix socket."""

import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import httpx

from client.daemon import PIDFILE, _descendants, _proc_stat, claim_home, enrol
from simulations.deployment import free_port, make_certificates
from tests.conftest import make_data, write_grouplens_100k

ROOT = Path(__file__).resolve().parents[2]


def _alive(pid: int) -> bool:
    """A process that exists and is not a zombie (an exited child nobody has reaped yet)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def _supernode_state(client: httpx.Client) -> str | None:
    try:
        return client.get("/status").json()["supernode"]
    except httpx.TransportError:  # the socket file exists a moment before the server accepts on it (seen under load)
        return None


def _wait(predicate, timeout: float, what: str):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if value := predicate():
            return value
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}")


def test_daemon_without_venv_on_path_starts_its_superexec_serves_owner_only_and_its_children_die_with_it(tmp_path):
    ratings, items, users = make_data(n_users=2, n_items=20, per_user=10, seed=3)
    catalogue = write_grouplens_100k(tmp_path / "catalogue", ratings, items, users)
    data = tmp_path / "r.jsonl"
    data.write_text("".join(json.dumps({"item": int(r.item), "rating": int(r.rating), "ts": int(r.ts)}) + "\n"
                            for r in ratings[ratings["user"] == 1].itertuples()))
    home = Path(enrol(tmp_path / "home", data, 1, 30, "M", "artist", base_model="tiny",
                      catalogue=str(catalogue))["home"])
    certs = make_certificates(tmp_path / "certs")
    # Started as the README says, from a shell whose PATH does not have the venv's bin (and a permissive umask).
    env = {**os.environ, "PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)}
    daemon = subprocess.Popen([sys.executable, "-m", "client.daemon", "run", "--home", str(home), "--superlink",
                               f"127.0.0.1:{free_port()}", "--root-cert", str(certs["ca"]), "--clientappio-port",
                               str(free_port())], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, preexec_fn=lambda: os.umask(0))
    children: list[int] = []
    try:
        sock = home / "api.sock"
        _wait(sock.is_socket, 120, "the local API socket")
        assert stat.S_IMODE(sock.stat().st_mode) == 0o600
        token = (home / "api.token").read_text()
        client = httpx.Client(transport=httpx.HTTPTransport(uds=str(sock)), base_url="http://device",
                              headers={"Authorization": f"Bearer {token}"}, timeout=30)
        # No SuperLink to join: the SuperNode is connecting, with its SuperExec found and running (not "running"
        # while it is broken).
        _wait(lambda: _supernode_state(client) == "connecting", 60, "a connecting SuperNode")
        supernode = json.loads((home / PIDFILE).read_text())["supernode"]
        children = [supernode, *_descendants(supernode)]
        assert any(b"flower-superexec" in Path(f"/proc/{p}/cmdline").read_bytes() for p in children)

        daemon.send_signal(signal.SIGKILL)
        daemon.wait(10)
        _wait(lambda: not any(map(_alive, children)), 30, f"the dead daemon's children {children} to exit")
    finally:
        if daemon.poll() is None:
            daemon.kill()
        for pid in children:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)


def test_a_restarted_daemon_kills_what_a_dead_one_left_and_refuses_to_run_twice(tmp_path):
    # A leftover "SuperNode" with a child of its own, recorded by a daemon that is gone (its pid: a reaped process).
    leftover = subprocess.Popen([sys.executable, "-c", "import subprocess, sys, time; "
                                 "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)']); "
                                 "time.sleep(600)"])
    gone = subprocess.Popen(["true"])
    gone.wait()
    try:
        grandchild = _wait(lambda: _descendants(leftover.pid), 20, "the leftover's child")[0]
        (tmp_path / PIDFILE).write_text(json.dumps({"daemon": gone.pid, "daemon_start": 0, "supernode": leftover.pid,
                                                    "supernode_start": _proc_stat(leftover.pid)[1]}))
        killed = claim_home(tmp_path)
        assert set(killed) == {leftover.pid, grandchild}
        leftover.wait(10)
        _wait(lambda: not _alive(grandchild), 10, "the leftover's child to die")
        assert json.loads((tmp_path / PIDFILE).read_text())["daemon"] == os.getpid()
        try:
            claim_home(tmp_path)  # this process is now the live daemon of that home
        except SystemExit as e:
            assert "already running" in str(e)
        else:
            raise AssertionError("a second daemon was allowed on the same home")
    finally:
        if leftover.poll() is None:
            leftover.kill()
