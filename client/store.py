"""The device's encrypted store: per-user adapters and state, encrypted at rest, crash-safe, crypto-shreddable.

Key hierarchy: the KEK (passphrase / key file / keyring) wraps one random *user key* per user
(`users/<user>/user.key`); each stored version is sealed under a fresh data key wrapped by that user key.
- Rotation re-wraps the user keys only: no payload is decrypted or re-encrypted. Each old `user.key` is
  overwritten in place once its replacement is durable, so the old KEK no longer opens a copy at that inode.
- Forget-me overwrites and deletes the user key (and any temporary copy of it), then deletes the user's files:
  whatever copies of the version files survive (backups, unreclaimed blocks) can no longer be decrypted.

Files: `users/<user>/<name>/v000001.pfl` ... in the `common.envelope` format; only names of exactly that form
(`v`, at least six decimal digits without extra leading zeros, `.pfl`, a regular file) are versions, anything else
in a directory is ignored. Writes go to a temporary file (0600) in the same directory, are fsynced, renamed over,
and the directory is fsynced; the previous version stays readable until the new one is complete. Loading decrypts
into memory only (safetensors from bytes), never to a temporary file. Directories are created 0700.

Concurrency: any number of processes (and threads) may use one store at once. Every operation holds a `flock` on
the store's root directory shared, and one on the user's directory shared to read or exclusively to write or
forget; rotation holds the root's exclusively. So version numbers are handed out
once, a user key is created once, and a temporary file found while holding a user's exclusive lock belongs to a
writer that died: it is removed. `flock` needs a local file system (not NFS). The locks are released by the
kernel when a process dies, so a killed writer never blocks the store.
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import signal
import stat
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from client.keys import KeySourceError
from common.timing import phase
from common.envelope import Binding, EnvelopeError, WrongKeyError, open_sealed, read_header, rewrap, seal

if TYPE_CHECKING:  # torch is imported by the adapter methods only: a process storing bytes need not load it
    import torch

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_VERSION = re.compile(r"v([0-9]{6,})\.pfl")
_TEMP = re.compile(r"\..+\.tmp")
_USER_KEY = "user-key"
_USER_KEY_FILE = "user.key"
# Test hook: the name of a write phase at which this process kills itself (crash-safety tests).
CRASH_ENV = "PERSONAFL_STORE_CRASH_AT"


class StoreError(Exception):
    """A request the store cannot satisfy (unknown user/version, bad name, busy store)."""


def _check_name(kind: str, value: str) -> str:
    # fullmatch: `$` would also accept a trailing newline.
    if not isinstance(value, str) or not _NAME.fullmatch(value) or value == _USER_KEY_FILE:
        raise StoreError(f"invalid {kind} {value!r}: use letters, digits, '_', '.', '-' (max 64), "
                         f"not starting with '.' nor {_USER_KEY_FILE!r}")
    return value


def version_of(filename: str) -> int | None:
    """The version a file name stands for, or None: only the exact form `f"v{version:06d}.pfl"`, version >= 1."""
    m = _VERSION.fullmatch(filename)
    if not m:
        return None
    version = int(m.group(1))
    return version if version >= 1 and filename == _version_name(version) else None


def _version_name(version: int) -> str:
    return f"v{version:06d}.pfl"


def _crash_point(phase: str) -> None:
    if os.environ.get(CRASH_ENV) == phase:
        os.kill(os.getpid(), signal.SIGKILL)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _private_dirs(root: Path, path: Path) -> None:
    """Create `path` and its missing parents up to and including `root`, owner-only (mkdir -p ignores the mode)."""
    missing = []
    p = path
    while not p.is_dir():
        missing.append(p)
        if p == root or p.parent == p:
            break
        p = p.parent
    for d in reversed(missing):
        try:
            d.mkdir(mode=0o700)
        except FileExistsError:
            if not d.is_dir() or d.is_symlink():
                raise StoreError(f"{d} exists and is not a directory") from None


def _is_regular(path: Path) -> bool:
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except FileNotFoundError:
        return False


def _owner_only(path: Path) -> None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode) or stat.S_ISREG(st.st_mode):
        if st.st_mode & 0o077:
            os.chmod(path, stat.S_IMODE(st.st_mode) & 0o700)


def atomic_write(path: Path, data: bytes) -> None:
    """`data` at `path` complete or not at all: temporary file (0600) in the same directory, fsync, rename, fsync."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        _crash_point("before-rename")
        os.replace(tmp, path)
    except BaseException:
        if os.path.lexists(tmp):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def _overwrite_in_place(fd: int) -> None:
    """Random bytes over a file's whole length through `fd`, fsynced: reaches the same blocks on a file system that
    rewrites in place (ext4, xfs); not on copy-on-write ones (btrfs, ZFS, APFS) nor below an SSD's flash layer."""
    size = os.fstat(fd).st_size
    os.lseek(fd, 0, os.SEEK_SET)
    written = 0
    while written < size:
        written += os.write(fd, os.urandom(min(size - written, 1 << 20)))
    os.fsync(fd)


