"""The one validation layer for input files (kd_engine/input_files.py): every read of a file in the package sits
inside ``with reading(...)`` (checked on the source, so a new read site that skips the layer fails here), and each
kind of damaged file comes out as one InputFileError naming the file."""
import ast
import json
import os
import pickle

import pytest
import torch

from kd_engine.errors import KDError
from kd_engine.input_files import InputFileError, load_tensors, read_json, read_mapping, read_text, reading

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "kd_engine")

# calls that read a file: (object name or None for a builtin, attribute)
READERS = {("json", "load"), ("yaml", "safe_load"), ("yaml", "load"), ("torch", "load"), ("np", "memmap"),
           ("np", "load"), ("datasets", "load_dataset"), (None, "from_pretrained"), (None, "safe_open"),
           (None, "load_file")}


def _is_read_call(node: ast.Call) -> bool:
    f = node.func
    if isinstance(f, ast.Name) and f.id == "open":
        mode = node.args[1] if len(node.args) > 1 else next((k.value for k in node.keywords if k.arg == "mode"), None)
        text = mode.value if isinstance(mode, ast.Constant) else "r"
        return not any(c in text for c in "wax+")
    if isinstance(f, ast.Attribute):
        owner = f.value.id if isinstance(f.value, ast.Name) else None
        return (owner, f.attr) in READERS or (None, f.attr) in READERS
    return isinstance(f, ast.Name) and (None, f.id) in READERS


def _is_reading(item: ast.withitem) -> bool:
    c = item.context_expr
    return isinstance(c, ast.Call) and getattr(c.func, "id", getattr(c.func, "attr", "")) == "reading"


def unguarded_reads():
    """(file, function, line) of every file read in the package that is not inside ``with reading(...)``."""
    out = []
    for dirpath, _, files in os.walk(ROOT):
        for f in files:
            if not f.endswith(".py") or f == "input_files.py":
                continue
            path = os.path.join(dirpath, f)
            rel = os.path.relpath(path, ROOT)
            tree = ast.parse(open(path, encoding="utf-8").read())

            def walk(node, func, guarded):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    func, guarded = node.name, False
                if isinstance(node, ast.With) and any(_is_reading(i) for i in node.items):
                    guarded = True
                if isinstance(node, ast.Call) and _is_read_call(node) and not guarded:
                    out.append((rel, func, node.lineno))
                for child in ast.iter_child_nodes(node):
                    walk(child, func, guarded)

            walk(tree, None, False)
    return out


def test_every_file_read_goes_through_the_layer():
    assert unguarded_reads() == []


def test_the_rule_sees_a_read_that_skips_the_layer(tmp_path, monkeypatch):
    bad = tmp_path / "kd_engine"
    bad.mkdir()
    (bad / "x.py").write_text("import json\ndef f(p):\n    with open(p) as fh:\n        return json.load(fh)\n"
                              "def g(p):\n    with reading('x', p), open(p) as fh:\n        return fh.read()\n")
    monkeypatch.setattr(__import__(__name__), "ROOT", str(bad))
    assert sorted(unguarded_reads()) == [("x.py", "f", 3), ("x.py", "f", 4)]


# -- each kind of damaged file: one InputFileError naming the file ------------------------------------------------
def _error(fn, *args, **kwargs) -> str:
    with pytest.raises(InputFileError) as e:
        fn(*args, **kwargs)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_text_and_json(tmp_path):
    p = tmp_path / "a.json"
    p.write_bytes(b"{\"a\": \xff}")
    assert "not UTF-8 text (byte 7: 0xff)" in _error(read_json, str(p), "thing")
    p.write_text('{"a": ')
    m = _error(read_json, str(p), "thing")
    assert m.startswith(f"thing {p} is not valid JSON") and "line 1" in m
    p.write_text("[1, 2]")
    assert "must hold a JSON mapping, not list" in _error(read_json, str(p), "thing")
    assert read_json(str(p), "thing", expect=list) == [1, 2]
    assert "is a folder, not a file" in _error(read_text, str(tmp_path), "thing")
    assert "not found" in _error(read_text, str(tmp_path / "nope"), "thing")


