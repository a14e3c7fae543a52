"""Attack suite for the encrypted device store (issue #15): concurrent writers, stray and hostile names, damaged and
hostile files, hostile key sources, what rotation and forget leave behind, killed writers, file modes."""

import base64
import json
import multiprocessing
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from client.keys import KeySourceError, PassphraseKey, RawKey
from client.store import CRASH_ENV, EncryptedStore, StoreError, version_of
from common.envelope import EnvelopeError, TamperedError, WrongKeyError

ROOT = Path(__file__).resolve().parents[2]
KEY = RawKey(bytes(range(32)))
FEW = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                      HealthCheck.too_slow])


# --- concurrent writers ---------------------------------------------------------------------------------------

def _writer(root: str, tag: int, puts: int, barrier, out) -> None:
    store = EncryptedStore(Path(root), KEY, keep_versions=1000)
    barrier.wait()
    out.put([(store.put_bytes("u1", "personal", f"{tag}:{i}".encode()), f"{tag}:{i}") for i in range(puts)])


def test_concurrent_writer_processes_never_share_a_version_nor_lose_one(tmp_path):
    # Issue #15: two processes got the same version number (versions lost, some unreadable, every put "succeeded"),
    # and two processes creating a new user's key at once left one writer's versions undecryptable forever.
    ctx = multiprocessing.get_context("fork")
    procs, puts = 4, 12
    barrier, out = ctx.Barrier(procs), ctx.Queue()
    workers = [ctx.Process(target=_writer, args=(str(tmp_path), t, puts, barrier, out)) for t in range(procs)]
    for w in workers:
        w.start()
    results = [pair for _ in workers for pair in out.get(timeout=120)]
    for w in workers:
        w.join(60)
        assert w.exitcode == 0
    versions = [v for v, _ in results]
    assert sorted(versions) == list(range(1, procs * puts + 1)), "a version number was handed out twice"
    store = EncryptedStore(tmp_path, KEY)
    for version, payload in results:
        assert store.get_bytes("u1", "personal", version) == payload.encode()


