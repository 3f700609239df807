"""A teacher split over N ranks with tensor parallelism (``--teacher_tp N``), through transformers' own ``tp_plan``.

Ranks form consecutive groups of N (``0..N-1``, ``N..2N-1``, ...); each group holds one copy of the teacher, its
attention and MLP projections sharded column- / row-wise as the model's ``base_model_tp_plan`` says, its output
layer gathering the full vocabulary, loaded by transformers' tensor-parallel loading (each rank keeps 1/N of the
projection weights), so that a teacher about N times larger than one device fits.

transformers builds its device mesh over the whole world; a TP group smaller than the world needs a mesh of
``(world / N) x N`` ranks. The one seam used for that is the model class's ``prepare_distribute_model`` classmethod
(which returns the mesh): a subclass returns ours. Everything else — plans, sharded loading, the forward hooks —
is transformers' code.

Why not DeepSpeed's AutoTP (``deepspeed.init_inference(tensor_parallel=...)``): on this CPU (gloo) both ranks die
with SIGSEGV on the first forward, and it loads the whole model on every rank before sharding it
(../shared/docs/deepspeed-on-cpu.md). transformers' plan gives logits equal to the unsplit model's within 1e-7 here.

Each rank of a group brings its own micro-batch: ``TensorParallelTeacher.forward`` runs the group's N micro-batches
one after another (every rank of the group takes part in each forward, as tensor parallelism requires) and returns
this rank's output. Teacher compute per rank is unchanged; its memory is 1/N.
"""
from __future__ import annotations

import logging
import os
from typing import Any

import torch

from ..errors import ConfigError, KDError
from ..input_files import reading

logger = logging.getLogger(__name__)

TASK_MAPPINGS = {"causal_lm": "MODEL_FOR_CAUSAL_LM_MAPPING", "seq2seq_lm": "MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING",
                 "sequence_classification": "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING"}


def t5_tp_plan(config) -> dict[str, str]:
    """A tensor-parallel plan for T5 / Flan-T5 / mT5 (transformers ships none): q, k, v and the first FFN layer(s)
    column-wise, o and the last FFN layer row-wise, in the encoder's and decoder's self-attention, the decoder's
    cross-attention and both FFNs; the untied output layer gathering the vocabulary. ``fix_t5_heads`` then gives
    each rank's attention its share of the heads (T5 counts them in the module, and its relative position bias has
    one column per head)."""
    # names as transformers matches them: every layer number is a wildcard
    attn = {f"{p}.{x}": ("rowwise" if x == "o" else "colwise") for p in (
        "encoder.block.*.layer.*.SelfAttention", "decoder.block.*.layer.*.SelfAttention",
        "decoder.block.*.layer.*.EncDecAttention") for x in ("q", "k", "v", "o")}
    ins = ("wi_0", "wi_1") if getattr(config, "is_gated_act", False) else ("wi",)
    stacks = ("encoder.block.*.layer.*", "decoder.block.*.layer.*")
    ffn = {f"{p}.DenseReluDense.{x}": "colwise" for p in stacks for x in ins}
    ffn.update({f"{p}.DenseReluDense.wo": "rowwise" for p in stacks})
    head = {} if getattr(config, "tie_word_embeddings", True) else {"lm_head": "colwise_gather_output"}
    return {**attn, **ffn, **head}


def fix_t5_heads(model: torch.nn.Module, tp: int, rank_in_group: int) -> None:
    """Each T5 attention module keeps its rank's heads: the head count it reshapes by and its bias columns."""
    for module in model.modules():
        if type(module).__name__ != "T5Attention":
            continue
        local = module.n_heads // tp
        module.n_heads, module.inner_dim = local, local * module.key_value_proj_dim
        if module.has_relative_attention_bias:
            emb = module.relative_attention_bias
            cols = emb.weight.detach()[:, rank_in_group * local:(rank_in_group + 1) * local].clone()
            emb.weight = torch.nn.Parameter(cols, requires_grad=False)
            emb.embedding_dim = local


def plan_for(config):
    """(tp_plan for DistributedConfig, fix-up after loading) for a config, or (None, None) without a plan."""
    if getattr(config, "model_type", None) in ("t5", "mt5"):
        return t5_tp_plan(config), fix_t5_heads
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return ("auto", None) if getattr(text, "base_model_tp_plan", None) else (None, None)


