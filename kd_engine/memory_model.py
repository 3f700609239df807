"""Per-device memory and teacher traffic of a distillation run, from model shapes: the planner's arithmetic
(``python -m kd_engine.plan``). Pure functions of numbers, no torch state.

Student model states (parameters, gradients, optimizer) come from DeepSpeed's own estimators for ZeRO-2 and ZeRO-3
(``estimate_zero{2,3}_model_states_mem_needs``), with the same accounting for stages 0 and 1: 16-bit training keeps
2 bytes of parameters, 2 of gradients, and 16 of fp32 master weights, fp32 gradients and Adam moments per
parameter; fp32 training (CPU) 4 + 4 + 8.

Activations of one decoder layer, per token, in elements: what autograd keeps for the backward of a Llama-style
layer, counted with ``torch.autograd.graph.saved_tensors_hooks`` on transformers' Llama (h = 512, i = 1376, 8 heads,
s = 128 and 512: exactly this; tests/test_plan.py counts it again): each RMSNorm's input, normalised value and
output (3 h, twice), q, k and v as the attention uses them and its output, the MLP's gate, up, activation and
product (4 i). Where the kernel materialises the attention probabilities (eager attention, or sdpa with a mask on
CPU) k and v are repeated to every head and the probabilities kept; sdpa / flash keep k and v at their KV width and
only a log-sum-exp:

    eager:  10 h + 4 i + heads * s          sdpa / flash:  8 h + 2 kv + 4 i

plus 3 h per token outside the layers (the final norm). The backward's working set (the gradients of one layer's
activations and autograd's temporaries) adds about two layers' worth: that figure is the one calibrated term,
chosen on benchmarks/plan_validation.py's measurements. With activation checkpointing each layer keeps only its
input (h), and one layer is recomputed whole. The loss: the fused KD loss works in chunks of ``chunk`` vocabulary
rows; the naive one holds the student's and teacher's full-vocabulary logits and their softmaxes (4 fp32 copies of
b x s x V). Limits: Llama-style decoder layers (GQA, gated MLP); encoder-decoder models are counted as their
layers in sum, cross-attention not separately; CPU allocator effects and DeepSpeed's communication buckets are not
modelled (measured error at three sizes on CPU: benchmarks/plan_validation.py).
"""
from __future__ import annotations

from dataclasses import dataclass

GIB = 1024 ** 3


@dataclass
class Shape:
    """What the formulas need of a model."""
    params: int
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    vocab: int
    largest_layer_params: int
    embedding_params: int = 0
    tensor_parallel: bool = True  # kd_engine can split it with --teacher_tp (a plan exists for its class)

    @property
    def kv_dim(self) -> int:
        return self.hidden * self.kv_heads // self.heads