def test_concurrent_threads_and_a_reader_during_pruning(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    store = EncryptedStore(tmp_path, KEY, keep_versions=2)
    store.put_bytes("u1", "state", b"0")

    def write(i):
        return EncryptedStore(tmp_path, KEY, keep_versions=2).put_bytes("u1", "state", str(i).encode())

    def read(_):
        return EncryptedStore(tmp_path, KEY).get_bytes("u1", "state")  # never a vanished file mid-read

    with ThreadPoolExecutor(4) as pool:
        jobs = [pool.submit(write if i % 2 else read, i) for i in range(60)]
        written = [j.result() for j in jobs[1::2]]
        [j.result() for j in jobs[0::2]]
    assert len(set(written)) == len(written) and store.versions("u1", "state") == [30, 31]


# --- stray and hostile names ----------------------------------------------------------------------------------

_stray = st.one_of(
    st.sampled_from(["vX.pfl", "v4.pfl", "v+00004.pfl", "v000000.pfl", "v0000007.pfl", "v 00007.pfl", "v00007.pfl",
                     "v\u0660\u0660\u0660\u0660\u0660\u0667.pfl", "v000007.pfl.bak", "v000007.PFL", ".v000007.pfl",
                     "v-00007.pfl", "v000007.pfl\n"]),
    st.builds(lambda body: f"v{body}.pfl", st.text(alphabet="0123456789+-_ xX.", max_size=9)),
).filter(lambda name: version_of(name) is None)  # a true version name (e.g. `v000002.pfl`) is not a stray


@FEW
@given(names=st.lists(st.tuples(_stray, st.sampled_from(["file", "dir", "symlink"])), min_size=1, max_size=4))
def test_stray_entries_in_an_adapter_directory_never_break_get_or_put(tmp_path_factory, names):
    # Issue #15: `vX.pfl` -> ValueError on get and put; `v4.pfl`, `v+00004.pfl` -> FileNotFoundError; a directory
    # named like a version -> IsADirectoryError.
    root = tmp_path_factory.mktemp("s")
    store = EncryptedStore(root, KEY)
    store.put_bytes("u1", "personal", b"one")
    d = root / "users/u1/personal"
    for name, kind in names:
        if "/" in name or "\x00" in name or os.path.lexists(d / name):
            continue
        {"file": lambda p: p.write_bytes(b"junk"), "dir": lambda p: p.mkdir(),
         "symlink": lambda p: p.symlink_to(d / "v000001.pfl")}[kind](d / name)
    assert store.versions("u1", "personal") == [1]
    assert store.get_bytes("u1", "personal") == b"one"
    v = store.put_bytes("u1", "personal", b"two")
    assert store.get_bytes("u1", "personal") == b"two" and store.versions("u1", "personal")[-1] == v


def test_a_directory_with_a_version_name_is_skipped_not_written_into(tmp_path):
    store = EncryptedStore(tmp_path, KEY)
    store.put_bytes("u1", "personal", b"one")
    (tmp_path / "users/u1/personal/v000002.pfl").mkdir()
    assert store.put_bytes("u1", "personal", b"two") == 3
    assert store.get_bytes("u1", "personal") == b"two"


def test_stray_entries_under_users_do_not_break_listing_or_rotation(tmp_path):
    store = EncryptedStore(tmp_path, KEY)
    store.put_bytes("u1", "personal", b"one")
    (tmp_path / "users/notes.txt").write_text("x")
    (tmp_path / "users/bad name").mkdir()
    (tmp_path / "users/.hidden").mkdir()
    assert store.users() == ["u1"]
    new = RawKey.generate()
    assert store.rotate(new) == 1 and EncryptedStore(tmp_path, new).get_bytes("u1", "personal") == b"one"


@pytest.mark.parametrize("user,name", [("u1\n", "personal"), ("u1", "personal\n"), ("u1", "user.key"),
                                       ("..", "x"), ("u1", ".lock"), ("u/1", "x"), ("u1", "")])
def test_hostile_names_are_store_errors(tmp_path, user, name):
    with pytest.raises(StoreError):
        EncryptedStore(tmp_path, KEY).put_bytes(user, name, b"x")


# --- damaged files read with the right key --------------------------------------------------------------------

@FEW
@given(data=st.data())
def test_a_flipped_bit_in_any_store_file_is_never_called_a_wrong_key(tmp_path_factory, data):
    root = tmp_path_factory.mktemp("f")
    store = EncryptedStore(root, KEY)
    store.put_bytes("u1", "personal", b"payload")
    path = data.draw(st.sampled_from([root / "users/u1/user.key", root / "users/u1/personal/v000001.pfl"]))
    blob = bytearray(path.read_bytes())
    bit = data.draw(st.integers(0, len(blob) * 8 - 1))
    blob[bit // 8] ^= 1 << (bit % 8)
    path.write_bytes(bytes(blob))
    with pytest.raises(EnvelopeError) as e:
        store.get_bytes("u1", "personal")
    assert not isinstance(e.value, WrongKeyError), (path.name, bit)


def test_a_damaged_check_field_in_user_key_is_tampered(tmp_path):
    # Issue #15: one flipped bit in kek.check was reported as WrongKeyError with the right key.
    store = EncryptedStore(tmp_path, KEY)
    store.put_bytes("u1", "personal", b"payload")
    path = tmp_path / "users/u1/user.key"
    blob = path.read_bytes()
    at = blob.index(b'"check": "') + len(b'"check": "')
    path.write_bytes(blob[:at] + bytes([blob[at] ^ 1]) + blob[at + 1:])
    with pytest.raises(TamperedError):
        store.get_bytes("u1", "personal")
    with pytest.raises(WrongKeyError):
        path.write_bytes(blob)
        EncryptedStore(tmp_path, RawKey.generate()).get_bytes("u1", "personal")


def test_a_store_file_replaced_by_a_directory_or_link_is_an_error_not_a_crash(tmp_path):
    store = EncryptedStore(tmp_path, KEY)
    store.put_bytes("u1", "personal", b"payload")
    key = tmp_path / "users/u1/user.key"
    key.unlink()
    key.mkdir()
    with pytest.raises(StoreError):
        store.get_bytes("u1", "personal")
    with pytest.raises(StoreError):
        store.put_bytes("u1", "personal", b"x")


# --- key sources ----------------------------------------------------------------------------------------------

_json = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
                     lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner,
                                                                                  max_size=5), max_leaves=8)
_descriptor = st.fixed_dictionaries({"kind": st.just("scrypt") | _json, "salt": _json, "n": _json, "r": _json,
                                     "p": _json})


