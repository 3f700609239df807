"""Checkpoint integrity with a real (tiny) DeepSpeed engine: manifests, fallback past a damaged newest checkpoint,
no code execution from our own state files, --overwrite_output_dir deleting only kd_engine's own entries."""
import json
import logging
import os
import pickle

import pytest
import torch

import tiny
from kd_engine.engine import checkpoint, manifest
from kd_engine.errors import KDError
from kd_engine.io import write_text


@pytest.fixture(scope="module", autouse=True)
def _env(tmp_path_factory):
    tiny.single_process_env(str(tmp_path_factory.mktemp("kdcache")))


def _engine():
    import deepspeed

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    ds = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "train_batch_size": 2,
          "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "torch_adam": True}}, "steps_per_print": 10 ** 9}
    engine, *_ = deepspeed.initialize(model=model, model_parameters=list(model.parameters()), config=ds)
    return engine


def _step(engine):
    loss = engine(torch.randn(2, 4)).pow(2).mean()
    engine.backward(loss)
    engine.step()


@pytest.fixture()
def run_dir(tmp_path):
    """A run folder with checkpoints at steps 1 and 2."""
    out = tmp_path / "run"
    checkpoint.write_run_marker(str(out), {"method": "test"})
    eng = _engine()
    for step in (1, 2):
        _step(eng)
        checkpoint.save(str(out), step, {"student": eng}, {"global_step": step}, 0, lambda: None, keep=3,
                        rank_state={"buffer": [torch.ones(3)], "count": step})
    return out, eng


def test_manifest_lists_every_file_and_complete_is_last(run_dir):
    out, _ = run_dir
    ck = out / "checkpoints" / "step-00000002"
    files = json.load(open(ck / manifest.MANIFEST))["files"]
    on_disk = {os.path.relpath(os.path.join(r, f), ck) for r, _, fs in os.walk(ck) for f in fs} - {
        manifest.MANIFEST, manifest.COMPLETE}
    assert set(files) == on_disk and "rank0.pt" in files and any(f.startswith("student/") for f in files)
    assert json.load(open(ck / manifest.COMPLETE))["manifest_sha256"]
    assert checkpoint.problem(str(ck)) is None


@pytest.mark.parametrize("damage", ["truncate", "delete", "flip"])
def test_damaged_newest_checkpoint_falls_back_with_warning(run_dir, damage, caplog):
    out, _ = run_dir
    ck = out / "checkpoints" / "step-00000002"
    victim = next(p for p in sorted((ck / "student").rglob("*.pt")))
    data = victim.read_bytes()
    if damage == "truncate":
        victim.write_bytes(data[: len(data) // 2])
    elif damage == "delete":
        victim.unlink()
    else:
        victim.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    checkpoint._warned.clear()
    with caplog.at_level(logging.WARNING, logger="kd_engine"):
        step, path = checkpoint.latest_checkpoint(str(out))
    assert step == 1 and path.endswith("step-00000001")
    assert "step-00000002 is damaged" in caplog.text and victim.name in caplog.text
    assert checkpoint.check_output_dir(str(out), resume=True, overwrite=False) == "resume"


def test_no_usable_checkpoint_is_one_clear_error(run_dir):
    out, _ = run_dir
    for step in (1, 2):
        os.remove(out / "checkpoints" / f"step-0000000{step}" / "rank0.pt")
    with pytest.raises(KDError, match=r"no usable checkpoint .*step-00000002: rank0.pt is missing; "
                                      r"step-00000001: rank0.pt is missing"):
        checkpoint.check_output_dir(str(out), resume=True, overwrite=False)


class _Payload:
    def __reduce__(self):
        return (os.system, (f"touch {os.environ['KD_PWNED']}",))


def test_own_state_loads_without_pickle(run_dir, tmp_path, monkeypatch):
    out, eng = run_dir
    ck = out / "checkpoints" / "step-00000002"
    # the state round-trips (RNG included) ...
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    checkpoint.save(str(out), 3, {"student": eng}, {"global_step": 3, "sampler": {"position": 5}}, 0, lambda: None,
                    keep=3, rank_state={"n": 1})
    ck3 = out / "checkpoints" / "step-00000003"
    cs, own = checkpoint.load(str(ck3), {"student": eng}, 0)
    assert own == {"n": 1} and torch.equal(torch.rand(3), expected)
    assert cs == {"global_step": 3, "sampler": {"position": 5}} == json.load(open(ck3 / "state.json"))
    # ... and a crafted pickle in our own state file (manifest rewritten to match) runs nothing
    pwned = tmp_path / "pwned"
    monkeypatch.setenv("KD_PWNED", str(pwned))
    with open(ck / "rank0.pt", "wb") as fh:
        pickle.dump({"rng": _Payload(), "method": {}}, fh)
    digest = manifest.write(str(ck), write_text)
    (ck / manifest.COMPLETE).write_text(json.dumps({"step": 2, "manifest_sha256": digest}))
    checkpoint._verified.clear()
    assert checkpoint.problem(str(ck)) is None
    with pytest.raises(KDError, match="rank0.pt (holds a pickle that torch.s safe loader refuses|is truncated)"):
        checkpoint.load(str(ck), {"student": eng}, 0)
    assert not pwned.exists()


def test_method_state_must_be_plain():
    assert checkpoint.plain({"a": [1, 2.5, "x", None], "t": torch.ones(2)})["a"] == [1, 2.5, "x", None]
    with pytest.raises(TypeError, match="method state.obj: object cannot go into a checkpoint"):
        checkpoint.plain({"obj": object()}, "method state")


def test_overwrite_deletes_only_what_kd_engine_wrote(run_dir):
    out, _ = run_dir
    (out / "final").mkdir()
    (out / "train_log.jsonl").write_text("{}\n")
    (out / ".tmp-export-abc").mkdir()
    (out / "notes.txt").write_text("mine")
    (out / ".env").write_text("SECRET=1")
    (out / "plots").mkdir()
    assert checkpoint.check_output_dir(str(out), resume=False, overwrite=True) == "overwrite"
    checkpoint.prepare_output_dir(str(out), "overwrite", "test", {})
    assert sorted(os.listdir(out)) == [".env", "kd_run.json", "notes.txt", "plots"]
    assert json.load(open(out / "kd_run.json"))["owns"] == checkpoint.OWNED


def test_stale_temporaries_are_removed_on_the_next_run(run_dir):
    out, _ = run_dir
    (out / ".tmp-export-x1").mkdir()
    (out / ".tmp-export-x1" / "model.safetensors").write_bytes(b"half")
    (out / "checkpoints" / ".tmp-step-00000009").mkdir()
    (out / ".mine").write_text("keep")
    checkpoint.prepare_output_dir(str(out), "resume", "test", {})
    assert not (out / ".tmp-export-x1").exists() and not (out / "checkpoints" / ".tmp-step-00000009").exists()
    assert (out / ".mine").read_text() == "keep"