def shape_of(config) -> Shape:
    """A Shape from a transformers config: parameters counted exactly on the meta device (no weights read)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    auto = AutoModelForSeq2SeqLM if getattr(config, "is_encoder_decoder", False) else AutoModelForCausalLM
    with torch.device("meta"):
        model = auto.from_config(config)
    params = sum(p.numel() for p in model.parameters())
    largest = max((sum(p.numel() for p in m.parameters()) for m in model.modules()
                   if type(m).__name__.endswith(("DecoderLayer", "Block", "Layer")) and m is not model), default=0)
    emb = model.get_input_embeddings()
    hidden = getattr(text, "hidden_size", None) or getattr(text, "d_model")
    heads = getattr(text, "num_attention_heads", None) or getattr(text, "num_heads")
    layers = getattr(text, "num_hidden_layers", None) or getattr(text, "num_layers")
    from .models.tensor_parallel import plan_for

    return Shape(params=params, layers=layers, hidden=hidden, tensor_parallel=plan_for(config)[0] is not None,
                 intermediate=getattr(text, "intermediate_size", None) or getattr(text, "d_ff", 4 * hidden),
                 heads=heads, kv_heads=getattr(text, "num_key_value_heads", None) or heads,
                 vocab=text.vocab_size, largest_layer_params=largest,
                 embedding_params=emb.weight.numel() if emb is not None else 0)


def student_states(shape: Shape, stage: int, devices: int, nodes: int = 1, dtype: str = "bf16",
                   offload: bool = False) -> int:
    """Bytes per device of the student's parameters, gradients and optimizer state."""
    p = shape.params
    if dtype == "fp32":  # params 4, grads 4, Adam 8; ZeRO partitions optimizer (1), + grads (2), + params (3)
        parts = {0: 16 * p, 1: 8 * p + 8 * p / devices, 2: 4 * p + 12 * p / devices, 3: 16 * p / devices}
        return int(parts[stage])
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    per_node = max(devices // nodes, 1)
    if stage == 3:
        return estimate_zero3_model_states_mem_needs(p, shape.largest_layer_params, per_node, nodes,
                                                     cpu_offload=offload, cpu_offload_params=offload)[1]
    if stage == 2:
        return estimate_zero2_model_states_mem_needs(p, per_node, nodes, cpu_offload=offload)[1]
    if stage == 1:  # gradients whole (16-bit), the rest partitioned
        return int(4 * p + 16 * p / devices)
    return 20 * p


def layer_activation_elements(shape: Shape, seq: int, materialised_attention: bool) -> int:
    """Elements one layer keeps per token for its backward (see the module docstring)."""
    if materialised_attention:  # k and v repeated to every head, and the probabilities
        return 10 * shape.hidden + 4 * shape.intermediate + shape.heads * seq
    return 8 * shape.hidden + 2 * shape.kv_dim + 4 * shape.intermediate


BACKWARD_LAYERS = 2  # the backward's working set, in layers' worth of activations (calibrated, see above)


def activations(shape: Shape, micro: int, seq: int, dtype_bytes: int, checkpointing: bool = False,
                materialised_attention: bool = False, fused_loss: bool = True, chunk: int = 4096,
                teacher_vocab: int | None = None) -> int:
    """Bytes of one micro-batch's training activations of the student, and its KD loss."""
    tokens = micro * seq
    layer = layer_activation_elements(shape, seq, materialised_attention)
    kept = shape.layers * shape.hidden + layer if checkpointing else shape.layers * layer
    body = tokens * (kept + BACKWARD_LAYERS * layer + 3 * shape.hidden) * dtype_bytes
    vocab = max(shape.vocab, teacher_vocab or 0)
    loss = tokens * min(vocab, chunk) * 4 * 4 if fused_loss else tokens * vocab * 4 * 4
    return int(body + loss)


def teacher_memory(shape: Shape, placement: str, devices: int, tp: int = 1, dtype_bytes: int = 2,
                   micro: int = 1, seq: int = 1, fused_loss: bool = True) -> int:
    """Bytes per (student) device of the frozen teacher: weights by placement, plus one layer's forward."""
    w = shape.params * dtype_bytes
    weights = {"replica": w, "zero3": w / devices + shape.largest_layer_params * dtype_bytes * 2,
               "tp": w / tp, "teacher_group": 0, "cache": 0}[placement]
    if placement in ("teacher_group", "cache"):
        return int(weights)
    tokens = micro * seq * (tp if placement == "tp" else 1)  # a TP group serves its ranks' micro-batches in turn
    logits = 0 if fused_loss else micro * seq * shape.vocab * 4
    return int(weights + tokens * (shape.hidden + shape.intermediate) * dtype_bytes * 2 + logits)


def teacher_traffic(shape: Shape, placement: str, devices: int, tp: int = 1, dtype_bytes: int = 2, micro: int = 1,
                    seq: int = 1, accumulation: int = 1, top_k: int = 32, tail: int = 8) -> int:
    """Bytes a device receives for the teacher per optimizer step (all-gathers, all-reduces, served rows)."""
    tokens = micro * seq
    if placement == "replica":
        return 0
    if placement == "zero3":  # every micro-batch's forward gathers the whole teacher
        return int(accumulation * shape.params * dtype_bytes * (devices - 1) / devices)
    if placement == "tp":  # 2 all-reduces of b x s x h per layer (ring), for each of the group's micro-batches
        ring = 2 * (tp - 1) / tp
        return int(accumulation * tp * shape.layers * 2 * ring * tokens * shape.hidden * dtype_bytes)
    per = 8 if placement == "teacher_group" else 6  # served rows: int32 id + fp32 log-prob; the cache: fp16
    return int(accumulation * tokens * (top_k + 1 + tail) * per)
