"""The one atomic-write helper (temp + rename) and the cache root."""
import os

import pytest

from kd_engine.io import atomic_dir, atomic_file, write_text
from kd_engine.paths import cache_dir, cache_root


def test_atomic_file_replaces_whole_or_not_at_all(tmp_path):
    p = tmp_path / "state.json"
    write_text(str(p), "old")
    with pytest.raises(RuntimeError):
        with atomic_file(str(p)) as fh:
            fh.write("half of the new")
            raise RuntimeError("killed mid-write")
    assert p.read_text() == "old" and os.listdir(tmp_path) == ["state.json"]  # no temp file left behind
    with atomic_file(str(p), "wb") as fh:
        fh.write(b"new")
    assert p.read_bytes() == b"new" and os.listdir(tmp_path) == ["state.json"]


def test_atomic_dir_publishes_complete_folders_only(tmp_path):
    target = tmp_path / "final"
    with pytest.raises(RuntimeError):
        with atomic_dir(str(target)) as tmp:
            (tmp_path / "final-probe").write_text(tmp)
            open(os.path.join(tmp, "weights"), "w").write("partial")
            raise RuntimeError
    assert not target.exists() and not os.path.exists((tmp_path / "final-probe").read_text())
    with atomic_dir(str(target)) as tmp:
        open(os.path.join(tmp, "weights"), "w").write("v1")
    with atomic_dir(str(target), replace=False) as tmp:  # another process finished first: keep its folder
        open(os.path.join(tmp, "weights"), "w").write("v2")
    assert (target / "weights").read_text() == "v1"
    with atomic_dir(str(target)) as tmp:
        open(os.path.join(tmp, "weights"), "w").write("v3")
    assert (target / "weights").read_text() == "v3"
    assert sorted(os.listdir(tmp_path)) == ["final", "final-probe"]


def test_cache_root_follows_kd_engine_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("KD_ENGINE_CACHE", str(tmp_path / "c"))
    assert cache_root() == str(tmp_path / "c") and cache_dir("corpus") == str(tmp_path / "c" / "corpus")
    monkeypatch.delenv("KD_ENGINE_CACHE")
    assert cache_root() == os.path.join(os.path.expanduser("~"), ".cache", "kd_engine")
