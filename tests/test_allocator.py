"""kd_engine.allocator: on glibc, big buffers freed by one step are reused by the next (no fresh page faults)."""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROBE = """
import resource, sys, torch
if sys.argv[1] == "keep":
    from kd_engine.allocator import keep_freed_memory
    assert keep_freed_memory()
from kd_engine.losses.kd import kl_div_rows, shift_for_causal_lm
torch.manual_seed(0)
s0, t0 = torch.randn(4, 64, 49152, requires_grad=True), torch.randn(4, 64, 49152)  # 50 MB logits
lab = torch.randint(0, 49152, (4, 64))
def step():  # the KD loss forward + backward: several 50 MB buffers allocated and freed
    s0.grad = None
    s, l = shift_for_causal_lm(s0, lab)
    kl_div_rows(s, shift_for_causal_lm(t0, lab)[0], 1.0, l != -100).backward()
for _ in range(2):
    step()
f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(3):
    step()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
"""


def _faults(mode: str) -> int:
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-c", PROBE, mode], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    return int(r.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc settings are Linux-only")
def test_freed_big_buffers_are_reused_without_page_faults():
    default, keep = _faults("default"), _faults("keep")
    assert default > 3 * 12_000  # glibc's default: every 50 MB block is mmapped and faulted in again, each step
    assert keep < default / 10


def test_opt_out_leaves_glibc_defaults(monkeypatch):
    import kd_engine.allocator as allocator

    monkeypatch.setenv("KD_ENGINE_MALLOC", "default")
    monkeypatch.setattr(allocator, "_applied", False)
    assert allocator.keep_freed_memory() is False
