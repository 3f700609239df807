"""Per-architecture access to one layer's self-attention queries, keys and values, without ``output_attentions``.

``adapter.qkv(model, input_ids, attention_mask, layer)`` returns ``(Q, K, V)``, each ``(B, n, d_h)``: all
attention heads concatenated, exactly the tensors the layer's attention multiplies. They are captured with
forward hooks on the layer's own q/k/v ``nn.Linear`` modules during a normal forward pass. The hooked Linear
receives the layer's input hidden state, after the input norm in pre-LN families, so the result is the
reference code's definition (bloomberg/minilmv2.bb: ``query(hidden_states[L-1])``, or
``q_proj(input_layernorm(...))`` for Llama) without
running the projections a second time. Nothing depends on the attention implementation (sdpa, eager, flash).

Architectures (``model.config.model_type``):

- BERT family (``bert``, ``roberta``, ``xlm-roberta``): ``encoder.layer[i].attention.self.{query,key,value}``.
- DistilBERT (``distilbert``): ``transformer.layer[i].attention.{q_lin,k_lin,v_lin}``.
- Llama style, pre-RMSNorm decoders (``llama``, ``mistral``, ``qwen2``, ``qwen3``):
  ``layers[i].self_attn.{q,k,v}_proj``. Q and K are returned **after** the per-head ``q_norm``/``k_norm``
  (Qwen3) and the rotary embedding, i.e. the vectors whose dot products are the model's
  attention scores (RoPE is relative, so relations stay invariant to left padding). With grouped-query
  attention the K/V heads are repeated to the full head count in the model's own order (query head h uses
  KV head ``h // (heads / kv_heads)``, as ``repeat_kv`` does), so Q, K and V all have width
  ``heads * head_dim`` and re-split into the same relation heads.

Works on a plain HF model (any head: only the base model is run), on a DeepSpeed engine (its own forward is
run, whole model) and on an engine's ``.module``, ZeRO-3 included: then the whole model is run from its root,
so that ZeRO's own forward hooks gather and release the parameters, and Q/K/V get a zero-weighted tie to the
model outputs so that ZeRO-3's backward hooks fire (see ``_tie_to_outputs``). For a plain model or a
non-ZeRO-3 ``.module`` without gradient checkpointing, the forward stops right after the requested layer's V
projection (the later layers and any head are not run).
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import nn

from ..errors import KDError


@dataclass(frozen=True)
class _Family:
    name: str
    layers: Callable[[nn.Module], nn.ModuleList]  # base model -> list of layers
    attention: Callable[[nn.Module], nn.Module]  # layer -> module holding the projections
    proj: tuple[str, str, str]  # q, k, v attribute names on that module
    rope: bool = False  # Q/K get the rotary embedding passed to the attention module


_BERT = _Family("BERT", lambda b: b.encoder.layer, lambda l: l.attention.self, ("query", "key", "value"))
_DISTILBERT = _Family("DistilBERT", lambda b: b.transformer.layer, lambda l: l.attention, ("q_lin", "k_lin", "v_lin"))
_LLAMA = _Family("Llama", lambda b: b.layers, lambda l: l.self_attn, ("q_proj", "k_proj", "v_proj"), rope=True)

FAMILIES = {
    "bert": _BERT,
    "roberta": _BERT,
    "xlm-roberta": _BERT,
    "distilbert": _DISTILBERT,
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": _LLAMA,
    "qwen3": _LLAMA,  # + per-head q_norm / k_norm before the rotary embedding
}


class _Stop(Exception):
    """Raised from a hook to end the forward pass once Q, K and V are captured."""


def _is_engine(model: nn.Module) -> bool:
    return type(model).__name__ in ("DeepSpeedEngine", "InferenceEngine", "PipelineEngine") and hasattr(
        model, "module")


def unwrap(model: nn.Module) -> nn.Module:
    """The HF model inside a DeepSpeed engine (or the model itself)."""
    return model.module if _is_engine(model) else model


def _is_zero3(model: nn.Module) -> bool:
    p = next(model.parameters(), None)
    return p is not None and hasattr(p, "ds_id")


def _checkpointing(model: nn.Module) -> bool:
    flag = getattr(model, "is_activation_checkpointing", None)  # transformers >= 5 name
    if flag is None:
        flag = getattr(model, "is_gradient_checkpointing", False)
    return bool(flag)


def _tie_to_outputs(qkv, out):
    """Make Q/K/V depend (with weight 0) on the model's outputs.

    ZeRO-3 gathers a module's parameters for backward when the gradient reaches the module's *outputs* and
    releases them when it leaves through its inputs. A loss on Q/K/V alone sends gradient into the inputs of
    the enclosing layer / encoder without ever passing their outputs, and DeepSpeed 0.19.8 then fails with
    "active_backward_submodules is empty during backward pass" (measured). A zero-weighted term on every
    output that requires grad makes every module's backward hooks fire in order; gradients are unchanged.
    """
    tensors = out.to_tuple() if hasattr(out, "to_tuple") else (out if isinstance(out, (tuple, list)) else (out,))
    zero = None
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.requires_grad and t.is_floating_point():
            term = t.sum() * 0.0
            zero = term if zero is None else zero + term
    if zero is None:
        return qkv
    return tuple(x + zero.to(x.dtype) for x in qkv)


class QKVAdapter:
    def __init__(self, model: nn.Module, family: _Family):
        self.family = family
        cfg = model.config
        self.model_type = cfg.model_type
        layers = family.layers(model.base_model)
        self.num_layers = len(layers)
        attn = family.attention(layers[0])
        q_proj = getattr(attn, family.proj[0])
        # width of the concatenated heads (out_features stays valid when ZeRO-3 empties the weights)
        self.hidden_size = int(q_proj.out_features)
        if family.rope:
            self.num_heads = int(cfg.num_attention_heads)
            self.num_kv_heads = int(getattr(cfg, "num_key_value_heads", None) or self.num_heads)
            self.head_dim = self.hidden_size // self.num_heads
        else:
            self.num_heads = int(getattr(cfg, "num_attention_heads", None) or cfg.n_heads)
            self.num_kv_heads = self.num_heads
            self.head_dim = self.hidden_size // self.num_heads

    def layer_index(self, layer: int) -> int:
        """0-based index of ``layer`` (negative counts from the end); KDError when out of range."""
        if isinstance(layer, bool) or not isinstance(layer, int) or not -self.num_layers <= layer < self.num_layers:
            raise KDError(
                f"layer {layer!r} is out of range for this {self.model_type} model with {self.num_layers} layers "
                f"(valid: 0..{self.num_layers - 1}, or -{self.num_layers}..-1 from the end)"
            )
        return layer % self.num_layers

    def qkv(
        self,
        model: nn.Module,
        input_ids: torch.Tensor,
        attention_mask: Optional[torch.Tensor],
        layer: int,
        **inputs,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Q, K, V ``(B, n, hidden_size)`` of ``layer`` (0-based, negative from the end) for this batch.

        ``model``: the HF model, a DeepSpeed engine, or an engine's ``.module``.

        Extra keyword ``inputs`` (e.g. ``token_type_ids``) are passed to the model. Gradients flow as usual, so
        call it under ``torch.no_grad()`` for a teacher.
        """
        engine = model if _is_engine(model) else None
        model = unwrap(model)
        idx = self.layer_index(layer)
        attn = self.family.attention(self.family.layers(model.base_model)[idx])
        zero3 = _is_zero3(model)
        stop_early = engine is None and not zero3 and not _checkpointing(model)
        got: dict[str, object] = {}

        def keep(name):
            def hook(_module, _args, output):
                got[name] = output
                if stop_early and len(got) == 3 + self.family.rope:
                    raise _Stop

            return hook

        def keep_rope(_module, args, kwargs):
            pe = kwargs.get("position_embeddings")
            if pe is None and len(args) > 1:
                pe = args[1]
            got["rope"] = pe

        handles = [getattr(attn, p).register_forward_hook(keep(n)) for n, p in zip("qkv", self.family.proj)]
        if self.family.rope:
            handles.append(attn.register_forward_pre_hook(keep_rope, with_kwargs=True))
        # an engine runs its own forward; a ZeRO-3 module runs from its root (where ZeRO's hooks start)
        runner = engine if engine is not None else (model if zero3 else model.base_model)
        out = None
        try:
            out = runner(input_ids=input_ids, attention_mask=attention_mask, **inputs)
        except _Stop:
            pass
        finally:
            for h in handles:
                h.remove()
        if any(k not in got for k in "qkv"):
            raise KDError(f"layer {idx} of the {self.model_type} model did not call its q/k/v projections")
        q, k, v = got["q"], got["k"], got["v"]
        if self.family.rope:
            q, k, v = self._rope_and_repeat(attn, q, k, v, got.get("rope"))
        if zero3 and torch.is_grad_enabled():
            q, k, v = _tie_to_outputs((q, k, v), out)
        return q, k, v

    def _rope_and_repeat(self, attn, q, k, v, rope):
        if rope is None:
            raise KDError(f"the {self.model_type} attention was called without position embeddings")
        cos, sin = rope
        b, n = q.shape[:2]
        qh = q.view(b, n, self.num_heads, self.head_dim)
        kh = k.view(b, n, self.num_kv_heads, self.head_dim)
        vh = v.view(b, n, self.num_kv_heads, self.head_dim)
        if getattr(attn, "q_norm", None) is not None:  # Qwen3: RMSNorm over each head's features
            qh, kh = attn.q_norm(qh), attn.k_norm(kh)
        # the model's own rotary function, applied in (B, n, heads, head_dim) layout
        apply_rotary = getattr(sys.modules[type(attn).__module__], "apply_rotary_pos_emb")
        qh, kh = apply_rotary(qh, kh, cos, sin, unsqueeze_dim=2)
        rep = self.num_heads // self.num_kv_heads
        if rep > 1:
            kh = kh.repeat_interleave(rep, dim=2)
            vh = vh.repeat_interleave(rep, dim=2)
        return qh.reshape(b, n, -1), kh.reshape(b, n, -1), vh.reshape(b, n, -1)


def get_adapter(model: nn.Module) -> QKVAdapter:
    """The Q/K/V adapter for ``model`` (a HF model, any head, or a DeepSpeed engine / its ``.module``)."""
    model = unwrap(model)
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    family = FAMILIES.get(model_type)
    if family is None:
        supported = ", ".join(sorted(FAMILIES))
        raise KDError(
            f"MiniLMv2 Q/K/V capture does not support architecture '{model_type or type(model).__name__}'; "
            f"supported model types: {supported}"
        )
    return QKVAdapter(model, family)