def _shred(path: Path) -> int:
    """Overwrite a regular file in place, then unlink it; returns its size."""
    fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW)
    try:
        size = os.fstat(fd).st_size
        _overwrite_in_place(fd)
    finally:
        os.close(fd)
    os.unlink(path)
    return size


class EncryptedStore:
    def __init__(self, root: Path, keys, keep_versions: int = 3, lock_timeout: float = 120.0):
        """`keys`: a provider from `client.keys`; `keep_versions`: versions kept per (user, name) for rollback;
        `lock_timeout`: seconds to wait for another process's write before raising StoreError."""
        if keep_versions < 1:
            raise ValueError("keep_versions must be >= 1")
        self.root = Path(root)
        self.keys = keys
        self.keep_versions = keep_versions
        self.lock_timeout = lock_timeout

    # --- layout --------------------------------------------------------------------------------------------
    def _user_dir(self, user: str) -> Path:
        return self.root / "users" / _check_name("user id", str(user))

    def _dir(self, user: str, name: str) -> Path:
        return self._user_dir(user) / _check_name("adapter name", name)

    def _names(self, d: Path) -> list[str]:
        try:
            return os.listdir(d) if not os.path.islink(d) else []
        except (FileNotFoundError, NotADirectoryError):
            return []

    def versions(self, user: str, name: str) -> list[int]:
        """Version numbers kept for (user, name): regular files of the exact name form only; strays are ignored."""
        d = self._dir(user, name)
        return sorted(v for f in self._names(d) if (v := version_of(f)) is not None and _is_regular(d / f))

    def users(self) -> list[str]:
        base = self.root / "users"
        return sorted(n for n in self._names(base) if _NAME.fullmatch(n) and n != _USER_KEY_FILE
                      and (base / n).is_dir() and not (base / n).is_symlink())

    # --- locks ---------------------------------------------------------------------------------------------
    def _flock(self, fd: int, exclusive: bool, what: str) -> None:
        # Polled so that a hung (not dead: the kernel frees a dead process's locks) holder raises, not hangs.
        deadline, pause = time.monotonic() + self.lock_timeout, 0.001
        while True:
            try:
                fcntl.flock(fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise StoreError(f"{what} is locked by another process for over {self.lock_timeout} s") from None
                time.sleep(pause)
                pause = min(pause * 2, 0.05)

    def _open_dir(self, d: Path) -> int:
        return os.open(d, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)

    @contextmanager
    def _store_lock(self, exclusive: bool, create: bool = False):
        # Locks are taken on the directories themselves: no lock file to leave behind, to name a forgotten user,
        # or to be mistaken for store data.
        if create:
            _private_dirs(self.root, self.root)
        elif not self.root.is_dir():
            yield  # nothing stored: nothing to exclude (and a read must not create the store)
            return
        fd = self._open_dir(self.root)
        try:
            self._flock(fd, exclusive, "the store")
            yield
        finally:
            os.close(fd)

    @contextmanager
    def _user_lock(self, user: str, exclusive: bool, create: bool):
        """Holds the user's directory locked; yields False (no lock) if the user does not exist and not `create`."""
        udir = self._user_dir(user)
        while True:
            if os.path.islink(udir):
                raise StoreError(f"{udir} is a symbolic link; the store does not follow links")
            if create:
                _private_dirs(self.root, udir)
            elif not udir.is_dir():
                yield False
                return
            try:
                fd = self._open_dir(udir)
            except (FileNotFoundError, NotADirectoryError):
                continue  # forgotten (or replaced) meanwhile: look again
            try:
                self._flock(fd, exclusive, f"user {user!r}")
                held = os.fstat(fd)
                try:
                    now = os.lstat(udir)
                except FileNotFoundError:
                    now = None
                if now is None or (now.st_ino, now.st_dev) != (held.st_ino, held.st_dev):
                    continue  # `forget` removed the directory while we waited: lock whatever is there now
                yield True
                return
            finally:
                os.close(fd)

    @contextmanager
    def _locked(self, user: str, exclusive: bool, create: bool = False, missing: str = ""):
        with self._store_lock(exclusive=False, create=create), self._user_lock(user, exclusive, create) as exists:
            if not exists:
                raise StoreError(missing or f"no data stored for user {user!r}")
            yield

    def _sweep(self, d: Path) -> None:
        """Remove temporary files of dead writers; call only with the user's exclusive lock (or the store's) held,
        when no live writer can own one. (A dead rotation's temporary user.key is only the current key under the
        new KEK, no weaker than user.key itself; forget overwrites such copies before deleting them.)"""
        for f in self._names(d):
            if _TEMP.fullmatch(f) and _is_regular(d / f):
                (d / f).unlink(missing_ok=True)

    # --- keys ----------------------------------------------------------------------------------------------
    def _check_kdf(self, header: dict, where: Path) -> None:
        """Refuse a passphrase KEK whose KDF parameters differ from those recorded in a user key's header: the
        header is authenticated, `kdf.json` is not, so a difference means `kdf.json` was altered or replaced."""
        mine, recorded = self.keys.descriptor, {k: v for k, v in header["kek"].items() if k != "check"}
        if mine.get("kind") == "scrypt" and recorded.get("kind") == "scrypt" and recorded != mine:
            raise KeySourceError(f"the KDF parameters in use ({ {k: mine[k] for k in ('n', 'r', 'p')} }, salt "
                                 f"{mine['salt']}) differ from those {where} was wrapped with "
                                 f"({ {k: recorded[k] for k in ('n', 'r', 'p')} }, salt {recorded['salt']}): "
                                 "kdf.json was altered or replaced; restore it")

    def _user_key(self, user: str, create: bool) -> bytes:
        """The user's key; with `create`, made on first use. Call with the user's lock held (exclusive to create)."""
        path = self._user_dir(user) / _USER_KEY_FILE
        binding = Binding(str(user), _USER_KEY, 0)
        if os.path.lexists(path):
            if not _is_regular(path):
                raise StoreError(f"{path} is not a regular file")
            blob = path.read_bytes()
            self._check_kdf(read_header(blob)[0], path)
            return open_sealed(blob, binding, self.keys.key())
        if not create:
            raise StoreError(f"no data stored for user {user!r}")
        for other in self.users():  # a new user's key must not be wrapped under tampered KDF parameters
            other_key = self.root / "users" / other / _USER_KEY_FILE
            if other != str(user) and _is_regular(other_key):
                try:
                    header = read_header(other_key.read_bytes())[0]
                except (EnvelopeError, OSError):
                    continue  # a damaged or vanishing key elsewhere says nothing about these parameters
                self._check_kdf(header, other_key)
        user_key = os.urandom(32)
        atomic_write(path, seal(user_key, binding, self.keys.key(), self.keys.descriptor))
        return user_key

    # --- bytes ---------------------------------------------------------------------------------------------
    @phase("device: encrypted store")
    def put_bytes(self, user: str, name: str, payload: bytes) -> int:
        """Store a new version; returns its number. Older versions beyond `keep_versions` are deleted."""
        d = self._dir(user, name)
        with self._locked(user, exclusive=True, create=True):
            _private_dirs(self.root, d)
            for p in (self.root / "users", self._user_dir(user), d, self._user_dir(user) / _USER_KEY_FILE):
                _owner_only(p)  # a store written by older code (0755 / 0644)
            self._sweep(self._user_dir(user))
            self._sweep(d)
            user_key = self._user_key(user, create=True)
            existing = self.versions(user, name)
            for v in existing:
                _owner_only(d / _version_name(v))
            # Past every name of version form, files or not: a stray directory `v000009.pfl` is never a target.
            version = max([0, *(v for f in self._names(d) if (v := version_of(f)) is not None)]) + 1
            blob = seal(payload, Binding(str(user), name, version), user_key, {"kind": "user-key"})
            atomic_write(d / _version_name(version), blob)
            for old in existing[: max(0, len(existing) + 1 - self.keep_versions)]:
                (d / _version_name(old)).unlink(missing_ok=True)
            return version

    @phase("device: encrypted store")
    def get_bytes(self, user: str, name: str, version: int | None = None) -> bytes:
        """Decrypt a version (default: the latest) into memory. Raises an EnvelopeError subclass on bad data."""
        with self._locked(user, exclusive=False, missing=f"nothing stored for user {user!r} under {name!r}"):
            available = self.versions(user, name)
            if not available:
                raise StoreError(f"nothing stored for user {user!r} under {name!r}")
            version = available[-1] if version is None else version
            if version not in available:
                raise StoreError(f"version {version} of {name!r} not kept (have {available})")
            blob = (self._dir(user, name) / _version_name(version)).read_bytes()
            return open_sealed(blob, Binding(str(user), name, version), self._user_key(user, create=False))

    # --- tensors (adapters) --------------------------------------------------------------------------------
    def put_adapter(self, user: str, name: str, tensors: dict[str, torch.Tensor]) -> int:
        from safetensors.torch import save as save_tensors

        return self.put_bytes(user, name, save_tensors({k: v.detach().cpu().contiguous() for k, v in tensors.items()}))

    def get_adapter(self, user: str, name: str, version: int | None = None) -> dict[str, torch.Tensor]:
        from safetensors.torch import load as load_tensors

        return load_tensors(self.get_bytes(user, name, version))

    # --- key management ------------------------------------------------------------------------------------
    def rotate(self, new_keys) -> int:
        """Re-wrap every user key under `new_keys`; payloads are untouched. Returns the number of user keys now
        under `new_keys` (a rotation that died part-way is finished by running it again with the same keys).

        All user keys are unwrapped with the old KEK before anything is written, so a wrong old key changes nothing.
        Each old `user.key` is overwritten in place after its replacement is durable (see `_overwrite_in_place` for
        what that reaches). A passphrase `new_keys` has its parameters recorded in `kdf.json` at the end.
        """
        with self._store_lock(exclusive=True):
            old_kek, new_kek = self.keys.key(), new_keys.key()
            staged, done = [], 0
            for user in self.users():
                path = self._user_dir(user) / _USER_KEY_FILE
                if not _is_regular(path):
                    continue
                blob, binding = path.read_bytes(), Binding(user, _USER_KEY, 0)
                header = read_header(blob)[0]
                try:
                    self._check_kdf(header, path)
                    staged.append((path, rewrap(blob, binding, old_kek, new_kek, new_keys.descriptor)))
                except (WrongKeyError, KeySourceError):
                    # A rotation that died part-way left this key under the new KEK already: rerunning the same
                    # rotation finishes the job. Anything else keeps the original error (and nothing is written).
                    recorded = {k: v for k, v in header["kek"].items() if k != "check"}
                    if recorded != dict(new_keys.descriptor) or not self._opens(blob, binding, new_kek):
                        raise
                    done += 1
            for path, blob in staged:
                self._sweep(path.parent)
                old = os.open(path, os.O_RDWR | os.O_NOFOLLOW)
                try:
                    atomic_write(path, blob)  # the new wrap is durable before the old one is destroyed
                    _overwrite_in_place(old)
                finally:
                    os.close(old)
            if hasattr(new_keys, "record"):
                new_keys.record(self.root)
            self.keys = new_keys
            return len(staged) + done

    @staticmethod
    def _opens(blob: bytes, binding: Binding, kek: bytes) -> bool:
        try:
            open_sealed(blob, binding, kek)
            return True
        except EnvelopeError:
            return False

    def forget(self, user: str) -> dict:
        """Crypto-shred a user: destroy their user key, then delete their files. Returns what was erased:
        {"user", "user_key_destroyed", "files_deleted" (user key included), "bytes_deleted" (user key excluded)}."""
        udir = self._user_dir(user)
        report = {"user": str(user), "user_key_destroyed": False, "files_deleted": 0, "bytes_deleted": 0}
        if os.path.islink(udir):  # never follow a link out of the store; remove the link itself
            udir.unlink()
            return report
        with self._store_lock(exclusive=False), self._user_lock(user, exclusive=True, create=False) as exists:
            if not exists:
                return report
            # Every copy of the wrapped user key first (user.key, and temporary copies left by killed writers).
            for f in self._names(udir):
                if (f == _USER_KEY_FILE or f.startswith(f".{_USER_KEY_FILE}.")) and _is_regular(udir / f):
                    _shred(udir / f)
                    report["files_deleted"] += 1
                    report["user_key_destroyed"] |= f == _USER_KEY_FILE
            _fsync_dir(udir)
            for top, dirs, files in os.walk(udir, topdown=False, followlinks=False):
                for f in files:
                    p = Path(top) / f
                    report["bytes_deleted"] += os.lstat(p).st_size
                    report["files_deleted"] += 1
                    p.unlink()
                for d in dirs:
                    p = Path(top) / d
                    p.unlink() if p.is_symlink() else p.rmdir()
            udir.rmdir()  # while still locked: waiters then find no directory, or another inode, and look again
        _fsync_dir(udir.parent)
        return report


__all__ = ["EncryptedStore", "StoreError", "EnvelopeError", "KeySourceError", "atomic_write", "version_of",
           "CRASH_ENV"]
