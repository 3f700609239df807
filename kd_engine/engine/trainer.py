"""The engine: builds the student's DeepSpeed engine and the teacher's inference engine, runs a method's steps,
logs, evaluates, checkpoints (with exact resume) and exports. It knows nothing about any particular method.

Control flow, top to bottom: ``Trainer(parsed).fit()`` -> ``_setup()`` -> ``_resume()`` -> loop of
``method.train_step(ctx)`` -> ``_finish()``. Methods see the engine only through ``ctx``, a ``Context``
(``kd_engine/engine/context.py``); the trainer keeps timing, counters and logging to itself.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import time
from typing import Any, Optional

import torch

from .. import dist
from ..batch_geometry import resolve_batch_geometry
from ..config import ParsedConfig, to_dict
from ..data.collate import to_device
from ..data.sampler import ResumableBatchSampler, infinite_batches
from ..ds_config import DEFAULT_DS_CONFIG, client_lr_scheduler, load_ds_config, resolve_ds_config, \
    skip_single_rank_allreduce, teacher_ds_config, training_dtype, zero_stage
from ..errors import KDError
from ..models.attention import apply_model_options
from ..models.loading import check_teacher_tokenizer
from ..models.modes import eval_mode, frozen_parameters
from . import autoresume, checkpoint, faults, reshard, signals, teacher_client
from .context import Compute, Context
from .export import count_params, export_student
from .guard import NonFiniteGuard
from .monitor import Monitor, perplexities  # noqa: F401  (perplexities: importable from here as before)
from .runlock import take_on_rank0
from .teacher import build_teacher_engine, placement

logger = logging.getLogger("kd_engine")


class Trainer:
    def __init__(self, parsed: ParsedConfig):
        self.cfg = parsed.train
        self.opts = parsed.method_options
        self.method = parsed.method_cls(self.cfg, self.opts)
        self.explicit = dict(getattr(parsed, "explicit", {}) or {})  # engine keys the user set, and where
        self.ctx = Context(self)  # what the method sees of the engine
        self.engines: dict[str, Any] = {}  # name -> DeepSpeed engine, checkpointed together
        self.teacher = None  # callable inference engine
        self.teacher_model: Optional[torch.nn.Module] = None  # the underlying HF module (hooks, generation)
        self.student = self.tokenizer = None
        self.global_step = 0
        self.teacher_seconds = 0.0
        self.served = None  # --teacher_ranks: the teacher service's client (engine/teacher_client.py)
        self.tokens_seen = self.samples_seen = 0
        self.final_metrics: dict[str, float] = {}
        self.guard = NonFiniteGuard(self.cfg.max_nonfinite_steps)
        self._shown: Optional[dict] = None  # what the progress bar shows: the last logged loss

    # ---- services offered to methods (through Context) ---------------------------------------------------
    @property
    def grad_accum(self) -> int:
        return self.cfg.gradient_accumulation_steps

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @contextlib.contextmanager
    def teacher_block(self, grad: bool = False):
        """The teacher module for a block of teacher-only work, timed as teacher time. Without ``grad`` it runs under
        ``torch.inference_mode`` (no autograd records, no version counters; its outputs may enter the student's loss,
        where every loss here derives new tensors from them instead of saving them for backward). With ``grad``
        (MATE-KD's generator step) gradients reach the inputs' sources through its activations, never its frozen
        parameters."""
        if self.teacher_model is None:
            raise RuntimeError(f"method '{self.method.name}' has no teacher engine (needs_teacher = False)")
        t0 = time.perf_counter()
        try:
            with contextlib.nullcontext() if grad else torch.inference_mode():
                yield self.teacher_model
        finally:
            self.teacher_seconds += time.perf_counter() - t0

    def teacher_forward(self, grad: bool = False, **inputs):
        """The teacher's forward pass: eval mode, timed; no autograd unless ``grad``. With ``grad`` it calls the
        module itself (ZeRO-3's parameter hooks live on the module): the inference engine's forward wrapper refuses
        a backward it did not run ('Direct calls to tensor.backward() are not supported')."""
        if self.teacher is None:
            raise RuntimeError(f"method '{self.method.name}' has no teacher engine (needs_teacher = False)")
        with self.teacher_block(grad) as module:
            return (module if grad else self.teacher)(**inputs)

    def accumulate(self, compute: Compute, engine=None) -> dict[str, float]:
        """One optimizer step of ``engine`` (default the student) over ``gradient_accumulation_steps`` micro-batches:
        ``compute()`` -> loss terms (or ``(terms, stats)``), backward of their sum, ``step()``. Returns the mean of
        every term and stat, and ``loss``, as floats or 0-d tensors (no host sync per step; converted when logged)."""
        engine = self.student if engine is None else engine
        n = self.grad_accum
        totals: dict[str, float] = {}
        for _ in range(n):
            out = compute()
            terms, stats = out if isinstance(out, tuple) else (out, {})
            loss = faults.poison_loss(sum(terms.values()), self.global_step + 1)
            engine.backward(loss)
            if engine is self.student:
                self.student_step()
            else:
                engine.step()
            for k, v in {**terms, **stats, "loss": loss}.items():
                totals[k] = totals.get(k, 0.0) + (v.detach() if torch.is_tensor(v) else v) / n
        return totals

    def next_batch(self) -> dict[str, torch.Tensor]:
        idx = next(self._batch_iter)
        batch = self.served.take(idx) if self.served else self.collate(self.data.train, idx)
        mask = batch.get("attention_mask", batch.get("token_mask"))  # token_mask: packed rows (no attention mask)
        if mask is not None:
            self.tokens_seen += int(mask.sum())
        self.samples_seen += len(idx)
        return to_device(batch, self.device)

    def collate(self, dataset, idx: list[int]) -> dict:
        if hasattr(dataset, "column_names"):  # datasets.Dataset: one batched read
            cols = dataset[idx]
            rows = [{k: cols[k][j] for k in cols} for j in range(len(idx))]
        else:
            rows = [dataset[i] for i in idx]
        return self.data.collate_fn(rows)

    def student_step(self) -> None:
        """``student.step()``, recording this step's lr and, on logged ZeRO-0 fp32 steps, the gradient norm."""
        eng = self.student
        if eng.is_gradient_accumulation_boundary():
            self._step_lr = eng.get_lr()
            if eng.zero_optimization_stage() == 0 and self.student_dtype == "fp32":
                # every step: the non-finite guard needs it (ZeRO 1-3 and bf16 check overflow themselves); logged too
                grads = [p.grad for p in eng.module.parameters() if p.grad is not None]
                self._grad_norm = float(torch.nn.utils.get_total_norm(grads)) if grads else 0.0
                self.guard.prepare_step(eng, self._grad_norm)  # non-finite: no update
        eng.step()

    def grad_norm(self) -> Optional[float]:
        gn = self.student.get_global_grad_norm()
        return float(gn) if gn is not None else getattr(self, "_grad_norm", None)

    def add_engine(self, name: str, model: torch.nn.Module, ds_overrides: Optional[dict] = None,
                   optimizer=None, lr_scheduler=None):
        """Wrap an extra trainable model (e.g. MATE-KD's generator) in its own DeepSpeed engine, checkpointed and
        resumed with the student. ``ds_overrides`` update a copy of the student's DeepSpeed config."""
        import copy

        import deepspeed

        if name in self.engines:
            raise RuntimeError(f"engine '{name}' already exists")
        ds = {**copy.deepcopy(self.ds_config), **(ds_overrides or {})}
        ds.pop("tensorboard", None)
        if optimizer is not None:
            ds.pop("optimizer", None)
        if lr_scheduler is not None:
            ds.pop("scheduler", None)
        engine, *_ = deepspeed.initialize(model=model, model_parameters=[p for p in model.parameters()
                                                                         if p.requires_grad],
                                          optimizer=optimizer, lr_scheduler=lr_scheduler, config=ds)
        self.engines[name] = skip_single_rank_allreduce(engine, self.world_size)
        return engine

    def frozen(self, engine):
        """The engine's model as a frozen function: gradients flow through its activations (e.g. to a generator's
        output) but none reach its parameters, and its engine's backward hooks stay out of the other engine's
        backward. Use it for steps that train one model through another (MATE-KD's generator step)."""
        return frozen_parameters(engine.module)

    def log_scalars(self, values: dict[str, float], prefix: str = "train") -> None:
        self.monitor.scalars(self.global_step, values, prefix)

    # ---- setup ------------------------------------------------------------------------------------------
    def _setup(self) -> None:
        import deepspeed
        from transformers import set_seed

        cfg = self.cfg
        self.rank, self.world_size, self.local_rank = dist.init_distributed(cfg.dist_timeout)
        self.device = dist.device()
        on_cpu = self.device.type == "cpu"
        set_seed(cfg.seed)
        # batch geometry first: everything below (sampler, step count, DeepSpeed config) follows from it
        ds_raw = load_ds_config(cfg.deepspeed or DEFAULT_DS_CONFIG)
        resuming = cfg.resume in (True, "true", "auto") and os.path.isdir(cfg.output_dir)
        latest = checkpoint.latest_checkpoint(cfg.output_dir) if resuming else None
        reshard.adapt_accumulation(cfg, self.world_size, latest)  # --resume on another world size: same global batch
        self.geometry = resolve_batch_geometry(cfg, ds_raw, self.world_size, cfg.deepspeed or DEFAULT_DS_CONFIG,
                                               self.explicit)

        # decide about the output folder on every rank before anything is written
        self.run_mode = autoresume.run_mode(cfg)  # --resume false|true|auto
        if self.run_mode == "resume":  # per-rank method state on another world size: carried or refused
            latest = latest or checkpoint.latest_checkpoint(cfg.output_dir)
            reshard.check_method_state(self.method, latest[1], self.world_size)
        dist.barrier()

        ctx = self.ctx
        self.tokenizer = self.method.load_tokenizer(ctx)
        teacher = self.method.load_teacher(ctx) if self.method.needs_teacher else None
        if self.method.needs_teacher and teacher is None:
            raise KDError(f"method '{self.method.name}' needs a teacher: pass --teacher PATH_OR_ID")
        student = self.method.load_student(ctx, teacher)
        self.student_use_cache = apply_model_options(cfg, teacher, student)  # attention, checkpointing
        if teacher is not None and self.method.requires_same_vocab:
            check_teacher_tokenizer(cfg, self.tokenizer, teacher, student)
        self.data = self.method.build_data(ctx)
        if self.data.train is None or len(self.data.train) == 0:
            raise KDError("the training data is empty")

        geo = self.geometry
        self.sampler = ResumableBatchSampler(
            len(self.data.train), geo.micro, rank=self.rank, world_size=self.world_size,
            seed=cfg.seed, lengths=self.data.train_lengths, group_by_length=cfg.group_by_length and
            self.data.train_lengths is not None, drop_last=len(self.data.train) >= geo.micro * self.world_size)
        if len(self.sampler) == 0:
            raise KDError(f"{len(self.data.train)} training examples are fewer than one global batch")
        self.steps_per_epoch = steps_per_epoch = max(len(self.sampler) // geo.accumulation, 1)
        self.total_steps = cfg.max_steps if cfg.max_steps > 0 else math.ceil(cfg.num_train_epochs * steps_per_epoch)

        self.ds_config = resolve_ds_config(ds_raw, cfg, self.world_size, self.total_steps, on_cpu)
        self.student_dtype = training_dtype(self.ds_config)
        trainable = [p for p in student.parameters() if p.requires_grad]
        if not trainable:
            raise KDError("the student has no trainable parameters (everything frozen?)")
        # the first write, once models, data and configs passed: a rejected run changes nothing. Rank 0 takes the
        # folder's run lock first (two runs started into one folder: one trains, the other stops here)
        self.served = teacher_client.connect(self)  # a teacher group's start-up error stops every rank here
        self.runlock = take_on_rank0(cfg.output_dir, self.rank, dist.broadcast_object)
        checkpoint.prepare_output_dir(cfg.output_dir, self.run_mode, self.method.name, to_dict(cfg), self.rank)
        dist.barrier()
        faults.install_poison(student, lambda: self.global_step + 1)
        self.student, *_ = deepspeed.initialize(model=student, model_parameters=trainable, config=self.ds_config,
                                                lr_scheduler=client_lr_scheduler(self.ds_config, cfg, self.total_steps))
        self.engines["student"] = skip_single_rank_allreduce(self.student, self.world_size)
        if teacher is not None:
            t_dtype = self.student_dtype if cfg.teacher_dtype == "auto" else cfg.teacher_dtype
            self.teacher, self.teacher_model = build_teacher_engine(
                teacher, teacher_ds_config(self.ds_config, t_dtype), t_dtype, self.device)
        self.method.setup(ctx)
        dist.barrier()
        if self.is_main:
            logger.info("method %s | world size %d | ZeRO stage %d | %s | student %s params | teacher %s | "
                        "%d examples | %d steps of %d samples", self.method.name, self.world_size,
                        zero_stage(self.ds_config), self.student_dtype, f"{count_params(self.student.module):,}",
                        teacher_client.describe(self) if teacher is None else f"{count_params(teacher):,} params"
                        + placement(cfg, zero_stage(self.ds_config)),
                        len(self.data.train), self.total_steps, self.ds_config["train_batch_size"])

    def _resume(self) -> None:
        if self.run_mode != "resume":
            return
        step, path = checkpoint.latest_checkpoint(self.cfg.output_dir)
        state, rank_state = checkpoint.load(path, self.engines, self.rank, self.world_size, dist.barrier)
        if state.get("method_name", self.method.name) != self.method.name:
            raise KDError(f"{path} was written by method '{state['method_name']}', not '{self.method.name}'")
        self.global_step = int(state.get("global_step", step))
        self.sampler.load_state_dict(reshard.sampler_state(state["sampler"], self.world_size))
        self.tokens_seen = int(state.get("tokens_seen", 0))
        self.samples_seen = int(state.get("samples_seen", 0))
        self.method.load_state_dict(rank_state)
        self.guard.reset_baseline(self.student)
        Monitor.truncate_log(self.cfg.output_dir, state.get("log_bytes"), self.rank)  # drop the lost timeline's lines
        logger.info("resumed from %s at step %d", path, self.global_step)

    def _save(self) -> None:
        teacher_client.pause(self)  # a teacher group waits longer than --dist_timeout for what follows
        self.guard.check_weights(self.engines.values(), self.cfg.output_dir, self.global_step)  # no NaN ever saved
        state = {"global_step": self.global_step, "sampler": self.sampler.state_dict(),
                 "tokens_seen": self.tokens_seen, "samples_seen": self.samples_seen, "method_name": self.method.name,
                 "log_bytes": Monitor.log_size(self.cfg.output_dir)}
        checkpoint.save(self.cfg.output_dir, self.global_step, self.engines, state, self.rank, dist.barrier,
                        self.cfg.save_total_limit, self.method.state_dict(), dataclasses.asdict(self.geometry))

    # ---- evaluation -------------------------------------------------------------------------------------
    def evaluate(self) -> dict[str, float]:
        teacher_client.pause(self)
        if self.data.eval is None or len(self.data.eval) == 0:
            return {}
        n = len(self.data.eval)
        bs = self.cfg.per_device_eval_batch_size
        mine = list(range(self.rank, n, self.world_size))
        sums: dict[str, tuple[float, float]] = {}
        # every rank runs the same number of batches (collectives inside ZeRO-3 forwards must match)
        n_batches = math.ceil(math.ceil(n / self.world_size) / bs)
        with eval_mode(*[e.module for e in self.engines.values()]):
            for b in range(n_batches):
                idx = mine[b * bs:(b + 1) * bs]
                real = len(idx) > 0
                batch = to_device(self.collate(self.data.eval, idx if real else [0]), self.device)
                out = self.method.eval_step(self.ctx, batch)
                for k, (s, c) in out.items():
                    s0, c0 = sums.get(k, (0.0, 0.0))
                    sums[k] = (s0 + float(s), c0 + float(c)) if real else (s0, c0)
        sums = dist.all_reduce_sums(sums)
        metrics = {k: s / c for k, (s, c) in sums.items() if c > 0}
        metrics.update(perplexities(metrics, self.method.lm_loss_key))
        self.monitor.scalars(self.global_step, metrics, "eval")
        if self.is_main:
            logger.info("eval at step %d: %s", self.global_step,
                        ", ".join(f"{k}={v:.4g}" for k, v in metrics.items()))
        return metrics

    # ---- loop -------------------------------------------------------------------------------------------
    def fit(self) -> dict[str, float]:
        try:
            return self._fit()
        except signals.Stopped:
            teacher_client.finish(self, stopped=True)  # a teacher group stops too (and reports the stop)
            raise
        finally:
            if getattr(self, "runlock", None) is not None:
                self.runlock.release()
                self.runlock = None

    def _fit(self) -> dict[str, float]:
        self.stopper = signals.StopSignals(self.cfg.stop_signals)  # a stop signal acts at the next step boundary
        self._setup()
        self._resume()
        cfg = self.cfg
        self._batch_iter = infinite_batches(self.sampler)
        teacher_client.start(self)  # a teacher group's requests run ahead of the training batches
        self.monitor = Monitor(self.student, cfg.output_dir, self.rank, self.total_steps, self.global_step,
                               cfg.disable_tqdm)
        if cfg.eval_on_start and self.global_step == 0:
            self.initial_metrics = self.evaluate()
        window = {"t": time.perf_counter(), "teacher": 0.0, "tokens": self.tokens_seen,
                  "samples": self.samples_seen, "steps": 0}
        sums: dict[str, Any] = {}  # floats or 0-d tensors, summed without a host sync until the window is logged
        while self.global_step < self.total_steps:
            self.stopper.at_step_boundary(self)  # all ranks agree: checkpoint, requeue under SLURM, Stopped
            faults.at_step(self.global_step + 1, self.rank, self.student.module)
            t_teacher0 = self.teacher_seconds
            terms = self.method.train_step(self.ctx)
            self.global_step += 1
            window["teacher"] += self.teacher_seconds - t_teacher0
            window["steps"] += 1
            if self.guard.after_step(self.student, self.global_step, terms.get("loss"), self._save, cfg.output_dir):
                terms = {}  # skipped (non-finite, no update); max_nonfinite_steps in a row: saved, then raised
            for k, v in terms.items():
                sums[k] = sums.get(k, 0.0) + v
            if self.global_step % cfg.logging_steps == 0 or self.global_step == self.total_steps:
                self._log_window(window, sums)
                sums = {}
            self.monitor.progress(self.global_step, self._shown)
            if cfg.eval_steps > 0 and self.global_step % cfg.eval_steps == 0 and self.global_step < self.total_steps:
                self.evaluate()
            if cfg.save_steps > 0 and self.global_step % cfg.save_steps == 0 and self.global_step < self.total_steps:
                self._save()
        return self._finish()

    def _log_window(self, window: dict, sums: dict) -> None:
        now = time.perf_counter()
        steps = max(window["steps"], 1)
        elapsed = now - window["t"]
        values = {k: float(v) / steps for k, v in sums.items()}
        lr = getattr(self, "_step_lr", None) or self.student.get_lr()  # the step just taken, not the next one
        values["lr"] = float(lr[0]) if lr else 0.0
        values["skipped_steps"] = self.guard.total
        gn = self.grad_norm()
        if gn is not None:
            values["grad_norm"] = gn
        values["samples_per_s"] = (self.samples_seen - window["samples"]) * self.world_size / max(elapsed, 1e-9)
        values["tokens_per_s"] = (self.tokens_seen - window["tokens"]) * self.world_size / max(elapsed, 1e-9)
        values["teacher_ms"] = 1000.0 * window["teacher"] / steps
        values["student_ms"] = 1000.0 * (elapsed - window["teacher"]) / steps
        self.monitor.scalars(self.global_step, values, "train")
        self._shown = {"loss": values["loss"]} if "loss" in values else None
        window.update(t=now, teacher=0.0, tokens=self.tokens_seen, samples=self.samples_seen, steps=0)

    def _finish(self) -> dict[str, float]:
        cfg = self.cfg
        self._save()  # before evaluating: the checkpoint holds the training state as the last step left it
        metrics = self.evaluate()
        teacher_client.finish(self)  # after the final evaluation, which may still ask a teacher group
        self.final_metrics = metrics
        if cfg.export:
            card = {
                "title": f"{self.method.name} student", "method": self.method.name, "teacher": cfg.teacher,
                "student_init": cfg.student.name_or_path or f"built from the teacher ({cfg.student.init})",
                "student_params": count_params(self.student.module), "steps": self.global_step,
                "zero_stage": zero_stage(self.ds_config), "metrics": metrics,
                "extra": self.method.card_info(),
                "config": {"train": to_dict(cfg), "method": dataclasses.asdict(self.opts)},
            }
            if getattr(self, "initial_metrics", None):
                card["extra"].update({f"before training: {k}": f"{v:.6g}" for k, v in self.initial_metrics.items()})
            if getattr(self, "student_use_cache", None):  # the exported config generates with the KV cache
                self.student.module.config.use_cache = self.student_use_cache
            export_student(self.student, self.tokenizer, os.path.join(cfg.output_dir, "final"), self.rank,
                           dist.barrier, card)
        self.monitor.close()
        self.stopper.restore()
        return metrics
