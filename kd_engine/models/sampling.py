"""Teacher-mixed sampling (MiniLLM rollouts): student and teacher decode in lockstep, each with its OWN KV cache.

At every step both models' next-token logits are warped (temperature on each; top-k / top-p decided on the
student's logits and the resulting -inf mask applied to BOTH models, so that log q, log p and w stay finite for
every sampled token; the mask is carried for training), turned into fp32 probabilities and mixed in probability
space,
``p_mix = (1 - alpha) q + alpha p``; the next token is drawn from ``p_mix`` (``torch.multinomial`` under the given
``torch.Generator``, or argmax when ``do_sample=False``). alpha = 0 is plain student sampling (w = 1 exactly).
Per token we keep ``log q(y_t)``, ``log p(y_t)`` (under the warped distributions; equal to the raw ones with the
defaults temperature 1, top_k 0, top_p 1) and the importance weight ``w_t = q / p_mix``.

Causal LMs: prompts must be left-padded; position ids are ``cumsum(mask) - 1``; the attention mask grows by one
column per step. Encoder-decoder models: each model runs its own encoder once per prompt; each decoder starts from
its model's ``decoder_start_token_id`` exactly once and then reads one sampled token per step with its own
``EncoderDecoderCache``; the teacher never sees the student's encoder outputs.

A model with a ``rollout_state(input_ids, attention_mask)`` method (the served teacher of ``--teacher_ranks``)
brings its own decoding state, with the same ``first()`` / ``step(tokens)`` contract.

``use_cache=False`` is the reference implementation (full prefix recomputed each step, the encoder included) used
by the equality tests and the rollout benchmark; it must draw exactly the same tokens for the same generator.
Models are put in eval() for the rollout (dropout off, as the reference code) and restored afterwards.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F

from ..errors import KDError
from ..losses.minillm import importance_weights
from .modes import eval_mode
from .response_logits import (
    accepts_logits_to_keep,
    decoder_start_token_id,
    is_encoder_decoder,
    position_ids_from_mask,
)


# --------------------------------------------------------------------------------------------------------
# one step (pure tensors; also used by the tabular toy test)


def warp_logits(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0):
    """fp32 logits after temperature, top-k and top-p; returns ``(warped, inf_mask)`` (True = removed).

    ``inf_mask`` is None when neither top-k nor top-p is active. The most likely token is always kept.
    """
    if temperature <= 0:
        raise KDError(f"temperature must be > 0, got {temperature} (use do_sample=False for greedy decoding)")
    x = logits.float()
    if temperature != 1.0:
        x = x / temperature
    remove = None
    V = x.shape[-1]
    if top_k and 0 < top_k < V:
        kth = torch.topk(x, top_k, dim=-1).values[..., -1:]
        remove = x < kth
    if top_p < 1.0:
        pre = x if remove is None else x.masked_fill(remove, float("-inf"))
        sorted_x, order = torch.sort(pre, dim=-1, descending=True)
        probs = F.softmax(sorted_x, dim=-1)
        before = probs.cumsum(-1) - probs  # mass strictly above this entry
        drop_sorted = before > top_p
        drop_sorted[..., 0] = False
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        remove = drop if remove is None else (remove | drop)
    if remove is not None:
        x = x.masked_fill(remove, float("-inf"))
    return x, remove


@dataclass
class StepOut:
    tokens: torch.Tensor  # [B]
    student_logprobs: torch.Tensor  # [B] log q(y) under the warped student distribution
    teacher_logprobs: Optional[torch.Tensor]  # [B] log p(y) under the warped teacher distribution
    weights: torch.Tensor  # [B] q(y) / p_mix(y)
    inf_mask: Optional[torch.Tensor]  # [B, V] entries removed by top-k / top-p (for both models)


def mixed_step(
    student_logits: torch.Tensor,
    teacher_logits: Optional[torch.Tensor],
    alpha: float,
    *,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    do_sample: bool = True,
    generator: Optional[torch.Generator] = None,
) -> StepOut:
    """Draw one token per row from ``(1 - alpha) q + alpha p`` (logits ``[B, V]``, same V for both)."""
    if not 0.0 <= alpha <= 1.0:
        raise KDError(f"teacher_mixed_alpha must be in [0, 1], got {alpha}")
    if teacher_logits is None and alpha > 0:
        raise KDError("teacher-mixed sampling with alpha > 0 needs a teacher")
    s_warped, s_inf = warp_logits(student_logits, temperature, top_k, top_p)
    logq = F.log_softmax(s_warped, dim=-1)
    probs = F.softmax(s_warped, dim=-1)
    logp = None
    if teacher_logits is not None:
        # one support for both models: the student's top-k/top-p set (the reference applies the same inf_mask to
        # the teacher's reward logits). A teacher-proposed token outside it would have q = 0 and r = +inf.
        t_warped, _ = warp_logits(teacher_logits, temperature)
        if s_inf is not None:
            t_warped = t_warped.masked_fill(s_inf, float("-inf"))
        logp = F.log_softmax(t_warped, dim=-1)
        if alpha > 0:
            probs = (1.0 - alpha) * probs + alpha * logp.exp()
    if do_sample:
        tokens = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    else:
        tokens = probs.argmax(-1)
    lq = logq.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    lp = logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1) if logp is not None else None
    w = importance_weights(lq, lp if lp is not None else lq, alpha)
    return StepOut(tokens, lq, lp, w, s_inf)


# --------------------------------------------------------------------------------------------------------
# per-model decoding state


class _CausalState:
    """Left-padded prompt, growing attention mask, own DynamicCache (or full recompute when use_cache=False)."""

    def __init__(self, model, input_ids, attention_mask, use_cache: bool):
        from transformers import DynamicCache

        self.model, self.use_cache = model, use_cache
        self.ids, self.mask = input_ids, attention_mask.long()
        self.keep = {"logits_to_keep": 1} if accepts_logits_to_keep(model) else {}
        self.cache = DynamicCache(config=model.config) if use_cache else None
        self.pos = position_ids_from_mask(self.mask)

    def first(self) -> torch.Tensor:
        out = self.model(
            input_ids=self.ids,
            attention_mask=self.mask,
            position_ids=self.pos,
            past_key_values=self.cache,
            use_cache=self.use_cache,
            **self.keep,
        )
        return out.logits[:, -1]

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        B = tokens.shape[0]
        self.mask = torch.cat([self.mask, self.mask.new_ones(B, 1)], dim=1)
        self.pos = torch.cat([self.pos, self.pos[:, -1:] + 1], dim=1)
        if self.use_cache:
            out = self.model(
                input_ids=tokens.unsqueeze(1),
                attention_mask=self.mask,
                position_ids=self.pos[:, -1:],
                past_key_values=self.cache,
                use_cache=True,
                **self.keep,
            )
            self.cache = out.past_key_values
        else:
            self.ids = torch.cat([self.ids, tokens.unsqueeze(1)], dim=1)
            out = self.model(input_ids=self.ids, attention_mask=self.mask, position_ids=self.pos, use_cache=False,
                             **self.keep)
        return out.logits[:, -1]


class _Seq2SeqState:
    """Own encoder run once, own decoder from its own start token, own EncoderDecoderCache."""

    def __init__(self, model, input_ids, attention_mask, use_cache: bool):
        from transformers import DynamicCache, EncoderDecoderCache

        self.model, self.use_cache = model, use_cache
        self.ids, self.mask = input_ids, attention_mask.long()
        self.start = decoder_start_token_id(model)
        B = input_ids.shape[0]
        self.dec = torch.full((B, 1), self.start, dtype=torch.long, device=input_ids.device)
        if use_cache:
            self.enc = model.get_encoder()(input_ids=self.ids, attention_mask=self.mask, return_dict=True)
            dec_cfg = getattr(model.get_decoder(), "config", model.config)
            self.cache = EncoderDecoderCache(DynamicCache(config=dec_cfg), DynamicCache(config=dec_cfg))

    def _forward(self, dec_ids):
        if self.use_cache:
            out = self.model(
                encoder_outputs=self.enc,
                attention_mask=self.mask,
                decoder_input_ids=dec_ids,
                past_key_values=self.cache,
                use_cache=True,
            )
            self.cache = out.past_key_values
        else:  # reference: encoder and the whole decoder prefix recomputed
            out = self.model(input_ids=self.ids, attention_mask=self.mask, decoder_input_ids=dec_ids, use_cache=False)
        return out.logits[:, -1]

    def first(self) -> torch.Tensor:
        return self._forward(self.dec)

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        self.dec = torch.cat([self.dec, tokens.unsqueeze(1)], dim=1)
        return self._forward(tokens.unsqueeze(1) if self.use_cache else self.dec)


# --------------------------------------------------------------------------------------------------------
# the rollout


@dataclass
class Rollout:
    prompt_ids: torch.Tensor  # [B, P]
    prompt_mask: torch.Tensor  # [B, P]
    response_ids: torch.Tensor  # [B, T] pad after the first EOS
    response_mask: torch.Tensor  # [B, T] long: 1 up to and including the first EOS
    student_logprobs: torch.Tensor  # [B, T] fp32, 0 where masked
    teacher_logprobs: Optional[torch.Tensor]  # [B, T] fp32, 0 where masked (None without a teacher)
    weights: torch.Tensor  # [B, T] fp32 importance weights, 1 where masked
    inf_mask: Optional[torch.Tensor]  # [B, T, V] bool, student entries removed by top-k/top-p (None if inactive)

    @property
    def lengths(self) -> torch.Tensor:
        return self.response_mask.sum(-1)


def _all_finished(finished: torch.Tensor, synced_ranks: bool) -> bool:
    done = finished.all()
    if synced_ranks:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            flag = done.to(torch.int32).reshape(1)
            dist.all_reduce(flag, op=dist.ReduceOp.MIN)
            done = flag[0] > 0
    return bool(done)


def _check_vocab(s_logits: torch.Tensor, t_logits: Optional[torch.Tensor], vocab_size: Optional[int]) -> int:
    Vs = s_logits.shape[-1]
    if t_logits is not None and vocab_size is None and t_logits.shape[-1] != Vs:
        raise KDError(
            f"student has {Vs} logit rows and teacher {t_logits.shape[-1]}: pass vocab_size (the tokenizer's size)"
        )
    V = Vs if vocab_size is None else vocab_size
    for name, lg in (("student", s_logits), ("teacher", t_logits)):
        if lg is not None and lg.shape[-1] < V:
            raise KDError(f"{name} has {lg.shape[-1]} logit rows, fewer than the tokenizer's {V} tokens")
    return V


@torch.no_grad()
def mixed_sample(
    student,
    teacher,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    max_new_tokens: int,
    eos_token_id: Union[int, Sequence[int], None],
    pad_token_id: int,
    alpha: float = 0.2,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    do_sample: bool = True,
    generator: Optional[torch.Generator] = None,
    vocab_size: Optional[int] = None,
    use_cache: bool = True,
    synced_ranks: bool = False,
) -> Rollout:
    """Sample up to ``max_new_tokens`` response tokens per prompt from the teacher-mixed distribution.

    ``teacher`` may be None only for alpha = 0 (then ``teacher_logprobs`` is None). ``vocab_size`` drops padded
    logit rows (they are never sampled). Stops early once every row has produced an EOS; with
    ``synced_ranks`` only once every row on EVERY data-parallel rank has (ZeRO-3 forwards are collectives, so all
    ranks must run the same number of steps).
    """
    if max_new_tokens < 1:
        raise KDError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if input_ids.shape[1] == 0 or bool((attention_mask.sum(-1) == 0).any()):
        raise KDError("empty prompt in the rollout batch: every prompt needs at least one token")
    enc_dec = is_encoder_decoder(student)
    if teacher is not None and is_encoder_decoder(teacher) != enc_dec:
        raise KDError(
            f"teacher ({type(teacher).__name__}) and student ({type(student).__name__}) must both be encoder-decoder "
            "or both be causal LMs"
        )
    if not enc_dec and bool((attention_mask[:, -1] == 0).any()):
        raise KDError("causal-LM prompts must be left-padded (set tokenizer.padding_side = 'left')")
    if eos_token_id is None:
        eos = torch.empty(0, dtype=torch.long, device=input_ids.device)
    else:
        eos_list = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
        eos = torch.as_tensor(eos_list, dtype=torch.long, device=input_ids.device)

    State = _Seq2SeqState if enc_dec else _CausalState
    B = input_ids.shape[0]
    toks, lqs, lps, ws, infs = [], [], [], [], []
    finished = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
    alive_masks = []
    def state_of(model):  # a served teacher (engine/served_teacher.py) keeps its KV cache on the teacher group
        make = getattr(model, "rollout_state", None)
        return make(input_ids, attention_mask) if make else State(model, input_ids, attention_mask, use_cache)

    with eval_mode(student, teacher):
        s_state = state_of(student)
        t_state = state_of(teacher) if teacher is not None else None
        s_logits = s_state.first()
        t_logits = t_state.first() if t_state is not None else None
        V = _check_vocab(s_logits, t_logits, vocab_size)
        for step in range(max_new_tokens):
            out = mixed_step(
                s_logits[:, :V],
                t_logits[:, :V] if t_logits is not None else None,
                alpha,
                temperature=temperature,
                top_k=top_k,
                top_p=top_p,
                do_sample=do_sample,
                generator=generator,
            )
            alive = ~finished
            tok = torch.where(alive, out.tokens, torch.full_like(out.tokens, pad_token_id))
            toks.append(tok)
            alive_masks.append(alive)
            lqs.append(out.student_logprobs)
            lps.append(out.teacher_logprobs)
            ws.append(out.weights)
            if out.inf_mask is not None:
                infs.append(out.inf_mask)
            finished = finished | (alive & torch.isin(tok, eos))
            if step == max_new_tokens - 1 or _all_finished(finished, synced_ranks):
                break
            s_logits = s_state.step(tok)
            t_logits = t_state.step(tok) if t_state is not None else None

    mask = torch.stack(alive_masks, dim=1)
    fmask = mask.to(torch.float32)
    return Rollout(
        prompt_ids=input_ids,
        prompt_mask=attention_mask,
        response_ids=torch.stack(toks, dim=1),
        response_mask=mask.long(),
        student_logprobs=torch.stack(lqs, dim=1) * fmask,
        teacher_logprobs=torch.stack(lps, dim=1) * fmask if t_state is not None else None,
        weights=torch.where(mask, torch.stack(ws, dim=1), torch.ones_like(fmask)),
        inf_mask=(torch.stack(infs, dim=1) & mask.unsqueeze(-1)) if infs else None,
    )
