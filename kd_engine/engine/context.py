"""What a method plugin sees of the engine: one small typed object, ``ctx``, passed to every hook.

The trainer builds one ``Context`` and keeps the bookkeeping (timing, counters, logging windows) to itself: a method
reads configuration, runs the teacher and the student through these calls, and returns loss terms. Members:

- ``cfg`` (``TrainConfig``), ``opts`` (the method's ``Options``), ``tokenizer``, ``device``, ``rank``,
  ``world_size``, ``is_main``, ``global_step`` (optimizer steps done so far), ``total_steps`` (global steps this
  run takes: methods whose steps alternate between models size each model's LR schedule from it).
- ``student``: the student's DeepSpeed engine (call it for the forward; the HF model is ``ctx.student.module``).
- ``next_batch()``: the next training micro-batch of this rank, collated and on ``device``.
- ``teacher_forward(**inputs, grad=False)``: the frozen teacher's forward, timed as teacher time. ``grad=True``
  keeps the autograd graph through the teacher's activations (gradients reach the inputs, e.g. a generator's
  output, never the teacher's parameters).
- ``teacher_module``: the teacher's underlying ``nn.Module`` (generation, Q/K/V hooks); ``teacher_hooks(grad=False)``
  is a context manager that yields it with the block timed as teacher time (and no autograd unless ``grad``).
- ``accumulate(compute, engine=None)``: one optimizer step of gradient accumulation: ``compute()`` is called once per
  micro-batch and returns ``{name: loss tensor}`` (or ``(terms, stats)``); their sum is backpropagated through the
  engine (default the student) and the engine steps. Returns every term and stat averaged over the micro-batches,
  plus ``loss`` (their sum), as floats.
- ``student_step()``: ``student.step()`` for methods that call ``student.backward`` themselves.
- ``add_engine(name, model, ds_overrides=None, optimizer=None, lr_scheduler=None)``: an extra trainable model in its
  own DeepSpeed engine, checkpointed and resumed with the student (call it in ``Method.setup``).
- ``frozen(engine)``: context manager yielding that engine's model with its parameters frozen (train one model
  through another).
- ``served_teacher``: with ``--teacher_ranks``, the client of the teacher group: ``lookup(keys, targets)`` gives the
  current micro-batch's sparse rows in the offline cache's format (``TeacherCache.lookup``); None otherwise. When
  the method serves hidden states (``Method.served_outputs``), ``teacher_forward`` / ``teacher_module`` are a
  stand-in (``engine/served_teacher.py``) that asks the group and applies the teacher's output layer.
- ``log_scalars(values, prefix="train")``: extra scalars to TensorBoard and the JSONL log at ``global_step``.
"""
from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any, Callable, Generic, Optional, Protocol, TypeVar, Union

import torch

if TYPE_CHECKING:  # pragma: no cover
    from ..config import TrainConfig

LossTerms = dict[str, torch.Tensor]
Compute = Callable[[], Union[LossTerms, tuple[LossTerms, dict[str, Any]]]]
T = TypeVar("T")


class EngineServices(Protocol):
    """What a ``Context`` needs of the engine behind it (the ``Trainer`` provides it; nothing here imports it)."""

    cfg: Any
    opts: Any
    tokenizer: Any
    device: torch.device
    rank: int
    world_size: int
    global_step: int
    total_steps: int
    student: Any
    teacher_model: Optional[torch.nn.Module]
    served: Any

    def teacher_forward(self, grad: bool = False, **inputs) -> Any: ...
    def teacher_block(self, grad: bool = False) -> contextlib.AbstractContextManager[torch.nn.Module]: ...
    def next_batch(self) -> dict[str, torch.Tensor]: ...
    def accumulate(self, compute: "Compute", engine: Any = None) -> dict[str, float]: ...
    def student_step(self) -> None: ...
    def add_engine(self, name: str, model: torch.nn.Module, ds_overrides: Optional[dict] = None, optimizer=None,
                   lr_scheduler=None) -> Any: ...
    def frozen(self, engine: Any) -> contextlib.AbstractContextManager[torch.nn.Module]: ...
    def log_scalars(self, values: dict[str, float], prefix: str = "train") -> None: ...


class _Read(Generic[T]):
    """A read-only member of ``Context``: the trainer's attribute ``attr`` (typed ``T``)."""

    def __init__(self, attr: str):
        self.attr = attr

    def __get__(self, ctx: Optional["Context"], owner: Any = None) -> T:
        if ctx is None:
            return self  # type: ignore[return-value]  (class access: the descriptor itself)
        return getattr(ctx._trainer, self.attr)


class Context:
    """The engine's services for a method (see the module docstring)."""

    __slots__ = ("_trainer",)

    def __init__(self, trainer: EngineServices):
        self._trainer = trainer

    # ---- configuration and placement (read-only) ---------------------------------------------------------
    cfg: _Read["TrainConfig"] = _Read("cfg")
    opts: _Read[Any] = _Read("opts")  # the method's Options dataclass instance
    tokenizer: _Read[Any] = _Read("tokenizer")
    device: _Read[torch.device] = _Read("device")
    rank: _Read[int] = _Read("rank")
    world_size: _Read[int] = _Read("world_size")
    global_step: _Read[int] = _Read("global_step")  # optimizer steps done so far
    total_steps: _Read[int] = _Read("total_steps")  # global steps this run takes (per-model LR schedules size from it)

    @property
    def is_main(self) -> bool:
        return self._trainer.rank == 0

    # ---- models ------------------------------------------------------------------------------------------
    student: _Read[Any] = _Read("student")  # the student's DeepSpeed engine
    teacher_module: _Read[Optional[torch.nn.Module]] = _Read("teacher_model")  # None without a teacher
    served_teacher: _Read[Any] = _Read("served")  # --teacher_ranks: the teacher service's client (sparse rows)

    def teacher_forward(self, grad: bool = False, **inputs) -> Any:
        return self._trainer.teacher_forward(grad=grad, **inputs)

    def teacher_hooks(self, grad: bool = False) -> contextlib.AbstractContextManager[torch.nn.Module]:
        return self._trainer.teacher_block(grad=grad)

    # ---- data and steps ----------------------------------------------------------------------------------
    def next_batch(self) -> dict[str, torch.Tensor]:
        return self._trainer.next_batch()

    def accumulate(self, compute: Compute, engine: Any = None) -> dict[str, float]:
        return self._trainer.accumulate(compute, engine)

    def student_step(self) -> None:
        self._trainer.student_step()

    def add_engine(self, name: str, model: torch.nn.Module, ds_overrides: Optional[dict] = None, optimizer=None,
                   lr_scheduler=None) -> Any:
        return self._trainer.add_engine(name, model, ds_overrides, optimizer=optimizer, lr_scheduler=lr_scheduler)

    def frozen(self, engine: Any) -> contextlib.AbstractContextManager[torch.nn.Module]:
        return self._trainer.frozen(engine)

    def log_scalars(self, values: dict[str, float], prefix: str = "train") -> None:
        self._trainer.log_scalars(values, prefix)
