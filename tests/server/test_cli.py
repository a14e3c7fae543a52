"""The admin CLI: `serve` started as a real process on loopback, the calls made against it."""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from server.cli import main
from server.registry import PersonaRegistry
from server.rollouts import Rollouts
from tests.server.test_admin_api import _arrays, _registry

ROOT = Path(__file__).resolve().parents[2]
TOKEN = "c" * 24


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_and_rollout_calls(tmp_path, monkeypatch, capsys):
    registry = _registry(tmp_path)
    v0 = registry.add_version(0, 0, _arrays(0.0), 0)
    Rollouts(registry).make_stable(0, v0, "test")
    v1 = registry.add_version(0, 1, _arrays(1.0), 2, parent=v0)
    (tmp_path / "tokens.json").write_text(json.dumps({"tokens": [{"name": "ops", "token": TOKEN,
                                                                  "scopes": ["read", "rollout"]}]}))
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "server.cli", "serve", "--root", str(tmp_path), "--tokens",
                             str(tmp_path / "tokens.json"), "--port", str(port)], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                if httpx.get(url + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        monkeypatch.setenv("PERSONAFL_ADMIN_URL", url)
        monkeypatch.setenv("PERSONAFL_ADMIN_TOKEN", TOKEN)
        main(["canary", "0", str(v1), "--percent", "20", "--reason", "cli test"])
        assert json.loads(capsys.readouterr().out)["canary"] == v1
        main(["promote", "0"])
        assert json.loads(capsys.readouterr().out)["stable"] == v1
        main(["versions", "--persona", "0"])
        assert json.loads(capsys.readouterr().out)["total"] == 2
        with pytest.raises(SystemExit):
            main(["promote", "0"])  # no canary any more: 409, non-zero exit
        assert "no canary" in capsys.readouterr().out
    finally:
        proc.terminate()
        proc.wait(10)
    assert PersonaRegistry(tmp_path).rollout(0)["stable"] == v1  # the served registry file holds the change


def test_cold_start_serving_on_an_empty_registry_exits_with_a_message(tmp_path, monkeypatch):
    monkeypatch.setenv("PERSONAFL_ADMIN_TOKENS", f"ops:{TOKEN}:read")
    with pytest.raises(SystemExit) as exit_:
        main(["serve", "--root", str(tmp_path), "--cold-start"])
    assert "no persona version" in str(exit_.value.code)


def test_serve_refuses_a_token_listed_twice(tmp_path):
    # A subprocess with a timeout: a server that accepted the file would serve until killed.
    env = {**os.environ, "PERSONAFL_ADMIN_TOKENS": f"a:{TOKEN}:read,b:{TOKEN}:admin"}
    out = subprocess.run([sys.executable, "-m", "server.cli", "serve", "--root", str(tmp_path), "--port", "0"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 1 and "same token" in out.stderr and "Traceback" not in out.stderr


def test_the_admin_api_does_not_import_the_model_stack():
    """Start-up took 26-71 s when the registry imported torch and peft; only cold-start serving needs them."""
    code = ("import sys, server.admin_api, server.cli, server.registry, server.rollouts, server.auth; "
            "print(sorted(m for m in ('torch', 'peft', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_calls_to_an_unreachable_server_exit_with_a_message():
    with pytest.raises(SystemExit) as exit_:
        main(["personas", "--url", f"http://127.0.0.1:{_free_port()}", "--token", TOKEN])
    assert "cannot reach" in str(exit_.value.code)