def tp_group_ranks(world: int, tp: int) -> list[list[int]]:
    """The teacher groups: consecutive ranks, ``tp`` per group."""
    return [list(range(g * tp, (g + 1) * tp)) for g in range(world // tp)]


def check_tp_request(config, tp: int, world: int, name: str) -> None:
    """ConfigError unless a model with ``config`` can be split over ``tp`` of ``world`` ranks."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    if plan_for(config)[0] is None:
        raise ConfigError(f"--teacher_tp: teacher {name} ({text.model_type}) has no tensor-parallel plan (in "
                          f"transformers, or kd_engine's for T5); split it with ZeRO-3 instead (a ZeRO-3 DeepSpeed "
                          f"JSON, --teacher_tp 1)")
    if world % tp:
        raise ConfigError(f"--teacher_tp {tp} does not divide the world size {world}: every rank belongs to one "
                          f"teacher group of {tp} ranks")
    for key in ("num_attention_heads", "num_key_value_heads", "num_heads"):
        heads = getattr(text, key, None)
        if heads is not None and heads % tp:
            raise ConfigError(f"--teacher_tp {tp} does not divide the teacher's {key} ({heads})")


def _accelerator_device() -> torch.device:
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        return torch.device("cuda", local)
    return torch.device("cpu")


def _mesh_manager(tp: int, device: torch.device):
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from transformers.distributed.utils import TransformersDeviceMesh

    world = dist.get_world_size()
    groups = world // tp
    dense = init_device_mesh(device.type, (1, groups, 1, tp), mesh_dim_names=("pp", "dp_replicate", "fsdp", "tp"))
    expert = init_device_mesh(device.type, (1, groups, tp, 1), mesh_dim_names=("pp", "dp_replicate", "efsdp", "ep"))
    return TransformersDeviceMesh(dense, expert), dense["tp"]


def load_tp_model(name_or_path: str, task: str, tp: int, *, dtype: Any = None, trust_remote_code: bool = False):
    """The teacher of ``name_or_path`` sharded over this rank's group of ``tp`` ranks -> TensorParallelTeacher."""
    import torch.distributed as dist
    import transformers
    from transformers.distributed import DistributedConfig

    from .loading import load_config, resolve

    config = load_config(name_or_path, trust_remote_code)
    check_tp_request(config, tp, dist.get_world_size() if dist.is_initialized() else 1, name_or_path)
    if not dist.is_initialized():
        raise KDError("--teacher_tp needs torch.distributed (start with torchrun, deepspeed, mpirun or srun)")
    mapping = getattr(transformers, TASK_MAPPINGS[task])
    if type(config) not in mapping:
        raise ConfigError(f"--teacher_tp: teacher {name_or_path} ({type(config).__name__}) has no {task} class")
    base = mapping[type(config)]
    device = _accelerator_device()
    mesh_manager, tp_mesh = _mesh_manager(tp, device)

    class Grouped(base):  # the seam: transformers asks the class for the mesh; a TP group is one row of ours
        @classmethod
        def prepare_distribute_model(cls, distributed_config, device_map=None):
            return distributed_config, device, mesh_manager

    Grouped.__name__ = Grouped.__qualname__ = base.__name__
    plan, fix = plan_for(config)
    with reading("model", name_or_path):
        model = Grouped.from_pretrained(resolve(name_or_path), dtype=dtype, trust_remote_code=trust_remote_code,
                                        distributed_config=DistributedConfig(tp_size=tp, tp_plan=plan))
    model.__class__ = base  # the seam served its purpose: a student built from this model gets the real class
    rank = dist.get_rank()
    if fix is not None:
        fix(model, tp, rank % tp)
    ranks = tp_group_ranks(dist.get_world_size(), tp)[rank // tp]
    return TensorParallelTeacher(model, tp_mesh.get_group(), ranks)


class TensorParallelTeacher(torch.nn.Module):
    """One teacher copy spread over the ranks of a group; ``forward`` serves every rank's own micro-batch."""

    def __init__(self, model: torch.nn.Module, group, ranks: list[int]):
        super().__init__()
        self.module = model
        self.group, self.ranks = group, ranks

    def __getattr__(self, name: str):  # config, get_output_embeddings, set_attn_implementation: the model's own
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["module"], name)

    def forward(self, **inputs):
        import torch.distributed as dist

        tensors = {k: v for k, v in inputs.items() if torch.is_tensor(v)}
        others = {k: v for k, v in inputs.items() if not torch.is_tensor(v)}
        keys = sorted(tensors)  # every rank's collator gives the same keys, dtypes and ranks of tensors
        device = tensors[keys[0]].device if keys else _accelerator_device()
        own = torch.tensor([d for k in keys for d in tensors[k].shape], dtype=torch.int64, device=device)
        shapes = [torch.empty_like(own) for _ in self.ranks]
        dist.all_gather(shapes, own, group=self.group)  # the group's batch shapes, one small collective
        me, mine = dist.get_rank(), None
        for src, flat in zip(self.ranks, shapes):
            dims = iter(flat.tolist())
            batch = tensors if src == me else {k: torch.empty([next(dims) for _ in range(tensors[k].dim())],
                                                              dtype=tensors[k].dtype, device=device) for k in keys}
            for k in sorted(batch):
                t = batch[k]
                wire = t.to(torch.uint8) if t.dtype == torch.bool else t.contiguous()  # gloo has no bool
                dist.broadcast(wire, src=src, group=self.group)
                batch[k] = wire.to(torch.bool) if t.dtype == torch.bool else wire
            out = self.module(**batch, **others)
            if src == me:
                mine = out
            del out, batch  # another rank's logits: gone before the next forward
        return mine