@FEW
@given(content=st.one_of(_json.map(json.dumps), _descriptor.map(json.dumps), st.binary(max_size=64)))
def test_a_malformed_kdf_json_is_a_key_source_error(tmp_path_factory, content):
    # Issue #15: JSONDecodeError, KeyError, TypeError instead of KeySourceError.
    root = tmp_path_factory.mktemp("k")
    (root / "kdf.json").write_bytes(content.encode() if isinstance(content, str) else content)
    with pytest.raises(KeySourceError):
        PassphraseKey.for_store(root, "pw")


def test_a_raw_binary_key_file_is_accepted(tmp_path):
    # Issue #15: a raw 32-byte key file raised UnicodeDecodeError.
    raw = bytes([0xFF, 0xFE] + list(range(30)))
    (tmp_path / "k").write_bytes(raw)
    assert RawKey.from_file(tmp_path / "k").raw == raw
    (tmp_path / "k").write_text(raw.hex() + "\n")
    assert RawKey.from_file(tmp_path / "k").raw == raw
    (tmp_path / "k").write_text(base64.b64encode(raw).decode())
    assert RawKey.from_file(tmp_path / "k").raw == raw
    with pytest.raises(KeySourceError):
        RawKey.from_file(tmp_path)  # a directory


@FEW
@given(content=st.binary(max_size=80))
def test_any_key_file_is_a_key_or_a_key_source_error(tmp_path_factory, content):
    path = tmp_path_factory.mktemp("r") / "key"
    path.write_bytes(content)
    try:
        assert len(RawKey.from_file(path).raw) == 32
    except KeySourceError:
        pass


@FEW
@given(text=st.text(max_size=90))
def test_any_key_text_is_a_key_or_a_key_source_error(text):
    try:
        assert len(RawKey.parse(text).raw) == 32
    except KeySourceError:
        pass


def test_a_kdf_json_that_is_not_a_regular_file_is_refused_without_blocking(tmp_path):
    os.mkfifo(tmp_path / "kdf.json")
    with pytest.raises(KeySourceError, match="regular file"):
        PassphraseKey.for_store(tmp_path, "pw")


WEAK = {"kind": "scrypt", "salt": base64.b64encode(b"s" * 16).decode(), "n": 2, "r": 1, "p": 1}


def test_a_weakened_kdf_json_is_refused(tmp_path):
    # Issue #15 (security): kdf.json replaced with n=2, r=1 made the next user key wrapped under a weak KEK, and
    # the passphrase fell to a search over user.key's check value in under a second.
    EncryptedStore(tmp_path, PassphraseKey.for_store(tmp_path, "correct horse")).put_bytes("u1", "s", b"x")
    (tmp_path / "kdf.json").write_text(json.dumps(WEAK))
    with pytest.raises(KeySourceError, match="scrypt"):
        PassphraseKey.for_store(tmp_path, "correct horse")
    with pytest.raises(KeySourceError):
        PassphraseKey("correct horse", b"s" * 16, n=2, r=1)


def test_kdf_parameters_differing_from_the_user_keys_are_refused(tmp_path):
    EncryptedStore(tmp_path, PassphraseKey.for_store(tmp_path, "correct horse")).put_bytes("u1", "s", b"x")
    original = (tmp_path / "kdf.json").read_text()
    # Strong enough to pass the floor, but not the parameters u1's key was wrapped with: another salt.
    (tmp_path / "kdf.json").write_text(json.dumps({**json.loads(original), "salt": WEAK["salt"], "n": 2**14}))
    store = EncryptedStore(tmp_path, PassphraseKey.for_store(tmp_path, "correct horse"))
    with pytest.raises(KeySourceError, match="kdf.json"):
        store.put_bytes("u2", "s", b"y")  # a new user's key is not wrapped under them
    assert not (tmp_path / "users/u2/user.key").exists()
    with pytest.raises(KeySourceError, match="kdf.json"):
        store.get_bytes("u1", "s")
    (tmp_path / "kdf.json").write_text(original)
    assert EncryptedStore(tmp_path, PassphraseKey.for_store(tmp_path, "correct horse")).get_bytes("u1", "s") == b"x"


def test_passphrase_rotation_records_the_new_parameters(tmp_path):
    store = EncryptedStore(tmp_path, PassphraseKey.for_store(tmp_path, "old"))
    store.put_bytes("u1", "s", b"x")
    store.rotate(PassphraseKey("new", os.urandom(16)))
    assert EncryptedStore(tmp_path, PassphraseKey.for_store(tmp_path, "new")).get_bytes("u1", "s") == b"x"


