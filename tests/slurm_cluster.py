"""Helpers for the tests on the real local SLURM cluster (scripts/slurm/local_cluster.sh): start/stop, submit,
wait, read job state."""
from __future__ import annotations

import os
import shutil
import subprocess
import time

SCRIPT = os.path.abspath("scripts/slurm/local_cluster.sh")
CANNOT_RUN = 3  # local_cluster.sh's exit code for "not root / no apt and slurm missing"


class Cluster:
    def __init__(self, env: dict, started_here: bool):
        self.env, self.started_here = env, started_here

    def run(self, *cmd, check=True, **kw) -> subprocess.CompletedProcess:
        r = subprocess.run(list(cmd), env=kw.pop("env", self.env), capture_output=True, text=True, timeout=120, **kw)
        if check and r.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)} failed ({r.returncode}): {r.stderr}")
        return r

    def sbatch(self, *args, env: dict | None = None) -> str:
        return self.run("sbatch", "--parsable", *args, env=env or self.env).stdout.strip().split(";")[0]

    def job(self, job_id: str) -> dict:
        """`scontrol show job` as a dict ({} once the job has left slurmctld's memory)."""
        r = self.run("scontrol", "show", "job", "-o", job_id, check=False)
        if r.returncode != 0:
            return {}
        return dict(tok.split("=", 1) for tok in r.stdout.split() if "=" in tok)

    def wait(self, job_id: str, states=("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"),
             timeout: float = 300) -> dict:
        t0 = time.time()
        while time.time() - t0 < timeout:
            info = self.job(job_id)
            if info.get("JobState") in states:
                return info
            time.sleep(0.5)
        raise AssertionError(f"job {job_id} not in {states} after {timeout} s: {self.job(job_id)}")


def start() -> tuple[Cluster | None, str]:
    """(cluster, '') when it runs, (None, reason) when it cannot run on this machine."""
    if shutil.which("sbatch") is None and (os.geteuid() != 0 or shutil.which("apt-get") is None):
        return None, "SLURM is not installed and installing it needs root and apt-get"
    env = dict(os.environ)
    r = subprocess.run(["bash", SCRIPT, "status"], capture_output=True, text=True)
    running = r.returncode == 0
    if not running:
        r = subprocess.run(["bash", SCRIPT, "start"], capture_output=True, text=True, timeout=600)
        if r.returncode == CANNOT_RUN:
            return None, r.stderr.strip().splitlines()[-1]
        if r.returncode != 0:
            raise RuntimeError(f"local_cluster.sh start failed: {r.stderr}")
    conf = os.path.join(os.environ.get("KD_SLURM_DIR", "/var/tmp/kd_engine_slurm"), "slurm.conf")
    env["SLURM_CONF"] = conf
    return Cluster(env, started_here=not running), ""


def stop(cluster: Cluster) -> None:
    if cluster.started_here:
        subprocess.run(["bash", SCRIPT, "stop"], capture_output=True, text=True, timeout=120)
