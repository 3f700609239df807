"""Shrink a teacher into a student folder (DistilBART "shrink" step / MiniLMv2-style random student).

    python -m kd_engine.shrink --teacher facebook/bart-large-mnli --decoder_layers 6 --output_dir students/12-6
    python -m kd_engine.shrink --teacher ./my-bert --layers 3 --output_dir students/bert-3
    python -m kd_engine.shrink --teacher ./bert --layers 6 --hidden 384 --heads 12 --init random --output_dir s

Writes ``save_pretrained`` safetensors weights, the teacher's tokenizer and a README.md model card that lists
the teacher, the copied layers and the sizes. The lineage is also stored in ``config.json`` (``kd_lineage``).
"""
from __future__ import annotations

import argparse
import logging
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Optional

from kd_engine.errors import KDError
from kd_engine.input_files import reading

logger = logging.getLogger("kd_engine.shrink")

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".safetensors.index.json", ".bin.index.json")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m kd_engine.shrink",
        description="Build a smaller student from a teacher (copy selected layers, or random init).",
    )
    p.add_argument("--teacher", required=True, help="teacher folder, hub id or offline:<name>")
    p.add_argument("--layers", type=int, default=None,
                   help="student depth (encoder depth for encoder-decoder models); default: keep")
    p.add_argument("--decoder_layers", type=int, default=None,
                   help="decoder depth of an encoder-decoder student; default: keep")
    p.add_argument("--hidden", type=int, default=None, help="hidden size (needs --init random)")
    p.add_argument("--heads", type=int, default=None, help="attention heads (needs --init random)")
    p.add_argument("--intermediate", type=int, default=None,
                   help="FFN size (needs --init random); default 4 x hidden when --hidden is given")
    p.add_argument("--init", choices=("teacher_layers", "random"), default="teacher_layers")
    p.add_argument("--output_dir", required=True)
    p.add_argument("--overwrite", action="store_true", help="replace a model already in --output_dir")
    p.add_argument("--gguf_file", default=None, help="load the teacher from this GGUF file inside --teacher")
    p.add_argument("--trust_remote_code", action="store_true")
    return p


def _is_local_path(name: str) -> bool:
    return name.startswith(("/", "./", "../", "~")) or os.path.exists(name) or name.count("/") > 1


