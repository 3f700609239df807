"""The method plugin interface.

A method is one file in ``kd_engine/methods/`` with one ``Method`` subclass decorated by ``@register("name")``.
It declares its options (a dataclass, ``Options``), builds/accepts teacher, student and data, and returns named
loss terms; the engine sums them, backpropagates through the student's DeepSpeed engine, steps, logs, evaluates and
checkpoints. Every hook gets ``ctx``, a ``kd_engine.engine.context.Context`` (its docstring lists the members).

Hooks, in the order the trainer calls them on every rank::

    tok     = method.load_tokenizer(ctx)
    teacher = method.load_teacher(ctx)           # nn.Module or None (needs_teacher = False)
    student = method.load_student(ctx, teacher)  # nn.Module (not yet wrapped)
    data    = method.build_data(ctx)             # DataBundle
    ... trainer wraps the student (deepspeed.initialize) and the teacher (its own inference engine) ...
    method.setup(ctx)                            # optional: extra engines via ctx.add_engine(...)
    loop:   metrics = method.train_step(ctx)     # one optimizer step; default = ctx.accumulate(compute_loss)
            method.eval_step(ctx, batch)         # periodic evaluation, returns {name: (sum, count)}
    checkpoints carry method.state_dict() / load_state_dict()

Methods with their own step structure (rollout buffers, PPO epochs, adversarial generator steps) override
``train_step``; methods with extra trainable models register them with ``ctx.add_engine`` so that they are
checkpointed and resumed with the student. Nothing in the engine knows about any particular method: a method that
reports a language-model loss names its metric in ``lm_loss_key`` and the engine derives ``perplexity`` from it
(and ``teacher_perplexity`` from ``teacher_<key>``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Optional

import torch

from ..data.bundle import DataBundle  # noqa: F401  (plugins import it from here)
from ..data.split import DATA_OPTIONS


@dataclass
class NoOptions:
    pass


class Method:
    """Base class for distillation methods."""

    name: ClassVar[str] = ""
    Options: ClassVar[type] = NoOptions
    needs_teacher: ClassVar[bool] = True
    # teacher and student tokenizers must be identical (logit / token-relation methods)
    requires_same_vocab: ClassVar[bool] = True
    # the evaluation metric that is a mean token cross-entropy: the engine reports exp(it) as perplexity
    lm_loss_key: ClassVar[Optional[str]] = None
    # how a student built from the teacher is initialised unless --student.init says otherwise
    default_student_init: ClassVar[str] = "teacher_layers"
    # the data options this method's build_data honours, by the rule of kd_engine/data/split.py (split_rows);
    # using any other one is a configuration error, never silently ignored
    data_options: ClassVar[tuple[str, ...]] = DATA_OPTIONS
    # --packing (several examples per row) works with this method's causal-LM data; methods that generate from or
    # keep per-example state for each row (gkd, minillm, zero_shot, ...) leave it False and refuse the option
    supports_packing: ClassVar[bool] = False
    # --messages_column (chat rows rendered with the chat template) is read by this method's data
    supports_messages: ClassVar[bool] = False
    # --teacher_tp N: the method only calls ctx.teacher_forward (no teacher generation, hooks or output layer),
    # which a teacher split over a group of ranks serves collectively (models/tensor_parallel.py)
    supports_teacher_tp: ClassVar[bool] = False
    # --teacher_ranks N: the method's loss needs only the teacher's sparse rows (top-k + tail, the offline cache's
    # format) of the student's own batches, which a teacher group serves (engine/teacher_service.py)
    supports_teacher_service: ClassVar[bool] = False
    served_kind: ClassVar[str] = "rows"  # what served_outputs() gives by default

    def served_outputs(self) -> Optional[str]:
        """With --teacher_ranks, what the teacher group answers: "rows" (sparse, the offline cache's format) or
        "hidden" (the hidden states entering its output layer, engine/served_teacher.py); None without one."""
        return self.served_kind if self.cfg.teacher_ranks > 0 else None

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
        """One optimizer step of the student: the accumulation micro-batches through ``compute_loss``.

        Returns the mean of every loss term (and ``loss``, their sum) over the micro-batches, as floats.
        """
        return ctx.accumulate(lambda: self.compute_loss(ctx, ctx.next_batch()))

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

    def reshard_refusal(self, states: list[dict]) -> Optional[str]:
        """A resume on another world size gives rank r the saved rank r's state (new ranks none, extra saved ranks'
        states are dropped). Given every saved rank's ``state_dict()``, return why that would be wrong (the
        error's end), or None when it is fine (the default: no per-rank state that matters)."""
        return None

    def card_info(self) -> dict:
        """Extra lines for the exported model card."""
        return {}


SERVICE_GAPS = {  # what each method needs of its teacher that served rows and hidden states do not carry
    "seqkd": "teacher generation (responses decoded by the teacher)",
    "minilmv2": "the teacher's attention relations (Q/K/V of a layer)",
    "sft": "no teacher at all (supervised fine-tuning)",
    "mate_kd": "dense teacher logits backpropagated into the generator",
    "zero_shot": "the NLI teacher's entailment scores",
    "xtoken_kd": "dense teacher logits in the teacher's own vocabulary",
    "uld": "dense teacher logits in the teacher's own vocabulary",
}


def check_capabilities(train, method_cls: type[Method]) -> None:
    """ConfigError when an engine option asks for something the method cannot do."""
    from ..errors import ConfigError

    name = method_cls.name
    if train.packing and not method_cls.supports_packing:
        raise ConfigError(f"--packing: method '{name}' needs one example per row (it generates from, or keeps "
                          f"state for, each row); packing works with kd, sft and seqkd on causal LMs")
    if train.messages_column and not method_cls.supports_messages:
        raise ConfigError(f"--messages_column: method '{name}' does not read chat data (methods that do: kd, "
                          f"sft, seqkd, gkd, minillm)")
    if train.teacher_tp > 1 and not method_cls.supports_teacher_tp:
        raise ConfigError(f"--teacher_tp: method '{name}' uses its teacher beyond forward passes (generation, "
                          f"hooks on its layers, or no teacher at all); a tensor-parallel teacher serves kd and gkd")
    if train.teacher_ranks > 0 and not method_cls.supports_teacher_service:
        raise ConfigError(f"--teacher_ranks: method '{name}' needs more of the teacher than the service sends (sparse "
                          f"top-k rows, or final hidden states, of the student's batches): "
                          f"{SERVICE_GAPS.get(name, 'dense logits, hidden states, attention or generation')}; the "
                          f"teacher service serves kd, gkd and minillm")
    if train.teacher_ranks > 0 and not train.student.name_or_path:
        raise ConfigError("--teacher_ranks: the student ranks never hold the teacher, so a student cannot be built "
                          "from it there; build it once (python -m kd_engine.shrink) and pass --student")
    if train.teacher_tp > 1 and not train.student.name_or_path and train.student.init == "teacher_layers":
        raise ConfigError("--teacher_tp: copying teacher layers into a student needs the teacher whole on one rank; "
                          "build the student once (python -m kd_engine.shrink) and pass --student, or use "
                          "--student.init random")


_REGISTRY: dict[str, type[Method]] = {}


def register(name: str):
    def deco(cls: type[Method]) -> type[Method]:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise RuntimeError(f"method '{name}' registered twice")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return deco
