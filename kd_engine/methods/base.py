"""The method plugin interface.

A method is one file in ``kd_engine/methods/`` with one ``Method`` subclass decorated by ``@register("name")``.
It declares its options (a dataclass, ``Options``), builds/accepts teacher, student and data, and returns named
loss terms; the engine (``kd_engine.engine.trainer.Trainer``, passed to every hook as ``ctx``) sums them,
backpropagates through the student's DeepSpeed engine, steps, logs, evaluates and checkpoints.

Hooks, in the order the trainer calls them on every rank::

    tok     = method.load_tokenizer(ctx)
    teacher = method.load_teacher(ctx)           # nn.Module or None (needs_teacher = False)
    student = method.load_student(ctx, teacher)  # nn.Module (not yet wrapped)
    data    = method.build_data(ctx)             # DataBundle
    ... trainer wraps the student (deepspeed.initialize) and the teacher (its own inference engine) ...
    method.setup(ctx)                            # optional: extra engines via ctx.add_engine(...)
    loop:   metrics = method.train_step(ctx)     # one optimizer step; default = grad-accum x compute_loss
            method.eval_step(ctx, batch)         # periodic evaluation, returns {name: (sum, count)}
    checkpoints carry method.state_dict() / load_state_dict()

Methods with their own step structure (rollout buffers, PPO epochs, adversarial generator steps) override
``train_step``; methods with extra trainable models register them with ``ctx.add_engine`` so that they are
checkpointed and resumed with the student. Nothing in the engine knows about any particular method.

What ``ctx`` offers (see ``Trainer``): ``cfg``, ``opts``, ``tokenizer``, ``student`` (DeepSpeed engine; the HF
model is ``ctx.student.module``), ``teacher`` (callable inference engine or None), ``teacher_forward(**inputs)``
(no_grad, eval, timed), ``next_batch()`` (the next training micro-batch, on device), ``device``, ``rank``,
``world_size``, ``is_main``, ``grad_accum``, ``global_step``, ``student_step()`` (``student.step()`` that also records
the gradient norm), ``add_engine(name, model, ...)``, ``frozen(engine)`` (that engine's model as a frozen function,
for training one model through another), ``log_scalars({...})``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Optional

import torch


@dataclass
class NoOptions:
    pass


@dataclass
class DataBundle:
    train: Any  # a map-style dataset (len + __getitem__ -> dict of python lists / ints)
    eval: Any = None
    collate_fn: Optional[Callable] = None  # list of examples -> dict of tensors (dynamic padding)
    train_lengths: Optional[list[int]] = None  # token lengths for length-grouped batching
    info: dict = field(default_factory=dict)  # counts to report (skipped lines, truncated prompts ...)


class Method:
    """Base class for distillation methods."""

    name: ClassVar[str] = ""
    Options: ClassVar[type] = NoOptions
    needs_teacher: ClassVar[bool] = True
    # teacher and student tokenizers must be identical (logit / token-relation methods)
    requires_same_vocab: ClassVar[bool] = True

    def __init__(self, cfg, opts):
        self.cfg = cfg
        self.opts = opts

    # ---- building -------------------------------------------------------------------------------------
    def load_tokenizer(self, ctx):
        from ..models.loading import load_tokenizer

        src = self.cfg.tokenizer or self.cfg.student.name_or_path or self.cfg.teacher
        return load_tokenizer(src, trust_remote_code=self.cfg.trust_remote_code)

    def load_teacher(self, ctx) -> Optional[torch.nn.Module]:
        raise NotImplementedError

    def load_student(self, ctx, teacher: Optional[torch.nn.Module]) -> torch.nn.Module:
        raise NotImplementedError

    def build_data(self, ctx) -> DataBundle:
        raise NotImplementedError

    def setup(self, ctx) -> None:
        """Called once after the student and teacher engines exist."""

    # ---- training -------------------------------------------------------------------------------------
    def compute_loss(self, ctx, batch: dict) -> dict[str, torch.Tensor]:
        """Named, already-weighted loss terms for one micro-batch; the engine backpropagates their sum."""
        raise NotImplementedError

    def train_step(self, ctx) -> dict[str, float]:
        """One optimizer step of the student: ``ctx.grad_accum`` micro-batches through ``compute_loss``.

        Returns the mean of every loss term (and ``loss``, their sum) over the micro-batches, as floats.
        """
        totals: dict[str, float] = {}
        for _ in range(ctx.grad_accum):
            batch = ctx.next_batch()
            terms = self.compute_loss(ctx, batch)
            loss = sum(terms.values())
            ctx.student.backward(loss)
            ctx.student_step()
            for k, v in terms.items():
                totals[k] = totals.get(k, 0.0) + float(v.detach()) / ctx.grad_accum
            totals["loss"] = totals.get("loss", 0.0) + float(loss.detach()) / ctx.grad_accum
        return totals

    @torch.no_grad()
    def eval_step(self, ctx, batch: dict) -> dict[str, tuple[float, float]]:
        """Evaluation metrics for one batch as ``{name: (sum, count)}``; the engine reduces across ranks."""
        terms = self.compute_loss(ctx, batch)
        return {f"{k}": (float(v), 1.0) for k, v in terms.items()}

    # ---- state ----------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """This rank's method state that a checkpoint must carry for exact resume (buffers, counters); called on
        every rank and stored per rank."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def card_info(self) -> dict:
        """Extra lines for the exported model card."""
        return {}


_REGISTRY: dict[str, type[Method]] = {}


def register(name: str):
    def deco(cls: type[Method]) -> type[Method]:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise RuntimeError(f"method '{name}' registered twice")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return deco
