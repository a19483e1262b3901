"""The object store every stage writes through: a local folder or s3:// via fsspec.

Artifacts are written atomically without renames (S3 has none): each writer puts its files under
a fresh `attempt-<id>/` folder inside the artifact prefix and writes `manifest.json` last. The
manifest names the files with their sizes and sha256, so a reader that trusts only a manifest never
sees a partial artifact, and a killed writer leaves nothing a reader would pick up.

Writers of one prefix at once (the automation sensor and a `specdraft run` on the same fingerprint)
are safe: a writer's first object is its record `attempt-<id>/_writer.json` (host and pid), removed
when it commits, and a committer deletes only attempts that are neither named by the manifest nor
of a live writer (record of a process on this host that is gone, or no record at all). A writer
that finds a manifest of its own fingerprint already there keeps it and drops its own attempt (same
fingerprint, same content), so no manifest ever names deleted files. Scratch state beside the
artifact (`writer.scratch(name)`: resampling progress) is deleted by the last writer to finish.

Transient faults of a remote store (5xx answers, throttling, refused, reset or timed-out
connections) are retried at two levels, each bounded and with exponential backoff:
  - every S3 request by botocore ("standard" retry mode, training/filesystem.py's
    `S3_MAX_ATTEMPTS` attempts; AWS_MAX_ATTEMPTS / AWS_RETRY_MODE override it), which covers the
    multipart uploads of streamed artifact parts;
  - every whole-object call of ObjectStore (read/write bytes and JSON, manifests, exists, list,
    size, delete, open) once more by training/retry.py's `RetryPolicy` (SPECDRAFT_STORE_RETRIES
    attempts, default 4), so an endpoint that is away for a couple of seconds (a restart) is
    ridden out.
Then the call fails with a StoreError naming the URL. 4xx answers (missing object, wrong
credentials, no such bucket) and local-disk errors are never retried.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import posixpath
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from training.filesystem import filesystem
from training.liveness import maybe_alive, this_process
from training.retry import RetryPolicy

MANIFEST = "manifest.json"
ATTEMPT_PREFIX = "attempt-"
WRITER_RECORD = "_writer.json"  # inside a live writer's attempt folder: {"host", "pid"}

_sleep = time.sleep  # the backoff's sleep (tests record it instead of waiting)


class StoreError(RuntimeError):
    """An object-store operation failed; the message names the URL and the cause."""


def store_retry_policy() -> RetryPolicy:
    """The retry policy of a remote store: SPECDRAFT_STORE_RETRIES attempts (default 4)."""
    raw = os.environ.get("SPECDRAFT_STORE_RETRIES")
    try:
        return RetryPolicy(attempts=max(1, int(raw))) if raw else RetryPolicy()
    except ValueError:
        raise StoreError(f"SPECDRAFT_STORE_RETRIES must be an integer, got {raw!r}") from None


# S3 error codes and HTTP statuses that mean "try again", never "you asked for the wrong thing".
_TRANSIENT_CODES = {
    "SlowDown", "ServiceUnavailable", "InternalError", "RequestTimeout", "RequestTimeoutException",
    "Throttling", "ThrottlingException", "TooManyRequestsException", "RequestLimitExceeded",
    "BandwidthLimitExceeded", "PriorRequestNotComplete", "OperationAborted",
}
_TRANSIENT_ERRNOS = {
    errno.EBUSY, errno.ETIMEDOUT, errno.ECONNRESET, errno.ECONNREFUSED, errno.ECONNABORTED, errno.EPIPE,
    errno.EHOSTUNREACH, errno.ENETUNREACH, getattr(errno, "EREMOTEIO", 121),
}


def is_transient(exc: BaseException) -> bool:
    """Whether a failed store call is worth retrying: a 5xx/429 answer or throttling code, or a
    connection that was refused, reset, dropped or timed out. Follows the exception's cause chain
    (s3fs wraps botocore's errors in OSError subclasses); a definite 4xx answer is final."""
    chain: list[BaseException] = []
    while exc is not None and exc not in chain and len(chain) < 16:
        chain.append(exc)
        exc = exc.__cause__ or exc.__context__
    for e in chain:
        response = getattr(e, "response", None)
        if isinstance(response, dict) and "Error" in response:  # botocore ClientError: the server answered
            status = int(response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
            code = str(response["Error"].get("Code", ""))
            return status >= 500 or status == 429 or code in _TRANSIENT_CODES or code in ("500", "502", "503", "504")
    for e in chain:
        if isinstance(e, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)):
            return False
        module = type(e).__module__ or ""
        if isinstance(e, (ConnectionError, TimeoutError)):
            return True  # refused/reset/aborted, socket and asyncio timeouts, fsspec's FSTimeoutError
        if module.startswith("botocore") and type(e).__name__ in (
            "EndpointConnectionError", "ConnectionClosedError", "ReadTimeoutError", "ConnectTimeoutError",
            "ProxyConnectionError", "ResponseStreamingError", "IncompleteReadError", "HTTPClientError",
        ):
            return True
        if module.startswith("aiohttp") and type(e).__name__ in (
            "ClientConnectionError", "ClientOSError", "ServerDisconnectedError", "ServerTimeoutError",
            "ClientConnectorError", "ClientPayloadError", "ServerConnectionError",
        ):
            return True
        if isinstance(e, OSError) and e.errno in _TRANSIENT_ERRNOS:
            return True
    return False


def _check_key(key: str) -> str:
    """Keys are relative POSIX paths under the root; nothing may climb out of it."""
    if not isinstance(key, str):
        raise StoreError(f"object-store key must be a string, got {type(key).__name__}")
    key = key.strip("/")
    parts = key.split("/") if key else []
    if "\\" in key or any(p in ("..", ".") for p in parts) or "\x00" in key:
        raise StoreError(f"object-store key {key!r} escapes the storage root")
    return key


def _relative_name(name: str) -> str:
    """A file name inside an artifact: a relative key in canonical form (no leading "/", no "..")."""
    if not isinstance(name, str) or not name or _check_key(name) != name or "//" in name:
        raise StoreError(f"artifact file name {name!r} is not a plain relative path")
    return name


def safe_component(name: str) -> str:
    """A single path component (shard key, asset name) checked not to contain separators."""
    if not name or "/" in name or "\\" in name or name in (".", "..") or "\x00" in name:
        raise StoreError(f"invalid path component {name!r}")
    return name


def artifact_prefix(asset: str, partition: str | None, fingerprint: str) -> str:
    """`{asset}/{shard or _}/{fingerprint}`, DESIGN.md's layout."""
    return "/".join(safe_component(p) for p in (asset, partition or "_", fingerprint))


class ObjectStore:
    """fsspec-backed store rooted at `root` (`file:///abs/path`, a plain path, or `s3://bucket/prefix`)."""

    def __init__(self, root: str, storage_options: dict[str, Any] | None = None, *, retry: RetryPolicy | None = None):
        root = str(root)
        if "://" not in root:
            root = Path(root).resolve().as_uri()
        self.protocol = root.split("://", 1)[0]
        if self.protocol not in ("file", "s3", "memory"):
            raise StoreError(f"unsupported object-store URL {root!r}: use file://, a path, or s3://")
        self.root = root.rstrip("/")
        # Local disk errors are not transient; only a remote store's calls are retried.
        self.retry = (retry or store_retry_policy()) if self.protocol != "file" else RetryPolicy(attempts=1)
        self.fs, _ = filesystem(self.root, storage_options)
        self._base = self.root.split("://", 1)[1]  # path as the filesystem names it
        if self.protocol == "file":
            self.fs.makedirs(self._base, exist_ok=True)

    def __repr__(self) -> str:
        return f"ObjectStore({self.root!r})"

    # -- addressing -------------------------------------------------------------------------
    def path(self, key: str) -> str:
        """Filesystem path of `key` (no scheme), what fsspec calls take."""
        key = _check_key(key)
        return posixpath.join(self._base, key) if key else self._base

    def url(self, key: str) -> str:
        return f"{self.protocol}://{self.path(key)}"

    def _guard(self, action: str, key: str, fn, *args, write: bool = False, **kwargs):
        """Run an fsspec call, retrying transient faults (RetryPolicy) and turning its many error
        types into one that names the URL. A missing object stays FileNotFoundError when reading;
        a write that finds no bucket is a StoreError like any other failed write."""
        tries = 0

        def once():
            nonlocal tries
            tries += 1
            return fn(*args, **kwargs)

        try:
            return self.retry.call(once, transient=is_transient, what=f"{action} {self.url(key)}",
                                   sleep=lambda s: _sleep(s))
        except FileNotFoundError as exc:
            if write:
                raise StoreError(f"{action} {self.url(key)} failed: {type(exc).__name__}: {exc}") from exc
            raise
        except StoreError:
            raise
        except Exception as exc:  # botocore/aiohttp/OSError: report what and where
            after = f" after {tries} attempts" if tries > 1 else ""
            raise StoreError(f"{action} {self.url(key)} failed{after}: {type(exc).__name__}: {exc}") from exc

    # -- plain objects ----------------------------------------------------------------------
    def exists(self, key: str) -> bool:
        return bool(self._guard("checking", key, self.fs.exists, self.path(key)))

    def list(self, prefix: str = "", recursive: bool = False) -> list[str]:
        """Keys directly under (or, recursive, anywhere below) `prefix`, relative to the root."""
        base = self.path(prefix)
        if not self.exists(prefix):
            return []
        if recursive:
            found = self._guard("listing", prefix, self.fs.find, base)
        else:
            found = self._guard("listing", prefix, self.fs.ls, base, detail=False)
        strip = self._base.rstrip("/") + "/"
        return sorted(p[len(strip):] if p.startswith(strip) else p for p in found)

    def read_bytes(self, key: str) -> bytes:
        return self._guard("reading", key, self.fs.cat_file, self.path(key))

    def write_bytes(self, key: str, data: bytes) -> None:
        """Whole-object write: a local file is replaced by rename, an S3 PUT is atomic anyway."""
        path = self.path(key)
        if self.protocol == "file":
            def replace() -> None:
                self.fs.makedirs(posixpath.dirname(path), exist_ok=True)
                tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
                with open(tmp, "wb") as f:
                    f.write(data)
                os.replace(tmp, path)

            self._guard("writing", key, replace, write=True)
        else:
            self._guard("writing", key, self.fs.pipe_file, path, data, write=True)

    def read_json(self, key: str) -> Any:
        return json.loads(self.read_bytes(key))

    def write_json(self, key: str, obj: Any) -> None:
        # Keys keep the writer's order: a summary's table rows list their columns as the code does.
        self.write_bytes(key, json.dumps(obj, indent=1).encode())

    def open(self, key: str, mode: str = "rb") -> BinaryIO:
        path = self.path(key)
        if "w" in mode and self.protocol == "file":
            self.fs.makedirs(posixpath.dirname(path), exist_ok=True)
        return self._guard("opening", key, self.fs.open, path, mode)

    def _writer(self, key: str) -> _HashingWriter:
        """A streamed write of `key` whose errors (a failed part upload, the final PUT) name the URL."""
        return _HashingWriter(self.open(key, "wb"), url=self.url(key))

    def read_parquet(self, key: str, columns: list[str] | None = None):
        """A Parquet object as a pyarrow Table (small artifacts; big ones are streamed by their readers)."""
        import pyarrow.parquet as pq

        with self.open(key) as f:
            return self._guard("reading", key, pq.read_table, f, columns=columns)

    def size(self, key: str) -> int:
        return int(self._guard("stat", key, self.fs.size, self.path(key)))

    def delete(self, prefix: str) -> None:
        if self.exists(prefix):
            self._guard("deleting", prefix, self.fs.rm, self.path(prefix), recursive=True)

    def local_path(self, key: str) -> str | None:
        """The local filename of `key` when the store is a local folder (for mmap-style readers)."""
        return self.path(key) if self.protocol == "file" else None

    # -- artifacts --------------------------------------------------------------------------
    def manifest(self, prefix: str) -> Manifest | None:
        """The complete manifest under `prefix`, or None if the artifact was never finished."""
        key = f"{_check_key(prefix)}/{MANIFEST}"
        try:
            raw = self.read_bytes(key)
        except FileNotFoundError:
            return None
        try:
            data = json.loads(raw)
            manifest = Manifest(prefix=_check_key(prefix), **data)
            for name, entry in manifest.files.items():
                # Names and paths come from the store: a tampered manifest must not lead a reader
                # (or a local download of an artifact) outside the artifact.
                _relative_name(name)
                _relative_name(entry["path"])
                int(entry["bytes"]), str(entry["sha256"])
            return manifest
        except (ValueError, TypeError, KeyError, AttributeError, StoreError) as exc:
            raise StoreError(f"corrupt manifest {self.url(key)}: {exc}") from exc

    def artifact(self, prefix: str, fingerprint: str) -> ArtifactWriter:
        return ArtifactWriter(self, _check_key(prefix), fingerprint)

    def duckdb(self):
        """A DuckDB connection that reads this store's URLs through fsspec (no httpfs download)."""
        import duckdb

        con = duckdb.connect()
        if self.protocol != "file":
            con.register_filesystem(self.fs)
        return con

    def duckdb_path(self, key: str) -> str:
        return self.path(key) if self.protocol == "file" else self.url(key)


@dataclass
class Manifest:
    """What a finished artifact holds. `files` maps a logical name to {path, bytes, sha256}."""

    prefix: str
    fingerprint: str
    files: dict[str, dict[str, Any]]
    summary: dict[str, Any] = field(default_factory=dict)
    created: float = 0.0

    def key(self, name: str) -> str:
        if name not in self.files:
            raise StoreError(f"artifact {self.prefix} has no file {name!r} (has {sorted(self.files)})")
        return f"{self.prefix}/{self.files[name]['path']}"

    def names(self, prefix: str = "") -> list[str]:
        return sorted(n for n in self.files if n.startswith(prefix))

    @property
    def total_bytes(self) -> int:
        return sum(int(e["bytes"]) for e in self.files.values())


class _HashingWriter:
    """File wrapper that hashes and counts bytes as they are written (no second read pass).

    Errors of the underlying file (on S3: a block upload during write, the final PUT or multipart
    completion at close, each already retried per request by botocore) become StoreError naming `url`.
    """

    def __init__(self, f: BinaryIO, on_close=None, *, url: str = ""):
        self._f = f
        self._on_close = on_close
        self.url = url
        self.sha = hashlib.sha256()
        self.bytes = 0

    def write(self, data) -> int:
        self.sha.update(data)
        self.bytes += len(data)
        try:
            return self._f.write(data)
        except StoreError:
            raise
        except Exception as exc:
            raise StoreError(f"writing {self.url} failed: {type(exc).__name__}: {exc}") from exc

    def __getattr__(self, name):  # tell/flush/closed/... as the underlying file has them
        return getattr(self._f, name)

    def close(self):
        if not self._f.closed:
            try:
                self._f.close()
            except Exception as exc:
                raise StoreError(f"finishing {self.url} failed: {type(exc).__name__}: {exc}") from exc
            if self._on_close is not None:
                self._on_close(self)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class ArtifactWriter:
    """Context manager: write files, set a summary, and on success write the manifest last.

    On an exception the attempt folder is removed (best effort) and no manifest is written.
    """

    def __init__(self, store: ObjectStore, prefix: str, fingerprint: str):
        self.store = store
        self.prefix = prefix
        self.fingerprint = fingerprint
        self.attempt = f"{ATTEMPT_PREFIX}{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:8]}"
        self.files: dict[str, dict[str, Any]] = {}
        self.summary: dict[str, Any] = {}
        self._open: dict[str, _HashingWriter] = {}
        self._scratch: list[str] = []
        self._registered = False

    def key(self, name: str) -> str:
        return f"{self.prefix}/{self.attempt}/{_check_key(name)}"

    def _register(self) -> None:
        """Write this writer's record before any file, so no other committer takes the attempt for dead."""
        if not self._registered:
            host, pid = this_process()
            self.store.write_json(self.key(WRITER_RECORD), {"host": host, "pid": pid})
            self._registered = True

    def scratch(self, name: str) -> str:
        """A prefix beside the artifact for state a killed writer resumes from (resampling progress):
        deleted after the commit by the last writer of this prefix to finish, never under a live one."""
        key = f"{self.prefix}/{safe_component(name)}"
        self._scratch.append(key)
        return key

    def open(self, name: str) -> _HashingWriter:
        _relative_name(name)
        if name in self.files or name in self._open:
            raise StoreError(f"artifact {self.prefix}: file {name!r} written twice")
        self._register()
        w = self.store._writer(self.key(name))
        w._on_close = lambda w: self._record(name, w)
        self._open[name] = w
        return w

    def _record(self, name: str, w: _HashingWriter) -> None:
        # Called when a file is closed: only then are its size and hash final.
        self._open.pop(name, None)
        self.files[name] = {"path": f"{self.attempt}/{name}", "bytes": w.bytes, "sha256": w.sha.hexdigest()}

    def write_bytes(self, name: str, data: bytes) -> None:
        """A whole file at once: one object write, retried as a whole on transient faults."""
        _relative_name(name)
        if name in self.files or name in self._open:
            raise StoreError(f"artifact {self.prefix}: file {name!r} written twice")
        self._register()
        data = bytes(data)
        self.store.write_bytes(self.key(name), data)
        self.files[name] = {"path": f"{self.attempt}/{name}", "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}

    def write_json(self, name: str, obj: Any) -> None:
        self.write_bytes(name, json.dumps(obj, indent=1).encode())

    def __enter__(self) -> ArtifactWriter:
        self._register()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            for w in list(self._open.values()):
                try:
                    w._f.close()  # close without recording: this attempt is abandoned
                except Exception:
                    pass
            try:
                self.store.delete(f"{self.prefix}/{self.attempt}")
            except Exception:
                pass  # the orphan holds no manifest, so no reader ever sees it
            return
        for w in list(self._open.values()):
            w.close()
        try:
            current = self.store.manifest(self.prefix)
        except StoreError:
            current = None  # a corrupt manifest is replaced
        if current is not None and current.fingerprint == self.fingerprint:
            # Another writer committed this fingerprint first: its files are what readers use now.
            self.store.delete(f"{self.prefix}/{self.attempt}")
        else:
            self.store.write_json(f"{self.prefix}/{MANIFEST}", {
                "fingerprint": self.fingerprint,
                "files": self.files,
                "summary": self.summary,
                "created": time.time(),
            })
            self.store.delete(self.key(WRITER_RECORD))  # committed: no longer a live writer
        self._collect()

    def _collect(self) -> None:
        """Delete the attempts of dead writers that no manifest names, then, when no other writer
        is live, the scratch prefixes."""
        try:
            current = self.store.manifest(self.prefix)
        except StoreError:
            current = None
        named = {e["path"].split("/", 1)[0] for e in current.files.values()} if current else set()
        live = False
        for key in self.store.list(self.prefix):
            name = key.rsplit("/", 1)[-1]
            if not name.startswith(ATTEMPT_PREFIX) or name == self.attempt or name in named:
                continue
            if _writer_live(self.store, key):
                live = True
            else:
                self.store.delete(key)
        if not live:
            for key in self._scratch:
                self.store.delete(key)


def _writer_live(store: ObjectStore, attempt_key: str) -> bool:
    """Whether the attempt folder `attempt_key` may still be written: its record names a process
    that is not known to be gone, or its record is being written (a local temp file, or an empty
    folder). An attempt with files but no record is finished (committed, then replaced) or dead."""
    try:
        record = store.read_json(f"{attempt_key}/{WRITER_RECORD}")
    except FileNotFoundError:
        names = [k.rsplit("/", 1)[-1] for k in store.list(attempt_key, recursive=True)]
        return not names or any(n.startswith(WRITER_RECORD) for n in names)
    except ValueError:
        return True  # unreadable record: keep the attempt rather than guess
    return maybe_alive(str(record.get("host")), int(record.get("pid", -1)))


@dataclass(frozen=True)
class ArtifactRef:
    """What an asset hands downstream: where its finished artifact lives, never the data itself."""

    asset: str
    partition: str | None
    fingerprint: str
    prefix: str

    def to_json(self) -> dict[str, Any]:
        return {"asset": self.asset, "partition": self.partition, "fingerprint": self.fingerprint, "prefix": self.prefix}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ArtifactRef:
        return cls(data["asset"], data.get("partition"), data["fingerprint"], data["prefix"])
