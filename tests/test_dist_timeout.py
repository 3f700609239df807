"""A rank that dies (SIGKILL) or hangs (SIGSTOP) in a 2-rank run: the other rank exits within a bounded time with
one error line naming the lost rank, instead of waiting forever (--dist_timeout)."""
import os
import subprocess
import sys
import time

import pytest

import tiny
from kd_engine.dist import free_port

pytestmark = [pytest.mark.slow, pytest.mark.multirank]
TRAIN = os.path.abspath("launch/train.py")


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    d = tmp_path_factory.mktemp("dist_timeout")
    tiny.make_llama(str(d / "teacher"), layers=2)
    tiny.write_lines(str(d / "train.txt"), tiny.sentences(64))
    return d


@pytest.mark.parametrize("signame", ["KILL", "STOP"])
def test_lost_rank_ends_the_run_within_the_timeout(assets, tmp_path, signame):
    port = str(free_port())
    argv = [sys.executable, TRAIN, "--method", "kd", "--teacher", str(assets / "teacher"), "--student.layers", "1",
            "--train_file", str(assets / "train.txt"), "--output_dir", str(tmp_path / "o"), "--max_steps", "50",
            "--per_device_train_batch_size", "2", "--disable_tqdm", "true", "--dist_timeout", "15"]
    procs = []
    for rank in (0, 1):  # two independent processes, as on two nodes: no launcher to kill the survivor
        env = tiny.cpu_env({"RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                            "MASTER_PORT": port, "KD_ENGINE_CACHE": str(assets / "cache"),
                            "KD_ENGINE_CRASH_AT_STEP": "3", "KD_ENGINE_CRASH_RANK": "1",
                            "KD_ENGINE_CRASH_SIGNAL": signame})
        procs.append(subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    try:
        t0 = time.monotonic()
        while procs[1].poll() is None and signame == "KILL" and time.monotonic() - t0 < 240:
            time.sleep(0.2)
        _, err = procs[0].communicate(timeout=240)
        waited = time.monotonic() - t0
    finally:
        tiny.kill_survivors(procs)
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert procs[0].returncode == 1 and len(errors) == 1, err[-3000:]
    assert "rank 0 lost contact with rank 1" in errors[0] and "--resume" in errors[0]
    if signame == "STOP":  # a hung peer: bounded by --dist_timeout (15 s), not torch's default 30 minutes
        assert waited < 120
