"""Bytes to records: opening a local or s3:// file through fsspec and parsing JSONL, JSON or Parquet.

Parsing yields `RawRecord`s in file order. A line that is not valid UTF-8 or not valid JSON is a
record with a `problem` (it becomes a reject row); anything that makes the whole file unreadable
raises `CorpusError` naming the URL.
"""

from __future__ import annotations

import codecs
import json
from dataclasses import dataclass
from typing import Any, BinaryIO, Iterator

from training import filesystem as files
from training.corpus.schema import CorpusError

SUFFIXES = {".jsonl": "jsonl", ".json": "json", ".parquet": "parquet"}

_CHUNK = 1 << 20  # bytes per read while splitting JSONL into lines
_PARQUET_BATCH = 1024  # rows converted to Python at a time
_SNIFF = 1 << 16  # bytes read to find the first non-blank character of a .json file


@dataclass
class RawRecord:
    """One record as parsed, before normalization.

    `row_index` is the 1-based line number for JSONL and the 0-based position in a JSON list or
    Parquet file. `text` is the source line (JSONL) kept for the rejects table's `raw` column.
    """

    row_index: int
    value: Any = None
    text: str | None = None
    problem: tuple[str, str] | None = None


def source_kind(url: str) -> str | None:
    """The file's kind from its name, case-insensitive: "jsonl", "json", "parquet", or None."""
    name = url.rstrip("/").rsplit("/", 1)[-1].lower()
    for suffix, kind in SUFFIXES.items():
        if name.endswith(suffix):
            return kind
    return None


def filesystem(url: str):
    """(fs, path) for a local path, file:// or s3:// URL, reusing the S3 client across files."""
    return files.filesystem(url, files.REUSE_CLIENT)


def iter_records(url: str) -> Iterator[RawRecord]:
    """The records of one source file; errors that stop the whole file become CorpusError."""
    kind = source_kind(url)
    if kind is None:
        raise CorpusError(f"{url}: not a corpus file (expected {', '.join(SUFFIXES)})")
    try:
        fs, path = filesystem(url)
        with fs.open(path, "rb") as f:
            if kind == "jsonl":
                yield from _jsonl_records(f)
            elif kind == "json":
                yield from _json_records(f, url)
            else:
                yield from _parquet_records(f, url)
    except CorpusError:
        raise
    except FileNotFoundError as exc:
        raise CorpusError(f"{url}: no such file") from exc
    except Exception as exc:  # botocore, aiohttp, OSError, Arrow: report what failed and where
        raise CorpusError(f"reading {url} failed: {type(exc).__name__}: {exc}") from exc


# -- JSONL ---------------------------------------------------------------------------------


def _jsonl_records(f: BinaryIO) -> Iterator[RawRecord]:
    for line_no, line in enumerate(_lines(f), start=1):
        if line_no == 1 and line.startswith(codecs.BOM_UTF8):
            line = line[len(codecs.BOM_UTF8):]
        if line.strip():  # blank lines separate nothing and are not records
            yield _parse_line(line, line_no)


def _lines(f: BinaryIO) -> Iterator[bytes]:
    """Split a binary stream on b"\\n" reading fixed chunks.

    fsspec's buffered files implement readline by reading a whole block per line, so iterating
    them directly copies megabytes per line on S3; this reads each byte once.
    """
    parts: list[bytes] = []
    while chunk := f.read(_CHUNK):
        pieces = chunk.split(b"\n")
        if len(pieces) == 1:
            parts.append(chunk)  # a long line spans chunks; join once when it ends
            continue
        parts.append(pieces[0])
        yield b"".join(parts)
        yield from pieces[1:-1]
        parts = [pieces[-1]]
    tail = b"".join(parts)
    if tail:
        yield tail


