"""Train/eval mode switching."""
from __future__ import annotations

import contextlib
from typing import Iterator, Optional

import torch


@contextlib.contextmanager
def eval_mode(*modules: Optional[torch.nn.Module]) -> Iterator[None]:
    """The modules in eval mode (dropout off) for the block; each gets back the mode it had before."""
    states = [(m, m.training) for m in modules if m is not None]
    for m, _ in states:
        m.eval()
    try:
        yield
    finally:
        for m, was in states:
            m.train(was)


@contextlib.contextmanager
def frozen_parameters(module: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """The module as a frozen function for the block: gradients flow through its activations but none reach its
    parameters; each parameter gets back the requires_grad it had before."""
    flags = [(p, p.requires_grad) for p in module.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield module
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
