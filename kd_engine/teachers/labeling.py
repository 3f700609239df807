"""Label a corpus with a zero-shot teacher: sharded across data-parallel ranks, cached on disk, resumable.

``label_corpus(teacher, texts, ...)`` returns the N x K soft labels (float32, CPU, original order) on every rank.

- **Sharding.** The corpus is cut into chunks of ``chunk_size`` texts; inside a chunk rank r labels the texts
  ``start + r, start + r + world_size, ...`` (strided: every rank gets a similar length mix). The teacher sorts its
  share by token length and pads per batch. The shares are gathered back (``gather``: a callable
  ``obj -> [obj of rank 0, obj of rank 1, ...]``, e.g. ``all_gather_objects`` below; with one rank, nothing).
- **Cache.** ``cache_dir`` is the folder of *one* labeling. Rank 0 alone reads and writes it (it need not be on
  a shared file system); other ranks receive what they need through ``gather``. Layout: ``key.json`` (the full
  key), ``chunk_<start>_<stop>.pt`` written as each chunk finishes, and ``labels.pt`` once all are done (the
  chunk files are then removed). Every file is written to a temporary name and renamed (atomic).
- **Key.** teacher kind, name/path, weights fingerprint, template, class names, multi_label, temperature,
  max_length, SHA-256 of the corpus, number of texts, plus ``key_fields``. A cache folder whose ``key.json``
  differs raises ``KDError`` naming the differing fields: it is never reused silently and never deleted (a
  labeling can cost hours). ``default_cache_dir(root, key)`` gives each key its own folder, so runs with other
  teachers/templates never collide and later runs with other students reuse the labels.
- **Resume.** An interrupted run leaves its finished chunk files; the next run with the same key skips them.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from typing import Any, Callable, Optional, Sequence

import torch

from ..errors import KDError
from ..input_files import InputFileError, load_tensors, read_json
from ..io import atomic_file

logger = logging.getLogger(__name__)

CACHE_FORMAT = 1
Gather = Callable[[Any], list]


def all_gather_objects(obj: Any) -> list:
    """``gather`` for torch.distributed: every rank gets the list of every rank's object."""
    import torch.distributed as dist

    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def corpus_hash(texts: Sequence[str]) -> str:
    h = hashlib.sha256()
    for t in texts:
        b = t.encode("utf-8")
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)
    return h.hexdigest()


def labeling_key(teacher: Any, texts: Sequence[str], key_fields: Optional[dict] = None) -> dict:
    key = {"format": CACHE_FORMAT, **teacher.cache_key(), "corpus_sha256": corpus_hash(texts),
           "n_texts": len(texts), "n_classes": len(teacher.class_names)}
    for k, v in (key_fields or {}).items():
        key[k] = v
    return json.loads(json.dumps(key, sort_keys=True))  # normalised (tuples -> lists) for comparison


def key_digest(key: dict) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def default_cache_dir(root: str, key: dict) -> str:
    return os.path.join(root, key_digest(key)[:16])


def _atomic_save(obj: Any, path: str) -> None:
    if path.endswith(".json"):
        with atomic_file(path) as f:
            json.dump(obj, f, indent=1, sort_keys=True)
    else:
        with atomic_file(path, "wb") as f:
            torch.save(obj, f)


def _chunk_path(cache_dir: str, start: int, stop: int) -> str:
    return os.path.join(cache_dir, f"chunk_{start:010d}_{stop:010d}.pt")


def finished_chunks(cache_dir: str, n: int, chunk_size: int, load) -> dict:
    """Chunk start -> content of every chunk an interrupted build already wrote whole (``load(path, size)`` returns
    None for a chunk that is damaged or of another key)."""
    have = {}
    for start in range(0, n, chunk_size):
        stop = min(n, start + chunk_size)
        p = _chunk_path(cache_dir, start, stop)
        if os.path.exists(p):
            got = load(p, stop - start)
            if got is not None:
                have[start] = got
    return have


def _open_cache(cache_dir: str, key: dict) -> None:
    """Create the folder and key.json, or check that the existing key.json is ours (KDError otherwise)."""
    os.makedirs(cache_dir, exist_ok=True)
    path = os.path.join(cache_dir, "key.json")
    if not os.path.exists(path):
        _atomic_save(key, path)
        return
    try:
        old = read_json(path, "label cache key")
    except InputFileError as e:
        raise KDError(f"{e}; delete the folder {cache_dir} to relabel") from None
    if old != key:
        diff = sorted(k for k in set(old) | set(key) if old.get(k) != key.get(k))
        shown = "; ".join(f"{k}: cache {_short(old.get(k))} vs now {_short(key.get(k))}" for k in diff)
        raise KDError(f"label cache {cache_dir} was written for a different labeling ({shown}); use another "
                      f"cache folder or delete this one")


