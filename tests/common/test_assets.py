import pytest

from common.assets import WHEELS, AssetError, cache_root, extract, fetch_wheel


def test_cache_root_is_overridable(monkeypatch, tmp_path):
    monkeypatch.setenv("PERSONAFL_CACHE", str(tmp_path / "c"))
    assert cache_root() == tmp_path / "c"
    monkeypatch.delenv("PERSONAFL_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root() == tmp_path / "xdg" / "personafl"


def test_unknown_asset():
    with pytest.raises(AssetError, match="unknown asset"):
        fetch_wheel("no-such-model")


def test_corrupt_cached_wheel_is_refused(tmp_path):
    wheel = WHEELS["recbole"]
    path = tmp_path / "downloads" / wheel.filename
    path.parent.mkdir(parents=True)
    path.write_bytes(b"PK\x03\x04 definitely not the real wheel")
    with pytest.raises(AssetError, match="corrupt"):
        fetch_wheel("recbole", cache=tmp_path)
    assert path.exists()  # the error names the file to delete; it does not silently delete it


def test_extract_is_all_or_nothing(tmp_path):
    import zipfile
    wheel = tmp_path / "w.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("pkg/data/a.txt", "a")
        zf.writestr("pkg/data/sub/b.txt", "b")
        zf.writestr("pkg/other.py", "")
    out = extract(wheel, "pkg/data/", tmp_path / "out")
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*.txt")) == ["a.txt", "sub/b.txt"]
    with pytest.raises(AssetError, match="no files under"):
        extract(wheel, "pkg/missing/", tmp_path / "out2")
    assert not (tmp_path / "out2").exists()