def _check_output_dir(out: Path, teacher: str, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise KDError(f"--output_dir {out} exists and is not a folder")
    if os.path.isdir(teacher) and out.exists() and out.resolve() == Path(teacher).resolve():
        raise KDError("--output_dir is the teacher's folder; choose another folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        what = "already holds a model" if (out / "config.json").exists() else "is not empty"
        raise KDError(f"--output_dir {out} {what}; pass --overwrite to replace it or choose another folder")


def _load_teacher(args):
    import transformers
    from transformers import AutoConfig, AutoModel

    name = os.path.expanduser(args.teacher)
    if name.startswith("offline:"):  # a model shipped in a PyPI package, as --teacher of launch/train.py
        from kd_engine.models.loading import offline_model_path

        name = offline_model_path(name.split(":", 1)[1])
    if _is_local_path(name) and not os.path.isdir(name):
        raise KDError(f"teacher folder not found: {args.teacher}")
    kw = {"trust_remote_code": args.trust_remote_code}
    if args.gguf_file:
        kw["gguf_file"] = args.gguf_file
    with reading("teacher config of", args.teacher):
        config = AutoConfig.from_pretrained(name, **kw)
    from kd_engine.models.student import check_request

    check_request(config, args.layers, args.decoder_layers)  # before the (possibly long) weight load
    archs = getattr(config, "architectures", None) or []
    if archs:
        cls = getattr(transformers, archs[0], None)
    else:  # e.g. a GGUF file: the config names no head class; GGUF files hold causal LMs
        from kd_engine.models.student import FAMILIES, _LLAMA

        causal = args.gguf_file or FAMILIES.get(getattr(config, "model_type", None)) is _LLAMA
        cls = transformers.AutoModelForCausalLM if causal else AutoModel
        logger.warning("the teacher config names no architecture; loading it with %s", cls.__name__)
    if cls is None:
        raise KDError(f"teacher architecture {archs[0]!r} is not a transformers class (remote code is not supported)")
    with reading("teacher weights of", args.teacher):
        model = cls.from_pretrained(name, config=config, dtype="auto", **kw)
    with reading("teacher tokenizer of", args.teacher):
        tokenizer = transformers.AutoTokenizer.from_pretrained(name, **kw)
    return model.eval(), tokenizer


def _n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def model_card(teacher, student, argv: list[str]) -> str:
    lin = student.config.kd_lineage
    lines = [
        f"# Student of `{lin['teacher']}`",
        "",
        "Built with `kd_engine.shrink`:",
        "",
        "```",
        "python -m kd_engine.shrink " + " ".join(shlex.quote(a) for a in argv),
        "```",
        "",
        "| | teacher | student |",
        "|---|---|---|",
        f"| class | {type(teacher).__name__} | {type(student).__name__} |",
        f"| parameters | {_n_params(teacher):,} | {_n_params(student):,} |",
    ]
    for stack, n in lin["teacher_layers"].items():
        lines.append(f"| {stack} layers | {n} | {lin['student_layers'][stack]} |")
    from kd_engine.models.student import family_of

    fam = family_of(teacher.config)
    for label, keys in (("hidden", fam.hidden_keys), ("heads", fam.heads_keys), ("intermediate", fam.intermediate_keys)):
        lines.append(f"| {label} (`{keys[0]}`) | {getattr(teacher.config, keys[0])} | {getattr(student.config, keys[0])} |")
    lines += ["", f"Initialisation: `{lin['init']}`."]
    for stack in lin["teacher_layers"]:
        copied = lin.get(f"{stack}_layers_copied")
        if copied:
            lines.append(f"- {stack} layers copied from teacher layers (0-based): {copied}")
    if lin["init"] == "teacher_layers":
        lines.append("- all other weights (embeddings, positions, norms, heads) are the teacher's")
    else:
        lines.append("- weights are randomly initialised (train it, e.g. with MiniLMv2 or KD)")
    lines += ["", "The same lineage is stored in `config.json` under `kd_lineage`.", ""]
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        out = Path(args.output_dir)
        _check_output_dir(out, os.path.expanduser(args.teacher), args.overwrite)
        for flag in ("layers", "decoder_layers"):
            value = getattr(args, flag)
            if value is not None and value < 1:
                raise KDError(f"--{flag} must be at least 1, got {value}")
        from kd_engine.models.student import create_student  # torch/transformers only past the cheap checks

        t0 = time.perf_counter()
        teacher, tokenizer = _load_teacher(args)
        t_load = time.perf_counter() - t0
        student = create_student(
            teacher, layers=args.layers, decoder_layers=args.decoder_layers, hidden=args.hidden,
            heads=args.heads, intermediate=args.intermediate, init=args.init,
        )
        student.config.kd_lineage["teacher"] = args.teacher
        t_build = time.perf_counter() - t0 - t_load
        out.mkdir(parents=True, exist_ok=True)
        if args.overwrite:  # drop stale weight shards of the model being replaced
            for f in out.iterdir():
                if f.is_file() and f.name.endswith(_WEIGHT_SUFFIXES):
                    f.unlink()
        student.save_pretrained(out, safe_serialization=True)
        tokenizer.save_pretrained(out)
        (out / "README.md").write_text(model_card(teacher, student, argv))
        lin = student.config.kd_lineage
        logger.info(
            "student written to %s (%s -> %s layers, %s parameters; load %.1fs, build %.1fs)",
            out, lin["teacher_layers"], lin["student_layers"], f"{_n_params(student):,}", t_load, t_build,
        )
        return 0
    except KDError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