# --- what rotation and forget leave behind --------------------------------------------------------------------

def test_rotation_overwrites_the_old_wrapped_user_key_in_place(tmp_path):
    # Issue #15: rotate replaced user.key by rename, so after forget the pre-rotation wrapped key survived in
    # unreclaimed blocks (old KEK + old user.key copy + a version copy decrypts). A hard link to the old inode
    # stands in for those blocks: it must no longer hold the old wrapped key.
    old, new = RawKey.generate(), RawKey.generate()
    store = EncryptedStore(tmp_path, old)
    store.put_bytes("u1", "personal", b"secret")
    before = (tmp_path / "users/u1/user.key").read_bytes()
    os.link(tmp_path / "users/u1/user.key", tmp_path / "old-blocks")
    store.rotate(new)
    survivor = (tmp_path / "old-blocks").read_bytes()
    assert survivor != before and b"PFLV" not in survivor
    assert store.get_bytes("u1", "personal") == b"secret"


def test_a_rotation_that_died_part_way_is_finished_by_running_it_again(tmp_path):
    from common.envelope import Binding, rewrap

    old, new = RawKey.generate(), RawKey.generate()
    store = EncryptedStore(tmp_path, old)
    for user in ("a", "b", "c"):
        store.put_bytes(user, "s", user.encode())
    key_b = tmp_path / "users/b/user.key"  # the rotation had re-wrapped b's key, then died
    key_b.write_bytes(rewrap(key_b.read_bytes(), Binding("b", "user-key", 0), old.raw, new.raw, new.descriptor))
    with pytest.raises(WrongKeyError):
        EncryptedStore(tmp_path, old).rotate(RawKey.generate())  # another new key: b's is not under it: refused
    assert store.rotate(new) == 3
    assert [EncryptedStore(tmp_path, new).get_bytes(u, "s") for u in "abc"] == [b"a", b"b", b"c"]


def test_forget_shreds_temporary_copies_of_the_user_key(tmp_path):
    store = EncryptedStore(tmp_path, KEY)
    store.put_bytes("u1", "personal", b"secret")
    key = tmp_path / "users/u1/user.key"
    torn = tmp_path / "users/u1/.user.key.abc123.tmp"  # what a rotation killed before its rename leaves
    torn.write_bytes(key.read_bytes())
    os.link(torn, tmp_path / "torn-blocks")
    report = store.forget("u1")
    assert report["user_key_destroyed"] and report["files_deleted"] == 3
    assert b"PFLV" not in (tmp_path / "torn-blocks").read_bytes()
    assert not (tmp_path / "users/u1").exists()


def test_forget_does_not_follow_a_linked_user_directory(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "precious").write_text("keep")
    store = EncryptedStore(tmp_path / "store", KEY)
    store.put_bytes("u0", "s", b"x")
    (tmp_path / "store/users/u1").symlink_to(outside)
    store.forget("u1")
    assert (outside / "precious").read_text() == "keep"


# --- killed writers and file modes ----------------------------------------------------------------------------

_CHILD = """
import sys
from client.keys import RawKey
from client.store import EncryptedStore
EncryptedStore(sys.argv[1], RawKey(bytes.fromhex(sys.argv[2]))).put_bytes("u1", "personal", b"torn")
"""


def test_temporary_files_of_killed_writers_are_cleaned_up(tmp_path):
    # Issue #15: 12-25 full-size temporary files stayed behind per 36-40 kills.
    store = EncryptedStore(tmp_path, KEY)
    store.put_bytes("u1", "personal", b"old version")
    env = {**os.environ, CRASH_ENV: "before-rename", "PYTHONPATH": str(ROOT)}
    for _ in range(2):
        child = subprocess.run([sys.executable, "-c", _CHILD, str(tmp_path), KEY.raw.hex()], env=env, cwd=ROOT)
        assert child.returncode == -9
    # The second writer already removed the first one's file (it held the lock, so no live writer owned it).
    assert sum(p.name.endswith(".tmp") for p in (tmp_path / "users/u1/personal").iterdir()) == 1
    assert store.get_bytes("u1", "personal") == b"old version"
    store.put_bytes("u1", "personal", b"next")
    assert not [p for p in tmp_path.rglob("*") if p.name.endswith(".tmp")]


