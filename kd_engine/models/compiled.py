"""A frozen model's forward through ``torch.compile`` for inference-only passes (zero-shot labeling).

Inductor with ``freezing``: the weights become constants of the compiled graph, so on CPU every Linear runs as a
pre-packed oneDNN GEMM with its bias and activation fused, and the LayerNorm/residual/mask element-wise work is
fused into a few loops. Measured on the 2-core development CPU with all-MiniLM-L6-v2 as an NLI teacher (1 thread):
1.18x the eager labeling throughput after a one-off compile of ~15 s, labels equal to eager within 5e-8
(``benchmarks/zero_shot_speed.py``). Shapes are compiled dynamic, so the length-sorted batches of every width reuse
one graph.

Freezing bakes the weights in: only for models that no longer change (the zero-shot teacher, an exported
classifier used as a teacher). ``CompiledInference`` has ``.module`` like a DeepSpeed engine, so the helpers
that unwrap engines (config, device, fingerprint, eval mode) see the real model.
"""
from __future__ import annotations

import os
import shutil
from typing import Any

import torch

from ..errors import KDError


def check_compile_toolchain(device: torch.device) -> None:
    """Inductor on CPU writes and builds C++; fail before any model work when no compiler is there."""
    if device.type != "cpu":
        return
    cxx = os.environ.get("CXX") or "g++"
    if shutil.which(cxx) is None and shutil.which("c++") is None and shutil.which("clang++") is None:
        raise KDError(f"compiling the teacher on CPU needs a C++ compiler ({cxx}, c++ or clang++) on PATH: "
                      f"install one (apt-get install g++) or drop the compile option")


class CompiledInference:
    """``model`` (a frozen Hugging Face module) called through one dynamic-shape compiled forward."""

    def __init__(self, model: torch.nn.Module):
        if any(p.requires_grad for p in model.parameters()):
            raise KDError("compiled inference freezes the weights into the graph: the model must be frozen "
                          "(requires_grad False on every parameter)")
        self.module = model
        self._forward = torch.compile(model.forward, dynamic=True)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        from torch._inductor import config as inductor_config

        # freezing is an inductor setting read when a graph is compiled (first call, and any recompile)
        with inductor_config.patch(freezing=True):
            return self._forward(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:  # everything but the call is the model's (config, base_model, ...)
        if name in ("module", "_forward"):
            raise AttributeError(name)
        return getattr(self.module, name)
