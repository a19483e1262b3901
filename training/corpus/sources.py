"""Finding the source files of a corpus location and reading one of them into rows and rejects."""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from training.corpus.formats import FORMATS, detect_format, normalize_record, record_id
from training.corpus.readers import RawRecord, filesystem, iter_records, source_kind
from training.corpus.schema import CONVERSATION_SCHEMA, RAW_CHARS, SOURCE_REJECTS_SCHEMA, CorpusError

_GLOB_CHARS = "*?["
_ROWS_PER_BATCH = 8192  # accepted rows held as Python dicts before becoming an Arrow batch


@dataclass(frozen=True)
class SourceFile:
    url: str  # fsspec URL with its scheme: file:///abs/path or s3://bucket/key
    shard: str  # partition key derived from the file name, see shard_key


def shard_key(url: str) -> str:
    """Stable shard key from the file name: the stem with characters outside [A-Za-z0-9._-]
    replaced by "-", runs of dots collapsed (Dagster refuses "..." in partition keys), and
    leading/trailing dots and dashes removed."""
    name = _file_name(url)
    kind = source_kind(url)
    stem = name[: -len(kind) - 1] if kind else name
    key = re.sub(r"[^A-Za-z0-9._-]+", "-", stem)
    key = re.sub(r"\.{2,}", ".", key).strip(".-")
    if not key:
        raise CorpusError(f"{url}: the file name gives no usable shard key")
    return key


def list_sources(location: str) -> list[SourceFile]:
    """The corpus files (.jsonl, .json, .parquet) at a folder, glob, single file or s3:// prefix.

    A folder or prefix is listed one level deep (use a glob such as `dir/**/*.jsonl` to recurse);
    names starting with "." are skipped. Sorted by URL; two files with one shard key are an error.
    """
    try:
        fs, path = filesystem(location)
        if any(c in path for c in _GLOB_CHARS):
            paths = _glob(fs, path, location)
        else:
            paths = _folder_or_file(fs, path, location)
        urls = sorted(fs.unstrip_protocol(p) for p in paths)
    except CorpusError:
        raise
    except Exception as exc:  # botocore, aiohttp, OSError: report what failed and where
        raise CorpusError(f"listing {location} failed: {type(exc).__name__}: {exc}") from exc
    return _with_unique_shards(urls)


def _glob(fs, path: str, location: str) -> list[str]:
    # The folder before the first wildcard must exist: a typo in it is an error, while a pattern
    # that matches nothing yet in an existing folder is an empty corpus.
    first = min(path.index(c) for c in _GLOB_CHARS if c in path)
    base = path[:first].rsplit("/", 1)[0]
    if not fs.exists(base):
        raise CorpusError(f"{location}: {base} does not exist")
    found = fs.glob(path, detail=True)
    return [p for p, info in found.items() if info.get("type") == "file" and _is_corpus_file(p)]


def _folder_or_file(fs, path: str, location: str) -> list[str]:
    try:
        info = fs.info(path)
    except FileNotFoundError:
        raise CorpusError(f"{location} does not exist") from None
    if info.get("type") == "directory":
        entries = fs.ls(path, detail=True)
        return [e["name"] for e in entries if e.get("type") == "file" and _is_corpus_file(e["name"])]
    if source_kind(path) is None:
        raise CorpusError(f"{location} is not a corpus file (expected .jsonl, .json or .parquet)")
    return [path]


def _is_corpus_file(path: str) -> bool:
    return source_kind(path) is not None and not _file_name(path).startswith(".")


def _with_unique_shards(urls: list[str]) -> list[SourceFile]:
    owners: dict[str, str] = {}
    for url in urls:
        key = shard_key(url)
        if key in owners:
            raise CorpusError(f"{owners[key]} and {url} both map to shard key {key!r}; rename one of them")
        owners[key] = url
    return [SourceFile(url=url, shard=key) for key, url in owners.items()]


def _file_name(url: str) -> str:
    return url.rstrip("/").rsplit("/", 1)[-1]


