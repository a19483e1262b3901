"""Fingerprints: one sha256 over everything an output depends on (DESIGN.md, incremental recomputation).

An output is stored under its fingerprint, so an unchanged input, config, code version and target
finds its earlier output and is not recomputed; any change yields a new fingerprint and a new output.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Mapping

FINGERPRINT_CHARS = 24  # 96 bits: collision-free for any corpus, short enough for paths


def _canonical(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def fingerprint(
    *,
    asset: str,
    code_version: str,
    config: Mapping[str, Any] | None = None,
    upstream: Mapping[str, str] | None = None,
    target: str | None = None,
) -> str:
    """sha256(asset, code_version, effective config, upstream fingerprints, target identity)."""
    payload = {
        "asset": asset,
        "code_version": code_version,
        "config": dict(config or {}),
        "upstream": dict(sorted((upstream or {}).items())),
        "target": target,
    }
    return hashlib.sha256(_canonical(payload).encode()).hexdigest()[:FINGERPRINT_CHARS]


def file_digest(fs, path: str, chunk: int = 1 << 22) -> str:
    """sha256 of a file's bytes through an fsspec filesystem (content, not mtime: a touched file is unchanged)."""
    digest = hashlib.sha256()
    with fs.open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def model_identity(name_or_path: str, revision: str | None = None) -> str:
    """Identity of a target model: a hub id with its revision, or a local directory's content.

    For a local directory we hash the small files (config, tokenizer, chat template) fully and the
    weight files by size plus their first and last MiB: retraining changes those bytes, and hashing
    many GB of weights on every run would cost more than the steps it saves.
    """
    path = Path(name_or_path)
    if not path.is_dir():
        return f"{name_or_path}@{revision or 'main'}"
    digest = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        rel = f.relative_to(path).as_posix()
        if rel.startswith(".") or rel.endswith(".md"):
            continue
        size = f.stat().st_size
        digest.update(f"{rel}:{size}\n".encode())
        with f.open("rb") as fh:
            if size <= 8 << 20:
                digest.update(fh.read())
            else:
                digest.update(fh.read(1 << 20))
                fh.seek(size - (1 << 20))
                digest.update(fh.read())
    return f"{path.resolve()}#{digest.hexdigest()[:16]}"
