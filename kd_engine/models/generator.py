"""MATE-KD's generator: a masked LM sharing the teacher's vocabulary (methods.md §4).

Either an existing ``AutoModelForMaskedLM`` (``--generator PATH_OR_ID``) or one built from the teacher's first N
layers with a masked-LM head tied to the word embeddings (``--generator.layers N``), optionally warmed up with
masked-LM training on a raw corpus (``warmup_mlm``: the corpus pipeline's token cache, packed blocks).
"""
from __future__ import annotations

import logging
import re
from typing import Optional

import torch

from ..errors import KDError
from ..input_files import reading
from .loading import load_config, resolve

logger = logging.getLogger(__name__)


def is_masked_lm_config(config) -> bool:
    archs = getattr(config, "architectures", None) or []
    return any(a.endswith("ForMaskedLM") for a in archs)


def check_generator_source(name_or_path: str, trust_remote_code: bool = False):
    """Cheap pre-flight check (config only): the checkpoint exists and was saved with a masked-LM head."""
    config = load_config(name_or_path, trust_remote_code)
    if not is_masked_lm_config(config):
        archs = ", ".join(getattr(config, "architectures", None) or ["none recorded"])
        raise KDError(f"generator {name_or_path} has no masked-LM head (architectures: {archs}); MATE-KD needs an "
                      "AutoModelForMaskedLM, or build one from the teacher with --generator.layers N")
    return config


def load_generator(name_or_path: str, trust_remote_code: bool = False) -> torch.nn.Module:
    from transformers import AutoModelForMaskedLM

    check_generator_source(name_or_path, trust_remote_code)
    with reading("generator model", name_or_path):
        return AutoModelForMaskedLM.from_pretrained(resolve(name_or_path), trust_remote_code=trust_remote_code)


def _depth_key(config) -> str:
    for key in ("num_hidden_layers", "n_layers"):
        if hasattr(config, key):
            return key
    raise KDError(f"cannot build a generator from a {type(config).__name__}: no layer count in its config")


def build_from_teacher(teacher: torch.nn.Module, layers: int) -> torch.nn.Module:
    """A masked LM with the teacher's embeddings and first ``layers`` layers; fresh MLM head (transform +
    LayerNorm), decoder tied to the word embeddings."""
    import copy

    from transformers import AutoModelForMaskedLM

    config = copy.deepcopy(teacher.config)
    key = _depth_key(config)
    depth = getattr(config, key)
    if not 1 <= layers <= depth:
        raise KDError(f"generator.layers {layers} is out of range: the teacher has {depth} layers")
    setattr(config, key, layers)
    config.tie_word_embeddings = True
    try:
        gen = AutoModelForMaskedLM.from_config(config)
    except ValueError as exc:
        raise KDError(f"a {config.model_type} teacher has no masked-LM class to build a generator from: {exc}") \
            from None
    src = teacher.base_model.state_dict()
    dst = gen.base_model.state_dict()
    keep = {}
    for name, value in src.items():
        m = re.search(r"\.layer\.(\d+)\.", name)
        if m and int(m.group(1)) >= layers:
            continue
        if name in dst and dst[name].shape == value.shape:
            keep[name] = value.detach().clone()
    missing = [n for n in dst if n not in keep and "position_ids" not in n]
    if any(n.startswith(("embeddings", "encoder", "transformer")) for n in missing):
        raise KDError(f"could not copy the teacher's layers into the generator (missing {missing[:3]})")
    gen.base_model.load_state_dict(keep, strict=False)
    gen.tie_weights()
    gen.config.architectures = [type(gen).__name__]
    return gen


def masked_lm_logits(gen: torch.nn.Module, mask: torch.Tensor, **inputs) -> torch.Tensor:
    """Vocabulary logits at the masked positions only ``[K, V]``: the encoder, then the masked-LM head on the masked
    rows (the head's |V|-wide projection of every position costs more than a small generator's encoder). Models
    without a known single head module (``cls``: BERT, ``lm_head``: RoBERTa) run whole."""
    head = next((getattr(gen, n) for n in ("cls", "lm_head") if isinstance(getattr(gen, n, None), torch.nn.Module)),
                None)
    if head is None:
        return gen(**inputs).logits[mask]
    return head(gen.base_model(**inputs)[0][mask])


def warmup_mlm(gen: torch.nn.Module, tokenizer, files, steps: int, *, lr: float, batch_size: int, block_size: int,
               mask_prob: float, seed: int, cache_dir: str, rank: int = 0, world_size: int = 1,
               progress: bool = False, num_workers: Optional[int] = None) -> list[float]:
    """Masked-LM warm-up of ``gen`` in place (plain AdamW, identical on every rank: same seed, same blocks).

    Blocks come from the corpus pipeline (``build_or_load`` + ``PackedBlocks``); each step masks ``mask_prob`` of
    the non-special tokens ([MASK] everywhere, as MATE-KD does) and trains on them. Returns the step losses.
    """
    from ..data.corpus import PackedBlocks, build_or_load
    from ..losses.mate_kd import mask_positions

    cache = build_or_load(files, tokenizer, cache_dir, rank=rank, world_size=world_size, progress=progress,
                          num_workers=num_workers)
    blocks = PackedBlocks(cache, block_size)
    g = torch.Generator().manual_seed(seed)
    special = torch.tensor(sorted(set(tokenizer.all_special_ids)), dtype=torch.long)
    params = [p for p in gen.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    device = next(gen.parameters()).device
    vocab = len(tokenizer)
    gen.train()
    losses = []
    for _ in range(steps):
        idx = torch.randint(len(blocks), (batch_size,), generator=g).tolist()
        ids = torch.tensor([blocks[i]["input_ids"] for i in idx], dtype=torch.long)
        m = mask_positions(ids, None, special, mask_prob, g)
        if not bool(m.any()):
            continue
        inputs = ids.masked_fill(m, tokenizer.mask_token_id)
        m = m.to(device)
        logits = masked_lm_logits(gen, m, input_ids=inputs.to(device))[:, :vocab]
        loss = torch.nn.functional.cross_entropy(logits.float(), ids.to(device)[m])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 5.0)
        opt.step()
        losses.append(float(loss.detach()))
    opt.zero_grad(set_to_none=True)
    if losses:
        logger.info("generator MLM warm-up: %d steps, loss %.3f -> %.3f", len(losses), losses[0], losses[-1])
    return losses


def embedding_rows(config) -> Optional[int]:
    return getattr(config.get_text_config(), "vocab_size", None)
