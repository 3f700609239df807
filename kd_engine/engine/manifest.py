"""Checkpoint manifests: the size and sha256 of every file of a checkpoint, written before its COMPLETE marker.

``verify`` re-reads a checkpoint and names the first file that is missing, truncated or altered, so a resume can
fall back to an older checkpoint instead of failing inside ``torch.load`` with a traceback.
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Optional

MANIFEST = "MANIFEST.json"
COMPLETE = "COMPLETE"
_CHUNK = 1 << 22


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(_CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def _files(folder: str) -> list[str]:
    out = []
    for root, _, names in os.walk(folder):
        for n in names:
            rel = os.path.relpath(os.path.join(root, n), folder)
            if rel not in (MANIFEST, COMPLETE):
                out.append(rel)
    return sorted(out)


def write(folder: str, write_text) -> str:
    """Hash every file under ``folder`` into ``MANIFEST.json``; returns the manifest's own sha256 (for COMPLETE)."""
    files = {rel: {"size": os.path.getsize(os.path.join(folder, rel)), "sha256": sha256_file(os.path.join(folder, rel))}
             for rel in _files(folder)}
    text = json.dumps({"files": files}, indent=1, sort_keys=True)
    write_text(os.path.join(folder, MANIFEST), text)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def verify(folder: str) -> Optional[str]:
    """None when the checkpoint is whole; otherwise one line saying what is wrong with it."""
    try:
        with open(os.path.join(folder, COMPLETE), encoding="utf-8") as fh:
            complete = json.loads(fh.read())
    except (OSError, ValueError) as exc:
        return f"{COMPLETE} marker unreadable ({exc.__class__.__name__})"
    if not isinstance(complete, dict) or "manifest_sha256" not in complete:
        return f"{COMPLETE} marker has no manifest digest (written by an older kd_engine, or damaged)"
    path = os.path.join(folder, MANIFEST)
    try:
        with open(path, "rb") as fh:
            raw = fh.read()
    except OSError:
        return f"{MANIFEST} is missing"
    if hashlib.sha256(raw).hexdigest() != complete["manifest_sha256"]:
        return f"{MANIFEST} does not match the digest in {COMPLETE}"
    files = json.loads(raw.decode("utf-8"))["files"]
    for rel, meta in sorted(files.items()):
        full = os.path.join(folder, rel)
        if not os.path.isfile(full):
            return f"{rel} is missing"
        size = os.path.getsize(full)
        if size != meta["size"]:
            return f"{rel} has {size} bytes, the manifest says {meta['size']}"
        if sha256_file(full) != meta["sha256"]:
            return f"{rel} does not match its sha256 in the manifest"
    return None
