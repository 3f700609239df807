"""Teacher responses for SeqKD: generated once, sharded over data-parallel ranks, cached on disk, resumable.

The pattern of ``teachers.labeling`` (zero-shot label cache), for variable-length token sequences:

- **Sharding.** Prompts are cut into chunks of ``chunk_size``; inside a chunk rank r answers the prompts
  ``start + r, start + r + world_size, ...``, sorted by length, in batches of ``batch_size``. Every rank runs the
  SAME number of generation batches (a rank with fewer prompts repeats a dummy batch and drops its output):
  ZeRO-3 forwards are collectives. The shares are gathered back (``gather``).
- **Cache.** ``cache_dir`` is the folder of one generation. Rank 0 alone reads and writes it: ``key.json``,
  ``chunk_<start>_<stop>.pt`` as each chunk finishes, ``responses.pt`` once all are done (chunks then removed);
  every file is written to a temporary name and renamed. A file holds ``lengths`` (int32 [n]) and ``tokens``
  (int32, the responses concatenated) and the key's digest.
- **Key.** Teacher name and weights fingerprint, tokenizer hash, SHA-256 of the prompt tokens, and the decoding
  settings (greedy or sampled, temperature, top-k, top-p, max_new_tokens, seed, EOS). A folder whose ``key.json``
  differs raises ``KDError`` naming the fields: never reused, never deleted. ``default_cache_dir`` gives each
  key its own folder.
- **Resume.** A killed build leaves its finished chunk files; the next build with the same key skips them.
"""
from __future__ import annotations

import json
import logging
import math
import os
from typing import Any, Callable, Optional, Sequence

import torch

from ..errors import KDError
from ..input_files import InputFileError, load_tensors, read_json
from .labeling import Gather, _atomic_save, _chunk_path, _short, all_gather_objects, finished_chunks, key_digest

logger = logging.getLogger(__name__)

CACHE_FORMAT = 1
FINAL = "responses.pt"
Generate = Callable[[list], list]  # prompt token lists -> response token lists (same order)


def default_cache_dir(root: str, key: dict) -> str:
    return os.path.join(root, key_digest(key)[:16])


def normalise(key: dict) -> dict:
    return json.loads(json.dumps({"format": CACHE_FORMAT, **key}, sort_keys=True))


def read_key(cache_dir: str) -> Optional[dict]:
    path = os.path.join(cache_dir, "key.json")
    if not os.path.exists(path):
        return None
    return read_json(path, "seqkd cache key")


def key_mismatch(old: dict, new: dict, fields: Optional[Sequence[str]] = None) -> list[str]:
    """Differences ``field: cache X vs now Y`` (only ``fields`` when given)."""
    names = fields if fields is not None else sorted(set(old) | set(new))
    return [f"{k}: cache {_short(old.get(k))} vs now {_short(new.get(k))}" for k in names if old.get(k) != new.get(k)]


def check_key(cache_dir: str, key: dict) -> None:
    old = read_key(cache_dir)
    if old is not None and old != key:
        raise KDError(f"seqkd cache {cache_dir} holds teacher responses for another teacher, prompts or decoding "
                      f"({'; '.join(key_mismatch(old, key))}); use another --seqkd_cache folder or delete this one")


def _pack(responses: list) -> dict:
    lengths = torch.tensor([len(r) for r in responses], dtype=torch.int32)
    flat = [t for r in responses for t in r]
    return {"lengths": lengths, "tokens": torch.tensor(flat, dtype=torch.int32)}


def _unpack(obj: dict) -> list:
    out, pos = [], 0
    tokens = obj["tokens"].tolist()
    for n in obj["lengths"].tolist():
        out.append(tokens[pos:pos + n])
        pos += n
    return out


def _load(path: str, n: int, digest: str) -> Optional[list]:
    try:
        obj = load_tensors(path, "seqkd cache part", expect=None)
    except InputFileError as e:  # damaged / foreign file: generate that part again
        logger.warning("seqkd cache: ignoring %s (%s)", path, e)
        return None
    ok = (isinstance(obj, dict) and obj.get("key") == digest and isinstance(obj.get("lengths"), torch.Tensor)
          and isinstance(obj.get("tokens"), torch.Tensor) and obj["lengths"].numel() == n
          and int(obj["lengths"].sum()) == obj["tokens"].numel())
    if not ok:
        logger.warning("seqkd cache: ignoring %s (other key or shape)", path)
        return None
    return _unpack(obj)


