"""A file system that fills up during a run (a small tmpfs): one error line, exit 2, no traceback; the half-written
checkpoint is removed, the newest complete one stays usable and the run resumes from it once there is space."""
import json
import os
import shutil
import subprocess
import sys

import pytest

import tiny


@pytest.fixture()
def small_fs(tmp_path):
    mnt = tmp_path / "fs"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1200k", "tmpfs", str(mnt)], capture_output=True,
                       text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (needs root): {r.stderr.strip()}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def _args(d, out, *extra):
    return ["launch/train.py", "--method", "kd", "--teacher", str(d / "teacher"), "--student.layers", "1",
            "--train_file", str(d / "train.txt"), "--output_dir", str(out), "--max_steps", "30", "--save_steps", "1",
            "--save_total_limit", "100", "--per_device_train_batch_size", "4", "--disable_tqdm", "true",
            "--lr_scheduler_type", "constant", "--export", "false", *extra]


def test_disk_full_during_a_checkpoint_keeps_the_last_complete_one(tmp_path, small_fs):
    from kd_engine.dist import free_port
    from kd_engine.engine.checkpoint import latest_checkpoint

    tiny.make_llama(str(tmp_path / "teacher"), layers=2)
    tiny.write_lines(str(tmp_path / "train.txt"), tiny.sentences(64))
    env = tiny.cpu_env({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                        "MASTER_PORT": str(free_port()), "KD_ENGINE_CACHE": str(tmp_path / "cache")})
    out = small_fs / "run"
    p = subprocess.run([sys.executable, *_args(tmp_path, out)], env=env, capture_output=True, text=True, timeout=300)
    errors = [x for x in p.stderr.splitlines() if x.startswith("error:")]
    assert p.returncode == 2 and len(errors) == 1 and "no space left" in errors[0], p.stderr[-3000:]
    assert "Traceback" not in p.stderr
    ck = out / "checkpoints"
    assert not [n for n in os.listdir(ck) if n.startswith(".tmp-")]  # the half-written copy is gone
    step, path = latest_checkpoint(str(out))  # verified against its manifest
    assert step >= 1 and path in errors[0]
    assert all((ck / n / "COMPLETE").is_file() for n in os.listdir(ck))  # nothing that looks complete but is not
    # with space again (the folder copied to a larger disk): --resume continues from that checkpoint to the end
    roomy = tmp_path / "roomy"
    shutil.copytree(out, roomy)
    p2 = subprocess.run([sys.executable, *_args(tmp_path, roomy, "--resume", "--save_steps", "0")], env=env,
                        capture_output=True, text=True, timeout=300)
    assert p2.returncode == 0, p2.stderr[-3000:]
    assert f"resumed from {roomy}/checkpoints/step-{step:08d} at step {step}" in p2.stderr
    log = [json.loads(x) for x in open(roomy / "train_log.jsonl")]
    assert max(r["step"] for r in log if r["split"] == "train") == 30
