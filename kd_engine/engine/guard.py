"""Non-finite guard: a step whose loss or gradients are not finite does not update the model.

ZeRO 1-3 optimizers already refuse such a step (they check the gradient norm and skip, counting it in
``engine.skipped_steps``); at ZeRO-0 the engine's optimizer is a plain torch one, so ``prepare_step`` does the same
by hand before ``engine.step()``: that one ``optimizer.step`` call does nothing (no weight, moment or weight-decay
change) and the optimizer's ``overflow`` flag makes DeepSpeed count the step as skipped and hold the learning-rate
schedule, as ZeRO 1-3 do; DeepSpeed then zeroes the gradients as after any step. Gradients are all-reduced
before the check, so every rank decides the same.

``after_step`` counts consecutive skips; the trainer stops the run after ``limit`` of them. ``all_finite`` checks
weights before anything is saved or exported.
"""
from __future__ import annotations

import logging
import os

import torch

logger = logging.getLogger("kd_engine")


class NonFiniteGuard:
    def __init__(self, limit: int):
        self.limit = int(limit)
        self.consecutive = 0
        self.total = 0
        self._skipped_seen: dict[int, int] = {}
        self._armed: list = []

    def prepare_step(self, engine, grad_norm) -> None:
        """Call right before ``engine.step()``; ``grad_norm`` is the ZeRO-0 gradient norm (None elsewhere)."""
        if grad_norm is None or engine.zero_optimization_stage() != 0 or not engine.is_gradient_accumulation_boundary():
            return
        if torch.isfinite(torch.as_tensor(grad_norm)):
            return
        opt = engine.optimizer
        self._armed.append((opt, opt.__dict__.get("step")))
        opt.step = _no_update  # this one call only: no weight or moment changes (restored in after_step)
        opt.overflow = True  # DeepSpeed then counts the step as skipped and holds the learning-rate schedule

    def after_step(self, engine, step: int, loss: float, save=None, output_dir: str = "") -> bool:
        """Call once per optimizer step; True when that step was skipped (the model did not change). After ``limit``
        skips in a row: ``save()`` (the last good state: skipped steps changed no weight), then raise KDError."""
        for opt, step_attr in self._armed:
            opt.overflow = False
            if step_attr is None:
                del opt.step
            else:
                opt.step = step_attr
        self._armed = []
        seen = self._skipped_seen.get(id(engine), 0)
        skipped = engine.skipped_steps > seen
        self._skipped_seen[id(engine)] = engine.skipped_steps
        if not skipped:
            self.consecutive = 0
            return False
        self.consecutive += 1
        self.total += 1
        if os.environ.get("RANK", "0") == "0":
            logger.warning("step %d: non-finite loss or gradients (loss %s): update skipped (%d in a row, %d in all; "
                           "the run stops after %d in a row)", step, loss, self.consecutive, self.total, self.limit)
        if self.exhausted():
            if save is not None:
                save()
            raise self.stop_error(step, output_dir)
        return True

    def exhausted(self) -> bool:
        return self.consecutive >= self.limit

    def stop_error(self, step: int, output_dir: str):
        from ..errors import KDError
        from .checkpoint import latest_checkpoint

        last = latest_checkpoint(output_dir)
        return KDError(f"{self.consecutive} consecutive steps (up to step {step}) had a non-finite loss or gradients "
                       f"and were skipped: stopped. The last good state is saved in {last[1] if last else '(none)'}; "
                       "lower the learning rate or check the data, then --resume")

    def check_weights(self, engines, output_dir: str, step: int) -> None:
        """Before any save or export: KDError if a weight is not finite (a NaN checkpoint never rotates good ones
        out, a NaN model is never exported)."""
        from ..errors import KDError
        from .checkpoint import latest_checkpoint

        if not all_finite(engines):
            last = latest_checkpoint(output_dir)
            raise KDError(f"the weights are not finite at step {step}: nothing saved or exported; the last good "
                          f"checkpoint is {last[1] if last else '(none)'}")

    def reset_baseline(self, engine) -> None:
        """After a resume: DeepSpeed restores ``skipped_steps`` from the checkpoint."""
        self._skipped_seen[id(engine)] = engine.skipped_steps


def _no_update(*args, **kwargs):
    return None


def all_finite(engines) -> bool:
    """Whether every weight of every engine is finite, on every rank (ZeRO-3: this rank's partitions)."""
    import torch.distributed as dist

    engines = list(engines)
    ok = True
    for engine in engines:
        for p in engine.module.parameters():
            t = getattr(p, "ds_tensor", None)
            t = p.data if t is None else t
            if t.numel() and not bool(torch.isfinite(t).all()):
                ok = False
                break
    flag = torch.tensor([1.0 if ok else 0.0], device=getattr(engines[0], "device", "cpu") if engines else "cpu")
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item() > 0)