def _answer(generate: Generate, mine: list, batch_size: int, n_batches: int, dummy: list) -> list:
    """Responses for this rank's prompts, longest first in batches, exactly ``n_batches`` generate calls."""
    order = sorted(range(len(mine)), key=lambda i: -len(mine[i]))
    out: list = [None] * len(mine)
    for b in range(n_batches):
        idx = order[b * batch_size:(b + 1) * batch_size]
        res = generate([mine[i] for i in idx] if idx else [dummy])
        for i, r in zip(idx, res):
            out[i] = list(r)
    return out


def teacher_responses(generate: Generate, prompts: Sequence[list], key: dict, cache_dir: Optional[str] = None,
                      *, batch_size: int = 16, chunk_size: int = 1024, rank: int = 0, world_size: int = 1,
                      gather: Optional[Gather] = None) -> tuple[list, dict]:
    """One teacher response per prompt (token lists, prompt order), identical on every rank; see the module doc.

    Returns ``(responses, info)`` with ``info = {"hit": bool, "resumed_chunks": int, "generated_chunks": int}``.
    """
    prompts = [list(p) for p in prompts]
    n = len(prompts)
    if n == 0:
        raise KDError("no prompts for the teacher to answer")
    if batch_size < 1 or chunk_size < 1:
        raise KDError("batch_size and chunk_size must be >= 1")
    if world_size > 1 and gather is None:
        gather = all_gather_objects
    if world_size == 1:
        gather = lambda obj: [obj]  # noqa: E731
    key = normalise(key)
    digest = key_digest(key)
    main = rank == 0
    state: dict = {"hit": False, "done": [], "error": None}
    have: dict[int, list] = {}
    final: Optional[list] = None
    if main and cache_dir:
        try:
            check_key(cache_dir, key)
            os.makedirs(cache_dir, exist_ok=True)
            if read_key(cache_dir) is None:
                _atomic_save(key, os.path.join(cache_dir, "key.json"))
        except (KDError, OSError) as e:  # tell the other ranks, so nobody waits in gather
            state["error"] = str(e)
        if state["error"] is None:
            if os.path.exists(os.path.join(cache_dir, FINAL)):
                final = _load(os.path.join(cache_dir, FINAL), n, digest)
            if final is not None:
                state["hit"] = True
            else:
                have = finished_chunks(cache_dir, n, chunk_size, lambda p, size: _load(p, size, digest))
                state["done"] = sorted(have)
    state = gather(state if main else None)[0]
    if state["error"]:
        raise KDError(state["error"])
    info = {"hit": state["hit"], "resumed_chunks": len(state["done"]), "generated_chunks": 0}
    if state["hit"]:
        logger.info("seqkd cache hit: %s (%d responses)", cache_dir, n)
        return gather(final if main else None)[0], info
    if state["done"]:
        logger.info("seqkd cache: resuming, %d of %d chunks already generated", len(state["done"]),
                    math.ceil(n / chunk_size))
    done = set(state["done"])
    for start in range(0, n, chunk_size):
        if start in done:
            continue
        stop = min(n, start + chunk_size)
        mine = prompts[start + rank:stop:world_size]
        n_batches = math.ceil(math.ceil((stop - start) / world_size) / batch_size)
        parts = gather(_answer(generate, mine, batch_size, n_batches, prompts[start]))
        chunk: list = [None] * (stop - start)
        for r, part in enumerate(parts):
            chunk[r::world_size] = part
        info["generated_chunks"] += 1
        if main:
            have[start] = chunk
            if cache_dir:
                _atomic_save({"key": digest, **_pack(chunk)}, _chunk_path(cache_dir, start, stop))
    out: Any = None
    if main:
        out = [r for s in sorted(have) for r in have[s]]
        if cache_dir:
            _atomic_save({"key": digest, **_pack(out)}, os.path.join(cache_dir, FINAL))
            for start in range(0, n, chunk_size):
                p = _chunk_path(cache_dir, start, min(n, start + chunk_size))
                if os.path.exists(p):
                    os.remove(p)
    return gather(out if main else None)[0], info
