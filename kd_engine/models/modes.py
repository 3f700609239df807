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