def test_yaml(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("a: [1, 2\n")
    assert "is not valid YAML" in _error(read_mapping, str(p), "config file")
    p.write_text("!!python/object/apply:os.system ['true']\n")
    assert "is not valid YAML" in _error(read_mapping, str(p), "config file")  # safe_load refuses tags
    p.write_text("- 1\n")
    assert "must hold a mapping" in _error(read_mapping, str(p), "config file")
    p.write_text("")
    assert read_mapping(str(p), "config file") == {}


def test_torch_files(tmp_path):
    p = tmp_path / "t.pt"
    torch.save({"x": torch.arange(4)}, p)
    assert torch.equal(load_tensors(str(p), "state")["x"], torch.arange(4))
    p.write_bytes(p.read_bytes()[:40])
    assert "is truncated or not a torch file" in _error(load_tensors, str(p), "state")

    class Payload:
        def __reduce__(self):
            return (os.getpid, ())

    torch.save({"w": Payload()}, p)
    assert "pickle that torch's safe loader refuses" in _error(load_tensors, str(p), "state")
    torch.save([1, 2], p)
    assert "holds a list, not the mapping" in _error(load_tensors, str(p), "state")
    p.write_bytes(pickle.dumps("x")[:3])
    assert str(p) in _error(load_tensors, str(p), "state")


def test_reading_keeps_kd_errors_and_explains(tmp_path):
    with pytest.raises(KDError, match="^mine$"):
        with reading("x", "p"):
            raise KDError("mine")
    with pytest.raises(InputFileError, match="^custom: ValueError$"):
        with reading("x", "p", explain=lambda e: f"custom: {type(e).__name__}"):
            raise ValueError("boom")
    with pytest.raises(InputFileError, match=r"^x p could not be read \(KeyError: 'k'\)$"):
        with reading("x", "p"):
            json.loads("{}")["k"]


# -- the read sites: damaged files of each kind that kd_engine reads ----------------------------------------------
def test_class_names_and_unlabeled_texts_not_utf8(tmp_path):
    from kd_engine.teachers.zero_shot_inputs import load_class_names, read_texts

    p = tmp_path / "classes.txt"
    p.write_bytes(b"sports\nsci\xe9nce\n")
    assert f"class names file {p} is not UTF-8 text" in _error(load_class_names, str(p))
    assert f"data file {p} is not UTF-8 text" in _error(read_texts, str(p))


def test_corpus_cache_with_damaged_meta_or_short_tokens(tmp_path):
    from kd_engine.data.corpus_cache import COMPLETE_MARKER, TokenCache

    (tmp_path / COMPLETE_MARKER).write_text("")
    (tmp_path / "meta.json").write_text('{"num_documents": 2')
    assert "corpus cache meta" in _error(TokenCache, str(tmp_path))
    (tmp_path / "meta.json").write_text(json.dumps({"num_documents": 2, "num_tokens": 10, "separator": 0,
                                                    "prefix": [], "suffix": []}))
    assert "could not be read (KeyError: 'dtype')" in _error(TokenCache, str(tmp_path))
    (tmp_path / "meta.json").write_text(json.dumps({"num_documents": 2, "num_tokens": 10, "separator": 0,
                                                    "prefix": [], "suffix": [], "dtype": "uint16"}))
    (tmp_path / "tokens.bin").write_bytes(b"\0" * 6)  # meta.json says 10 tokens (20 bytes)
    (tmp_path / "offsets.bin").write_bytes(b"\0" * 24)
    cache = TokenCache(str(tmp_path))
    with pytest.raises(InputFileError, match=f"corpus cache {tmp_path} could not be read"):
        cache.tokens


def test_checkpoint_with_damaged_manifest_is_a_problem_not_a_crash(tmp_path):
    import hashlib

    from kd_engine.engine import manifest

    (tmp_path / "state.json").write_text("{}")
    raw = b'{"files": {"state.json": {"size": "x"}}}'
    (tmp_path / manifest.MANIFEST).write_bytes(raw)
    (tmp_path / manifest.COMPLETE).write_text(json.dumps({"manifest_sha256": hashlib.sha256(raw).hexdigest()}))
    assert "checkpoint manifest" in manifest.verify(str(tmp_path))
    (tmp_path / manifest.COMPLETE).write_bytes(b"\xff")
    assert "not UTF-8 text" in manifest.verify(str(tmp_path))


def test_training_log_not_utf8(tmp_path):
    from kd_engine.report import read_log

    (tmp_path / "train_log.jsonl").write_bytes(b'{"split": "train", "step": 1}\n\xff\n')
    assert "training log" in _error(read_log, str(tmp_path))


def test_unreadable_run_lock_is_judged_by_age(tmp_path):
    from kd_engine.engine import runlock

    (tmp_path / runlock.LOCK).write_bytes(b"\xff{half")
    info = runlock.read_lock(str(tmp_path))
    assert info["unreadable"] is True and info["_mtime"] > 0
    assert runlock.read_lock(str(tmp_path / "none")) is None
