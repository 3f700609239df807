"""kill -9 at several points (during a step, during a checkpoint write, during the final export), then --resume:
final weights bit-identical to an uninterrupted run, train_log.jsonl identical (every step and evaluation once),
no temporary folder left. Also the run's last line and its quiet output."""
import glob
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import tiny

pytestmark = pytest.mark.slow
TRAIN = os.path.abspath("launch/train.py")
TIMING = {"samples_per_s", "tokens_per_s", "teacher_ms", "student_ms"}


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    d = tmp_path_factory.mktemp("faults")
    tiny.make_llama(str(d / "teacher"), layers=2, dropout=0.1)  # dropout on: RNG state must be restored
    tiny.write_lines(str(d / "train.txt"), tiny.sentences(40))
    tiny.write_lines(str(d / "eval.txt"), tiny.sentences(8, seed=1))
    return d


def train(d, out, *extra, env=None):
    argv = ["--method", "kd", "--teacher", str(d / "teacher"), "--student.layers", "1", "--train_file",
            str(d / "train.txt"), "--eval_file", str(d / "eval.txt"), "--output_dir", str(out), "--max_steps", "6",
            "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "2", "--learning_rate", "5e-3",
            "--logging_steps", "1", "--save_steps", "2", "--disable_tqdm", "true", *extra]
    return subprocess.run([sys.executable, TRAIN, *argv], capture_output=True, text=True, timeout=300,
                          env=tiny.cpu_env({"KD_ENGINE_CACHE": str(d / "cache"), **(env or {})}))


def log_records(out):
    """Every step and evaluation record without timings; the per-start ``run`` records (restart count) are left out:
    a resumed run starts once more than the uninterrupted one."""
    rows = [json.loads(line) for line in open(out / "train_log.jsonl")]
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows if r.get("split") != "run"]


@pytest.fixture(scope="module")
def straight(assets, tmp_path_factory):
    out = tmp_path_factory.mktemp("straight") / "o"
    r = train(assets, out)
    assert r.returncode == 0, r.stderr[-3000:]
    return out, r


def test_last_line_says_where_the_model_went_and_third_party_output_is_quiet(straight):
    out, r = straight
    last = r.stdout.strip().splitlines()[-1]
    assert last.startswith(f"done: 6 steps; student exported to {out / 'final'}; ") and "perplexity=" in last, last
    for noise in ("Loading weights", "Generating train split", "Writing model shards", "Filter:"):
        assert noise not in r.stdout + r.stderr, noise


KILLS = {"during step 5": {"KD_ENGINE_CRASH_AT_STEP": "5"},
         "during the step-4 checkpoint write": {"KD_ENGINE_CRASH_IN_SAVE": "4"},
         "during the final export": {"KD_ENGINE_CRASH_IN_EXPORT": "1"}}


@pytest.mark.parametrize("where", list(KILLS))
def test_kill_anywhere_then_resume_is_bit_identical(assets, straight, tmp_path, where):
    ref, _ = straight
    out = tmp_path / "o"
    r = train(assets, out, *(["--verbose"] if "checkpoint" in where else []), env=KILLS[where])
    assert r.returncode == -9, r.stderr[-3000:]
    if "checkpoint" in where:
        assert os.path.isdir(out / "checkpoints" / ".tmp-step-00000004")  # half written, never COMPLETE
        assert "Loading weights" in r.stderr  # --verbose lets third-party output through
    if "export" in where:
        assert glob.glob(str(out / ".tmp-export-*")) and not (out / "final").exists()
    r = train(assets, out, "--resume")
    assert r.returncode == 0, r.stderr[-3000:]
    wa, wb = load_file(str(ref / "final" / "model.safetensors")), load_file(str(out / "final" / "model.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert log_records(out) == log_records(ref)  # each step and each evaluation logged once, same values
    assert not glob.glob(str(out / ".tmp-*")) and not glob.glob(str(out / "checkpoints" / ".tmp-*"))
    assert sorted(os.listdir(out / "checkpoints")) == sorted(os.listdir(ref / "checkpoints"))


@pytest.mark.parametrize("damage", ["truncate", "delete"])
def test_damaged_newest_checkpoint_resumes_from_the_previous_one(straight, tmp_path, assets, damage):
    import shutil

    ref, _ = straight
    out = tmp_path / "o"
    shutil.copytree(ref, out)
    shutil.rmtree(out / "final")
    victim = next((out / "checkpoints" / "step-00000006" / "student").rglob("*model_states.pt"))
    victim.write_bytes(victim.read_bytes()[:100]) if damage == "truncate" else victim.unlink()
    r = train(assets, out, "--resume")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "step-00000006 is damaged" in r.stderr and "falling back to the previous checkpoint" in r.stderr
    assert "resumed from" in r.stderr and "step-00000004" in r.stderr
    wa, wb = load_file(str(ref / "final" / "model.safetensors")), load_file(str(out / "final" / "model.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