@dataclass
class IngestResult:
    rows: pa.Table  # CONVERSATION_SCHEMA
    rejects: pa.Table  # SOURCE_REJECTS_SCHEMA
    n_read: int
    n_accepted: int
    n_rejected: int
    formats: dict[str, int]  # accepted rows per input format, every format listed

    @property
    def reject_reasons(self) -> dict[str, int]:
        return dict(Counter(self.rejects.column("reason").to_pylist()))


def read_source(url: str) -> IngestResult:
    """Read and normalize one source file. Row-level problems become rejects; a file that cannot
    be read at all raises CorpusError."""
    shard = shard_key(url)
    builder = _ShardBuilder(url, _file_name(url), shard)
    for raw in iter_records(url):
        builder.add(raw)
    return builder.result()


class _ShardBuilder:
    """Accumulates one shard's accepted rows and rejects, enforcing unique ids."""

    def __init__(self, url: str, name: str, shard: str):
        self.url = url
        self.name = name
        self.shard = shard
        self.n_read = 0
        self.formats = dict.fromkeys(FORMATS, 0)
        self.first_row_of_id: dict[str, int] = {}
        self.pending: list[dict] = []
        self.batches: list[pa.RecordBatch] = []
        self.n_accepted = 0
        self.rejects: list[dict] = []

    def add(self, raw: RawRecord) -> None:
        self.n_read += 1
        if raw.problem is not None:
            self._reject(raw, None, raw.problem)
            return
        row, problem = normalize_record(
            raw.value, source=self.name, row_index=raw.row_index, shard=self.shard
        )
        if problem is not None:
            self._reject(raw, record_id(raw.value), problem)
            return
        first = self.first_row_of_id.get(row["id"])
        if first is not None:
            detail = f"id {row['id']!r} was first accepted at row {first}"
            self._reject(raw, row["id"], ("duplicate_id", detail))
            return
        self.first_row_of_id[row["id"]] = raw.row_index
        self.formats[detect_format(raw.value)] += 1
        self._accept(row)

    def _accept(self, row: dict) -> None:
        self.n_accepted += 1
        self.pending.append(row)
        if len(self.pending) >= _ROWS_PER_BATCH:
            self._flush()

    def _flush(self) -> None:
        if self.pending:
            self.batches.append(pa.RecordBatch.from_pylist(self.pending, schema=CONVERSATION_SCHEMA))
            self.pending = []

    def _reject(self, raw: RawRecord, row_id: str | None, problem: tuple[str, str]) -> None:
        reason, detail = problem
        text = raw.text if raw.text is not None else _dump(raw.value)
        self.rejects.append(
            {
                "source_url": self.url,
                "row_index": raw.row_index,
                "id": row_id,
                "reason": _storable(reason),
                "detail": _storable(detail),
                "raw": _storable(text[:RAW_CHARS]),
            }
        )

    def result(self) -> IngestResult:
        self._flush()
        rejects = pa.Table.from_pylist(self.rejects, schema=SOURCE_REJECTS_SCHEMA)
        result = IngestResult(
            rows=pa.Table.from_batches(self.batches, schema=CONVERSATION_SCHEMA),
            rejects=rejects,
            n_read=self.n_read,
            n_accepted=self.n_accepted,
            n_rejected=rejects.num_rows,
            formats=self.formats,
        )
        # The invariant the rejects contract promises; checked explicitly (not an assert, which
        # -O strips) because a record lost here would go unnoticed downstream.
        stored = result.rows.num_rows + rejects.num_rows
        if not result.n_read == result.n_accepted + result.n_rejected == stored:
            raise RuntimeError(f"{self.url}: read {result.n_read} != accepted + rejected ({stored})")
        return result


def _dump(value: Any) -> str:
    """Rejected JSON-list and Parquet records as JSON text; default=str covers Parquet's bytes,
    timestamps and decimals."""
    return json.dumps(value, ensure_ascii=False, default=str)


def _storable(text: str) -> str:
    # Lone surrogates (from "\ud800" escapes) cannot be stored as UTF-8; show them escaped.
    return text.encode("utf-8", "backslashreplace").decode("utf-8")
