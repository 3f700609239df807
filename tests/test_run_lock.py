"""One run per output folder: two runs started at once, live and stale locks (dead pid, another host's stopped
heartbeat, the same SLURM job requeued)."""
import json
import os
import socket
import subprocess
import sys
import time

import pytest

import tiny
from kd_engine.cli import main as cli_main
from kd_engine.engine import runlock


@pytest.fixture(scope="module", autouse=True)
def _env(tmp_path_factory):
    tiny.single_process_env(str(tmp_path_factory.mktemp("kdcache")))


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    d = tmp_path_factory.mktemp("lock")
    tiny.make_llama(str(d / "teacher"), layers=2)
    tiny.write_lines(str(d / "train.txt"), tiny.sentences(32))
    return d


def _args(d, out, *extra):
    return ["--method", "kd", "--teacher", str(d / "teacher"), "--student.layers", "1", "--train_file",
            str(d / "train.txt"), "--output_dir", str(out), "--max_steps", "2", "--per_device_train_batch_size", "4",
            "--disable_tqdm", "true", "--export", "false", *extra]


def _write_lock(out, **info):
    os.makedirs(out, exist_ok=True)
    base = {"host": socket.gethostname(), "pid": 1, "slurm_job_id": None, "started": time.time(), "nonce": "x"}
    base.update(info)
    with open(out / runlock.LOCK, "w") as f:
        json.dump(base, f)
    return base


def _errors(capsys):
    return [x for x in capsys.readouterr().err.splitlines() if x.startswith("error:")]


def test_two_runs_started_together_one_trains_the_other_refuses(assets, tmp_path):
    out = tmp_path / "run"
    # each run stops itself (SIGSTOP) when its step 2 begins: the winner is then alive and holding the lock
    env = tiny.cpu_env({"KD_ENGINE_CRASH_AT_STEP": "2", "KD_ENGINE_CRASH_SIGNAL": "STOP", "RANK": "0",
                        "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1"})
    procs = []
    for i in range(2):
        env["MASTER_PORT"] = str(tiny_port(i))
        procs.append(subprocess.Popen([sys.executable, "launch/train.py", *_args(assets, out, "--max_steps", "3")],
                                      env=dict(env), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    try:
        deadline = time.time() + 120
        loser = None
        while time.time() < deadline and loser is None:
            for p in procs:
                if p.poll() is not None:
                    loser = p
            time.sleep(0.2)
        assert loser is not None, "neither run stopped on the lock"
        winner = procs[1 - procs.index(loser)]
        err = loser.stderr.read()
        lines = [x for x in err.splitlines() if x.startswith("error:")]
        assert loser.returncode == 2 and len(lines) == 1 and "is in use by another kd_engine run" in lines[0], err
        assert f"pid {winner.pid}" in lines[0]
        winner.send_signal(__import__("signal").SIGCONT)
        assert winner.wait(timeout=120) == 0, winner.stderr.read()[-2000:]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert sorted(os.listdir(out / "checkpoints")) == ["step-00000003"]
    assert not (out / runlock.LOCK).exists()  # released at the end


def tiny_port(i):
    from kd_engine.dist import free_port

    return free_port() + i


def test_live_lock_refuses_and_changes_nothing(assets, tmp_path, capsys):
    holder = subprocess.Popen(["sleep", "60"])
    try:
        out = tmp_path / "run"
        info = _write_lock(out, pid=holder.pid)
        before = sorted(os.listdir(out))
        assert cli_main(_args(assets, out)) == 2
        lines = _errors(capsys)
        assert len(lines) == 1 and f"pid {holder.pid} on {info['host']}" in lines[0]
        assert sorted(os.listdir(out)) == before
        # another host, heartbeat fresh: also live
        _write_lock(out, host="node-elsewhere", pid=holder.pid)
        assert cli_main(_args(assets, out)) == 2 and "node-elsewhere" in _errors(capsys)[0]
    finally:
        holder.kill()


@pytest.mark.parametrize("case", ["dead pid", "stopped heartbeat", "same SLURM job"])
def test_stale_lock_is_taken_over(assets, tmp_path, monkeypatch, case):
    out = tmp_path / "run"
    if case == "dead pid":
        p = subprocess.Popen(["true"])
        p.wait()
        _write_lock(out, pid=p.pid)
    elif case == "stopped heartbeat":
        _write_lock(out, host="node-elsewhere", pid=4242)
        old = time.time() - runlock.STALE_S - 5
        os.utime(out / runlock.LOCK, (old, old))
    else:
        monkeypatch.setenv("SLURM_JOB_ID", "987654")
        _write_lock(out, host="node-elsewhere", pid=4242, slurm_job_id="987654")
    assert cli_main(_args(assets, out)) == 0
    assert not (out / runlock.LOCK).exists()


def test_racing_takeovers_of_one_stale_lock_give_it_to_one(tmp_path):
    """Two takers of the same stale lock: the second finds the first's fresh lock and refuses."""
    out = tmp_path / "run"
    p = subprocess.Popen(["true"])
    p.wait()
    _write_lock(out, pid=p.pid)
    first = runlock.RunLock(str(out))
    first.acquire()
    try:
        second = runlock.RunLock(str(out))
        with pytest.raises(Exception, match="in use by another kd_engine run"):
            # same process: make the first look like another live process on another host
            info = json.load(open(out / runlock.LOCK))
            info.update(host="node-b", pid=99999)
            json.dump(info, open(out / runlock.LOCK, "w"))
            second.acquire()
    finally:
        first.release()
