"""Export the trained student as a Hugging Face folder (safetensors, config, tokenizer) with a model card."""
from __future__ import annotations

import json
import os
from contextlib import nullcontext

import torch

from ..io import atomic_dir


def _full_params(engine):
    """Context in which the student's parameters are whole on every rank (gathers ZeRO-3 partitions)."""
    if getattr(engine, "zero_optimization_partition_weights", lambda: False)():
        import deepspeed

        return deepspeed.zero.GatheredParameters(list(engine.module.parameters()), modifier_rank=None)
    return nullcontext()


def export_student(engine, tokenizer, out_dir: str, rank: int, barrier, card: dict) -> None:
    """Collective: every rank must call it. Rank 0 writes ``out_dir`` atomically (temp dir + rename)."""
    model = engine.module
    with _full_params(engine):
        if rank == 0:
            with atomic_dir(out_dir, prefix=".tmp-export-") as tmp:
                state = {k: v.detach().to("cpu").clone() for k, v in model.state_dict().items()}
                model.save_pretrained(tmp, state_dict=state, safe_serialization=True)
                if tokenizer is not None:
                    tokenizer.save_pretrained(tmp)
                with open(os.path.join(tmp, "README.md"), "w", encoding="utf-8") as fh:
                    fh.write(model_card(card))
    barrier()


def model_card(card: dict) -> str:
    cfg = card.get("config", {})
    lines = [
        "---",
        "library_name: transformers",
        "tags: [knowledge-distillation, kd_engine]",
        "---",
        f"# {card.get('title', 'Distilled student')}",
        "",
        f"Trained with **kd_engine**, method `{card.get('method')}`.",
        "",
        "| | |",
        "|---|---|",
        f"| teacher | `{card.get('teacher')}` |",
        f"| student init | `{card.get('student_init')}` |",
        f"| student parameters | {card.get('student_params', 0):,} |",
        f"| steps | {card.get('steps')} |",
        f"| DeepSpeed ZeRO stage | {card.get('zero_stage')} |",
    ]
    for k, v in card.get("extra", {}).items():
        lines.append(f"| {k} | {v} |")
    metrics = card.get("metrics", {})
    if metrics:
        lines += ["", "## Final metrics", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {v:.6g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in metrics.items()]
    lines += ["", "## Configuration", "", "```json", json.dumps(cfg, indent=2, default=str), "```", ""]
    return "\n".join(lines)


def count_params(model: torch.nn.Module) -> int:
    n = 0
    for p in model.parameters():
        n += getattr(p, "ds_numel", None) or p.numel()
    return n
