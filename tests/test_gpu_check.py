"""benchmarks/gpu_check.py (what scripts/gpu_check.sh runs on a lent GPU) runs its whole check list on this CPU at
toy sizes (--smoke): the same code paths, so that the day a GPU is lent the script is known to work end to end."""
import json
import os
import subprocess
import sys

import tiny


def test_gpu_check_smoke_runs_every_check(tmp_path):
    tiny.make_llama(str(tmp_path / "model"), layers=2)
    out = tmp_path / "gpu_check.json"
    env = tiny.cpu_env()
    p = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--smoke", "--model_dir", str(tmp_path / "model"),
                        "--output", str(out)], env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    report = json.loads(p.stdout.strip().splitlines()[-1])
    assert report == json.loads(out.read_text())
    checks = report["checks"]
    assert set(checks) == {"fused_equals_naive", "kd_step_zero3_bf16", "fused_adam", "gradient_checkpointing",
                           "minillm_rollout", "sparse_rows_tail_samples"}
    assert checks["sparse_rows_tail_samples"]["batchmate_invariant"]
    assert report["all_pass"] and checks["fused_adam"]["status"] == "skip"  # no CUDA here
    assert checks["gradient_checkpointing"]["max_loss_diff"] < 1e-5
    assert len(checks["kd_step_zero3_bf16"]["losses"]) == 3


def test_gpu_check_without_cuda_or_model_dir_is_one_clear_error(tmp_path):
    env = tiny.cpu_env()
    p = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--model_dir", str(tmp_path)], env=env,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and p.stderr.strip().splitlines()[-1].startswith("error: no CUDA device")
    assert not os.listdir(tmp_path)