def _parse_line(line: bytes, line_no: int) -> RawRecord:
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as exc:
        shown = line.decode("utf-8", "backslashreplace")
        problem = ("invalid_utf8", f"byte {exc.start} of the line: {exc.reason}")
        return RawRecord(line_no, text=shown, problem=problem)
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        return RawRecord(line_no, text=text, problem=("malformed_json", f"{exc.msg} at column {exc.colno}"))
    except (ValueError, RecursionError) as exc:
        # Python's parser also refuses valid-looking JSON with other errors: nesting deeper than the
        # recursion limit (RecursionError) and integers over 4300 digits (ValueError). They are this
        # line's problem, not the file's.
        return RawRecord(line_no, text=text, problem=("malformed_json", f"{type(exc).__name__}: {exc}"[:200]))
    return RawRecord(line_no, value=value, text=text)


# -- JSON (a list, or JSONL under a .json name) --------------------------------------------


def _json_records(f: BinaryIO, url: str) -> Iterator[RawRecord]:
    first = _first_char(f)
    f.seek(0)
    if first is None:
        return  # an empty file holds no records
    if first == b"[":
        yield from _json_list_records(f.read(), url)
        return
    if first != b"{":
        raise CorpusError(f"{url} is neither a JSON list nor JSONL (it starts with {first!r})")
    _require_json_first_line(f, url)
    f.seek(0)
    yield from _jsonl_records(f)


def _first_char(f: BinaryIO) -> bytes | None:
    """The first non-whitespace byte after an optional BOM, or None for a blank file."""
    head = f.read(_SNIFF)
    if head.startswith(codecs.BOM_UTF8):
        head = head[len(codecs.BOM_UTF8):]
    while head:
        stripped = head.lstrip()
        if stripped:
            return stripped[:1]
        head = f.read(_SNIFF)
    return None


def _require_json_first_line(f: BinaryIO, url: str) -> None:
    """A .json file starting with "{" is JSONL only if its first line is a whole JSON value;
    otherwise it is one pretty-printed object, which holds no list of records to read."""
    line = next(_lines(f), b"")
    try:
        # "replace" so a bad byte inside a string does not hide that the line is JSON:
        # JSONL rejects such a line on its own later.
        json.loads(line.decode("utf-8-sig", "replace"))
    except json.JSONDecodeError as exc:
        raise CorpusError(
            f"{url} is neither a JSON list nor JSONL: its first line is not a complete JSON value ({exc.msg})"
        ) from None


def _json_list_records(data: bytes, url: str) -> Iterator[RawRecord]:
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        # A JSON list is one value: a bad byte leaves no line to reject on its own.
        raise CorpusError(f"{url}: invalid UTF-8 at byte {exc.start} ({exc.reason})") from None
    try:
        values = json.loads(text)
    except json.JSONDecodeError as exc:
        where = f"line {exc.lineno} column {exc.colno}"
        raise CorpusError(f"{url}: malformed JSON at {where}: {exc.msg}") from None
    for index, value in enumerate(values):
        yield RawRecord(index, value=value)


# -- Parquet -------------------------------------------------------------------------------


def _parquet_records(f: BinaryIO, url: str) -> Iterator[RawRecord]:
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(f)
    except Exception as exc:
        raise CorpusError(f"{url}: not a readable Parquet file ({type(exc).__name__}: {exc})") from exc
    index = 0
    for batch in parquet.iter_batches(batch_size=_PARQUET_BATCH):
        for record in _batch_records(batch, index):
            yield record
            index += 1


def _batch_records(batch, start: int) -> list[RawRecord]:
    try:
        return [RawRecord(start + i, value=v) for i, v in enumerate(batch.to_pylist())]
    except UnicodeDecodeError:
        # Parquet does not validate UTF-8 on read; find the bad rows one by one so only they
        # are rejected, as for JSONL lines.
        return [_single_row(batch, start, i) for i in range(batch.num_rows)]


def _single_row(batch, start: int, i: int) -> RawRecord:
    try:
        return RawRecord(start + i, value=batch.slice(i, 1).to_pylist()[0])
    except UnicodeDecodeError as exc:
        # No text to show: the row cannot be converted, which is the problem.
        problem = ("invalid_utf8", f"a string column holds invalid UTF-8 ({exc.reason})")
        return RawRecord(start + i, text="", problem=problem)