def _short(v: Any) -> str:
    s = json.dumps(v)
    return s if len(s) <= 60 else s[:57] + "..."


def _load_tensor(path: str, shape: tuple[int, int], digest: str) -> Optional[torch.Tensor]:
    try:
        obj = load_tensors(path, "label cache part", expect=None)
    except InputFileError as e:  # a foreign / damaged file: relabel that part
        logger.warning("label cache: ignoring %s (%s)", path, e)
        return None
    t = obj.get("probs") if isinstance(obj, dict) else None
    if not isinstance(t, torch.Tensor) or obj.get("key") != digest or tuple(t.shape) != shape:
        logger.warning("label cache: ignoring %s (other key or shape)", path)
        return None
    return t.float()


def label_corpus(teacher: Any, texts: Sequence[str], batch_size: int = 32, cache_dir: Optional[str] = None,
                 key_fields: Optional[dict] = None, rank: int = 0, world_size: int = 1,
                 gather: Optional[Gather] = None, chunk_size: int = 2048) -> torch.Tensor:
    """Soft labels N x K for ``texts`` from ``teacher`` (see the module docstring), identical on every rank.

    ``teacher(texts, batch_size) -> N x K`` with ``cache_key()`` and ``class_names``; every rank must pass the
    same texts. Raises KDError for a cache folder written with another key.
    """
    texts = list(texts)
    n, K = len(texts), len(teacher.class_names)
    if n == 0:
        raise KDError("no texts to label")
    if chunk_size < 1:
        raise KDError(f"chunk_size must be >= 1, got {chunk_size}")
    if world_size > 1 and gather is None:
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            raise KDError("label_corpus with world_size > 1 needs a gather function or torch.distributed")
        gather = all_gather_objects
    if world_size == 1:
        gather = lambda obj: [obj]  # noqa: E731

    main = rank == 0
    digest = ""
    state: dict = {"hit": False, "done": []}
    labels: Optional[torch.Tensor] = None
    have: dict[int, torch.Tensor] = {}  # rank 0: chunk start -> probs
    if main and cache_dir:
        key = labeling_key(teacher, texts, key_fields)
        digest = key_digest(key)
        error = None
        try:
            _open_cache(cache_dir, key)
        except KDError as e:  # tell the other ranks too, so that nobody waits forever in gather
            error = str(e)
        state["error"] = error
        if error is None:
            final = os.path.join(cache_dir, "labels.pt")
            if os.path.exists(final):
                labels = _load_tensor(final, (n, K), digest)
            if labels is not None:
                state["hit"] = True
            else:
                have = finished_chunks(cache_dir, n, chunk_size, lambda p, size: _load_tensor(p, (size, K), digest))
                state["done"] = sorted(have)
    state = gather(state if main else None)[0]
    if state.get("error"):
        raise KDError(state["error"])
    if state["hit"]:
        logger.info("label cache hit: %s (%d texts x %d classes)", cache_dir, n, K)
        return gather(labels if main else None)[0]
    if state["done"]:
        logger.info("label cache: resuming, %d of %d chunks already labeled", len(state["done"]),
                    -(-n // chunk_size))

    done = set(state["done"])
    for start in range(0, n, chunk_size):
        if start in done:
            continue
        stop = min(n, start + chunk_size)
        mine = texts[start + rank:stop:world_size]
        probs = teacher(mine, batch_size) if mine else torch.empty(0, K)
        parts = gather(probs.float().cpu())
        chunk = torch.empty(stop - start, K, dtype=torch.float32)
        for r, part in enumerate(parts):
            chunk[r::world_size] = part
        if main:
            have[start] = chunk
            if cache_dir:
                _atomic_save({"key": digest, "probs": chunk}, _chunk_path(cache_dir, start, stop))

    if main:
        labels = torch.cat([have[s] for s in sorted(have)])
        if cache_dir:
            _atomic_save({"key": digest, "probs": labels}, os.path.join(cache_dir, "labels.pt"))
            for start in range(0, n, chunk_size):
                p = _chunk_path(cache_dir, start, min(n, start + chunk_size))
                if os.path.exists(p):
                    os.remove(p)
    return gather(labels if main else None)[0]
