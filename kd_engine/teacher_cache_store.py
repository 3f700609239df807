"""On-disk format of the offline top-k teacher cache, and its reader.

A cache folder ``C`` holds:

- ``manifest.json``: what the cache was made from (format, teacher, tokenizer and its vocabulary hash, train file
  and the SHA-256 of its bytes, text/target columns, task, max length, k, temperature). Written first; a
  folder whose manifest differs is never reused (``ConfigError`` naming the fields) nor deleted.
- ``shard-RRRRR.pt``: one per rank of the build, after it finished; while building, ``part-SSSSSSSSSS-RRRRR.pt``
  files per chunk of examples (resume skips the chunks already there; every file is written to a temporary name
  and renamed, as in ``teachers.labeling``).
- ``complete.json``: (shards, examples, tokens, bytes per token), written last: a cache without it is unfinished.

A shard holds, for every real target token of its examples in order: ``ids`` int32 ``[N, k]``, ``logp`` fp16
``[N, k]`` (teacher log-probabilities at the manifest's temperature; ``--logp_dtype`` bf16/fp32 also), ``log_tail``
``[N]`` (log of the probability mass outside the top k), ``targets`` int32 ``[N]`` (the label tokens, checked at
every lookup), and the example index: ``keys`` (content hashes) and ``offsets`` int64 ``[E + 1]``. With
``--tail_samples m`` also ``tail_ids`` int32 ``[N, m]`` and ``tail_logp`` ``[N, m]``: m draws from the teacher's
distribution outside the top k (see ``losses.sparse_kd``), seeded per example by its content hash and ``--seed``.
Bytes per token: ``6 (k + 1 + m)`` at fp16 (``8 (k + 1 + m)`` at fp32), plus the per-example index.

Examples are keyed by a content hash of their token ids (``example_key``), so a lookup finds the right rows
whatever the order, rank, epoch or resume point of the training run.
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Optional

import torch

from .errors import ConfigError, KDError
from .input_files import check_file, load_tensors, read_json, reading
from .teachers.labeling import _atomic_save, _short

FORMAT = 1
MANIFEST = "manifest.json"
COMPLETE = "complete.json"
COMPARED = ("format", "tokenizer_sha256", "vocab_size", "corpus_sha256", "text_column", "target_column", "task",
            "max_length", "temperature")


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with reading("data file", path), open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def tokenizer_sha256(tok) -> str:
    items = sorted(tok.get_vocab().items())
    extra = (tok.pad_token_id, tok.eos_token_id, tok.bos_token_id)
    return hashlib.sha256(json.dumps([items, extra]).encode()).hexdigest()


def example_key(input_ids: torch.Tensor, labels: torch.Tensor) -> str:
    """Content hash of one example: its real input ids and its labels (both 1-D, padding already removed)."""
    h = hashlib.sha256(input_ids.to(torch.int64).cpu().numpy().tobytes())
    h.update(b"|")
    h.update(labels.to(torch.int64).cpu().numpy().tobytes())
    return h.hexdigest()[:32]


def batch_keys(batch: dict, task: str) -> list[str]:
    """``example_key`` of every row of a right-padded batch (real tokens: attention_mask == 1; seq2seq labels:
    != -100; causal labels: the real positions)."""
    ids, labels = batch["input_ids"], batch["labels"]
    mask = batch.get("attention_mask")
    out = []
    for b in range(ids.shape[0]):
        real = ids[b][mask[b].bool()] if mask is not None else ids[b]
        lab = labels[b][labels[b] != -100] if task == "seq2seq_lm" else labels[b][: real.shape[0]]
        out.append(example_key(real, lab))
    return out


def sample_seed(key: str, seed: int) -> int:
    """Seed of one example's tail samples: its content hash and the build's ``--seed``."""
    return (int(key[:15], 16) + 1_000_003 * int(seed)) % (1 << 63)


def row_targets(labels: torch.Tensor) -> list[torch.Tensor]:
    """Per example, the label tokens of its real rows (labels already aligned with the logit rows)."""
    return [row[row != -100] for row in labels]


def make_manifest(*, teacher: str, tokenizer, tokenizer_name: str, train_file: str, text_column: str,
                  target_column: Optional[str], task: str, max_length: int, top_k: int, temperature: float,
                  logp_dtype: str = "fp16", tail_samples: int = 0, seed: int = 0) -> dict:
    m = {"format": FORMAT, "teacher": teacher, "tokenizer": tokenizer_name, "tokenizer_sha256":
         tokenizer_sha256(tokenizer), "vocab_size": len(tokenizer), "train_file": os.path.abspath(train_file),
         "corpus_sha256": file_sha256(train_file), "text_column": text_column, "target_column": target_column,
         "task": task, "max_length": int(max_length), "top_k": int(top_k), "temperature": float(temperature),
         "logp_dtype": logp_dtype, "tail_samples": int(tail_samples), "seed": int(seed)}
    return json.loads(json.dumps(m, sort_keys=True))


MANIFEST_KEYS = ("teacher", "tokenizer", "tokenizer_sha256", "vocab_size", "corpus_sha256", "text_column",
                 "task", "max_length", "top_k", "temperature", "logp_dtype", "tail_samples")


def read_manifest(path: str) -> dict:
    """The manifest of a cache folder; ConfigError if ``path`` is not a teacher cache."""
    mpath = os.path.join(path, MANIFEST)
    if not os.path.isdir(path):
        raise ConfigError(f"teacher_cache {path}: no such folder")
    if not os.path.isfile(mpath):
        raise ConfigError(f"teacher_cache {path} is not a teacher cache (no {MANIFEST}); build one with "
                          f"python -m kd_engine.teacher_cache")
    m = read_json(mpath, "teacher cache manifest")
    if m.get("format") != FORMAT:
        raise ConfigError(f"teacher_cache {path}: not a format-{FORMAT} teacher cache manifest")
    missing = [k for k in MANIFEST_KEYS if k not in m]
    if missing:
        raise ConfigError(f"teacher cache manifest {mpath} lacks {', '.join(missing)} (damaged, or not written by "
                          f"python -m kd_engine.teacher_cache)")
    return m


def mismatch(old: dict, new: dict, fields=COMPARED) -> list[str]:
    return [f"{k}: cache {_short(old.get(k))} vs now {_short(new.get(k))}" for k in fields
            if old.get(k) != new.get(k)]


def open_for_build(path: str, manifest: dict) -> None:
    """Create the folder and its manifest, or check that an existing one is for the same build."""
    if os.path.exists(os.path.join(path, MANIFEST)):
        diff = mismatch(read_manifest(path), manifest, tuple(manifest))
        if diff:
            raise ConfigError(f"teacher_cache {path} was built differently ({'; '.join(diff)}); use another "
                              f"--output_dir")
        return
    if os.path.isdir(path) and os.listdir(path):
        raise ConfigError(f"--output_dir {path} exists and is not a teacher cache; pick a new folder")
    os.makedirs(path, exist_ok=True)
    _atomic_save(manifest, os.path.join(path, MANIFEST))


def part_path(path: str, start: int, rank: int) -> str:
    return os.path.join(path, f"part-{start:010d}-{rank:05d}.pt")


def shard_path(path: str, rank: int) -> str:
    return os.path.join(path, f"shard-{rank:05d}.pt")


def save(obj: dict, path: str) -> None:
    _atomic_save(obj, path)


def concat_parts(parts: list[dict], k: int, logp_dtype=torch.float16, tail_samples: int = 0) -> dict:
    keys, offsets, n = [], [0], 0
    for p in parts:
        keys += p["keys"]
        offsets += [n + o for o in p["offsets"][1:].tolist()]
        n += int(p["offsets"][-1])
    cat = (lambda name, shape, dt: torch.cat([p[name] for p in parts]) if parts else torch.empty(shape, dtype=dt))
    out = {"keys": keys, "offsets": torch.tensor(offsets, dtype=torch.int64),
           "ids": cat("ids", (0, k), torch.int32), "logp": cat("logp", (0, k), logp_dtype),
           "log_tail": cat("log_tail", (0,), logp_dtype), "targets": cat("targets", (0,), torch.int32)}
    if tail_samples:
        out["tail_ids"] = cat("tail_ids", (0, tail_samples), torch.int32)
        out["tail_logp"] = cat("tail_logp", (0, tail_samples), logp_dtype)
    return out


def check_complete(path: str) -> list[str]:
    """The shard files of a finished cache, each checked to be a whole torch file (its zip directory, at the end,
    is read: cheap at any size); one error naming the damaged file. Runs before a training run writes anything."""
    import zipfile

    done = os.path.join(path, COMPLETE)
    if not os.path.isfile(done):
        raise ConfigError(f"teacher_cache {path} is unfinished (no {COMPLETE}); rerun its build to resume it")
    info = read_json(done, "teacher cache marker")
    shards = info.get("shards")
    if not isinstance(shards, list) or not shards or not all(isinstance(s, str) and "/" not in s for s in shards):
        raise ConfigError(f"teacher cache marker {done} lists no shard files (damaged?); rerun its build")
    for s in shards:
        shard = os.path.join(path, s)
        check_file(shard, "teacher cache shard")
        with reading("teacher cache shard", shard):
            zipfile.ZipFile(shard).close()
    return shards


class TeacherCache:
    """Read side: ``lookup(keys, targets)`` -> the cached top-k rows of those examples, concatenated in order."""

    def __init__(self, path: str):
        self.path = path
        self.manifest = read_manifest(path)
        names = check_complete(path)
        with reading("teacher cache manifest", os.path.join(path, MANIFEST)):
            self.k = int(self.manifest["top_k"])
            self.tail_samples = int(self.manifest.get("tail_samples", 0))
        self.shards = [load_tensors(os.path.join(path, s), "teacher cache shard", mmap=True) for s in names]
        self.index: dict[str, tuple[int, int, int]] = {}
        for si, sh in enumerate(self.shards):
            with reading("teacher cache shard", os.path.join(path, names[si])):
                off = sh["offsets"].tolist()
                for e, key in enumerate(sh["keys"]):
                    self.index[key] = (si, off[e], off[e + 1])

    def check_run(self, run_manifest: dict) -> None:
        diff = mismatch(self.manifest, run_manifest)
        if diff:
            raise ConfigError(f"teacher_cache {self.path} was made for another run ({'; '.join(diff)}); build a "
                              f"cache for this teacher/tokenizer/corpus/length/temperature")

    def lookup(self, keys: list[str], targets: list[torch.Tensor]):
        """``(ids [N, k] int64, logp [N, k] fp32, log_tail [N] fp32, tail_ids [N, m] int64 or None, tail_logp
        [N, m] fp32 or None)`` for the examples ``keys`` whose real target tokens are ``targets`` (one 1-D tensor
        per example); KDError if an example is missing or differs."""
        ids, logp, tail, t_ids, t_logp = [], [], [], [], []
        for key, tgt in zip(keys, targets):
            hit = self.index.get(key)
            if hit is None:
                raise KDError(f"teacher_cache {self.path} has no entry for a training example (content hash "
                              f"{key}): was the cache built from this --train_file?")
            sh = self.shards[hit[0]]
            a, b = hit[1], hit[2]
            if b - a != tgt.numel() or not torch.equal(sh["targets"][a:b].to(torch.int64), tgt.to(torch.int64).cpu()):
                raise KDError(f"teacher_cache {self.path}: cached targets of example {key} differ from the batch")
            ids.append(sh["ids"][a:b])
            logp.append(sh["logp"][a:b])
            tail.append(sh["log_tail"][a:b])
            if self.tail_samples:
                t_ids.append(sh["tail_ids"][a:b])
                t_logp.append(sh["tail_logp"][a:b])
        sampled = (torch.cat(t_ids).long(), torch.cat(t_logp).float()) if self.tail_samples else (None, None)
        return (torch.cat(ids).long(), torch.cat(logp).float(), torch.cat(tail).float(), *sampled)