def test_store_files_are_owner_only(tmp_path):
    # Issue #15: store files were created 0644.
    old = os.umask(0o022)
    try:
        root = tmp_path / "store"
        keys = PassphraseKey.for_store(root, "pw")
        store = EncryptedStore(root, keys)
        store.put_bytes("u1", "personal", b"x")
        store.put_bytes("u1", "personal", b"y")
        store.rotate(RawKey.generate())
    finally:
        os.umask(old)
    for p in [root, *root.rglob("*")]:
        mode = stat.S_IMODE(p.lstat().st_mode)
        assert mode == (0o700 if p.is_dir() else 0o600), (p, oct(mode))


def test_a_store_left_world_readable_by_older_code_is_tightened_on_write(tmp_path):
    store = EncryptedStore(tmp_path / "store", KEY)
    store.put_bytes("u1", "personal", b"x")
    for p in (tmp_path / "store").rglob("*"):
        p.chmod(0o755 if p.is_dir() else 0o644)
    store.put_bytes("u1", "personal", b"y")
    for p in (tmp_path / "store").rglob("*"):
        assert not stat.S_IMODE(p.stat().st_mode) & 0o077, p


def test_reading_a_missing_store_creates_nothing(tmp_path):
    store = EncryptedStore(tmp_path / "absent", KEY)
    with pytest.raises(StoreError):
        store.get_bytes("u1", "personal")
    assert store.forget("u1")["files_deleted"] == 0 and not (tmp_path / "absent").exists()


# --- a model of the store under random operations and stray files ---------------------------------------------

from hypothesis.stateful import RuleBasedStateMachine, invariant, rule  # noqa: E402 - beside its only user


class StoreModel(RuleBasedStateMachine):
    """Random puts, reads, forgets, rotations and stray directory entries against a dict: the store must agree."""

    def __init__(self):
        super().__init__()
        import tempfile
        self.tmp = tempfile.TemporaryDirectory()
        self.root = Path(self.tmp.name)
        self.keys = RawKey.generate()
        self.store = EncryptedStore(self.root, self.keys, keep_versions=2)
        self.model: dict[tuple[str, str], dict[int, bytes]] = {}
        self.last: dict[tuple[str, str], int] = {}

    def teardown(self):
        self.tmp.cleanup()

    @rule(user=st.sampled_from(["a", "b"]), name=st.sampled_from(["personal", "state"]), payload=st.binary(max_size=40))
    def put(self, user, name, payload):
        v = self.store.put_bytes(user, name, payload)
        assert v > self.last.get((user, name), 0)
        self.last[(user, name)] = v
        kept = self.model.setdefault((user, name), {})
        kept[v] = payload
        for old in sorted(kept)[:-2]:
            del kept[old]

    @rule(user=st.sampled_from(["a", "b"]))
    def forget(self, user):
        self.store.forget(user)
        for key in [k for k in self.model if k[0] == user]:
            del self.model[key]
        self.last = {k: v for k, v in self.last.items() if k[0] != user}  # a forgotten user starts again at 1

    @rule()
    def rotate(self):
        self.keys = RawKey.generate()
        self.store.rotate(self.keys)
        self.store = EncryptedStore(self.root, self.keys, keep_versions=2)

    @rule(user=st.sampled_from(["a", "b"]), name=st.sampled_from(["personal", "state"]), stray=_stray,
          kind=st.sampled_from(["file", "dir"]))
    def stray(self, user, name, stray, kind):
        d = self.root / "users" / user / name
        if d.is_dir() and "/" not in stray and not os.path.lexists(d / stray):
            (d / stray).mkdir() if kind == "dir" else (d / stray).write_bytes(b"junk")

    @invariant()
    def agrees(self):
        for (user, name), kept in self.model.items():
            assert self.store.versions(user, name) == sorted(kept)
            for v, payload in kept.items():
                assert self.store.get_bytes(user, name, v) == payload
        for user in ("a", "b"):
            if not any(k[0] == user for k in self.model):
                with pytest.raises(StoreError):
                    self.store.get_bytes(user, "personal")


test_store_agrees_with_a_model = StoreModel.TestCase
test_store_agrees_with_a_model.settings = settings(max_examples=20, stateful_step_count=12, deadline=None)
