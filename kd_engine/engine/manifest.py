"""Checkpoint manifests: the size and sha256 of every file of a checkpoint, written before its COMPLETE marker.

``verify`` re-reads a checkpoint and names the first file that is missing, truncated or altered, so a resume can
fall back to an older checkpoint instead of failing inside ``torch.load`` with a traceback.
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Optional

from ..input_files import InputFileError, read_json, reading

MANIFEST = "MANIFEST.json"
COMPLETE = "COMPLETE"
_CHUNK = 1 << 22


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with reading("file", path), open(path, "rb") as fh:
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
        complete = read_json(os.path.join(folder, COMPLETE), "checkpoint marker")
    except InputFileError as exc:
        return f"{COMPLETE} marker unreadable ({exc})"
    if "manifest_sha256" not in complete:
        return f"{COMPLETE} marker has no manifest digest (written by an older kd_engine, or damaged)"
    path = os.path.join(folder, MANIFEST)
    try:
        with reading("checkpoint manifest", path), open(path, "rb") as fh:
            raw = fh.read()
    except InputFileError:
        return f"{MANIFEST} is missing"
    if hashlib.sha256(raw).hexdigest() != complete["manifest_sha256"]:
        return f"{MANIFEST} does not match the digest in {COMPLETE}"
    try:
        with reading("checkpoint manifest", path):
            files = {str(rel): (int(m["size"]), str(m["sha256"])) for rel, m in json.loads(raw)["files"].items()}
    except InputFileError as exc:
        return str(exc)
    for rel, (want_size, want_sha) in sorted(files.items()):
        full = os.path.join(folder, rel)
        if not os.path.isfile(full):
            return f"{rel} is missing"
        size = os.path.getsize(full)
        if size != want_size:
            return f"{rel} has {size} bytes, the manifest says {want_size}"
        try:
            digest = sha256_file(full)
        except InputFileError as exc:
            return str(exc)
        if digest != want_sha:
            return f"{rel} does not match its sha256 in the manifest"
    return None
