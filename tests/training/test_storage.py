"""One suite for the object store, run against a local folder and a real S3 API server on loopback."""

import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from training.storage import ObjectStore, StoreError, artifact_prefix
from tests.training.manifest_check import verify_manifest


def test_bytes_json_exists_list_delete(store):
    assert not store.exists("a/b.txt")
    store.write_bytes("a/b.txt", b"hello")
    store.write_json("a/c.json", {"x": 1})
    assert store.exists("a/b.txt")
    assert store.read_bytes("a/b.txt") == b"hello"
    assert store.read_json("a/c.json") == {"x": 1}
    assert store.list("a") == ["a/b.txt", "a/c.json"]
    assert store.size("a/b.txt") == 5
    store.delete("a")
    assert not store.exists("a/b.txt")
    assert store.list("a") == []


def test_missing_object_raises_file_not_found(store):
    with pytest.raises(FileNotFoundError):
        store.read_bytes("nope/missing.bin")


def test_artifact_manifest_written_last_with_hashes(store):
    prefix = artifact_prefix("source_corpus", "demo-00000", "fp0001")
    table = pa.table({"id": ["a", "b"], "n": [1, 2]})
    with store.artifact(prefix, "fp0001") as art:
        with art.open("data.parquet") as f:
            pq.write_table(table, f)
        # Inside the block the artifact is invisible to readers.
        assert store.manifest(prefix) is None
        art.write_json("stats.json", {"rows": 2})
        art.summary = {"rows": 2}
    m = store.manifest(prefix)
    assert m is not None and m.fingerprint == "fp0001" and m.summary == {"rows": 2}
    assert set(m.files) == {"data.parquet", "stats.json"}
    data = store.read_bytes(m.key("data.parquet"))
    assert m.files["data.parquet"]["sha256"] == hashlib.sha256(data).hexdigest()
    assert m.files["data.parquet"]["bytes"] == len(data)
    with store.open(m.key("data.parquet")) as f:
        assert pq.read_table(f).equals(table)
    verify_manifest(store, m)


def test_failed_writer_leaves_no_manifest_and_no_files(store):
    prefix = artifact_prefix("x", None, "fp")
    with pytest.raises(ValueError):
        with store.artifact(prefix, "fp") as art:
            art.write_bytes("part-0", b"0" * 100)
            raise ValueError("killed mid-write")
    assert store.manifest(prefix) is None
    assert store.list(prefix, recursive=True) == []


def test_rewrite_replaces_orphaned_attempts(store):
    prefix = "x/_/fp"
    # An attempt that died before its manifest (as after kill -9) leaves an orphan folder.
    store.write_bytes(f"{prefix}/attempt-dead/part-0", b"partial")
    with store.artifact(prefix, "fp") as art:
        art.write_bytes("part-0", b"complete")
    m = store.manifest(prefix)
    assert store.read_bytes(m.key("part-0")) == b"complete"
    assert not any("attempt-dead" in k for k in store.list(prefix, recursive=True))


# A second writer of the same fingerprint, in its own process: it saves resampling progress and one
# file, says so, waits for `go`, then writes another file, commits and reads back what readers see.
_SECOND_WRITER = r"""
import json, sys, time
from pathlib import Path
from training.storage import ObjectStore

root, prefix, go = sys.argv[1:4]
store = ObjectStore(root)
with store.artifact(prefix, "fp") as w:
    store.write_bytes(w.scratch("_progress") + "/chunk-000001.parquet", b"rows")
    w.write_bytes("part-0", b"0" * 1000)
    Path(go + ".started").touch()
    while not Path(go).exists():
        time.sleep(0.05)
    w.write_bytes("part-1", b"1" * 1000)
m = store.manifest(prefix)
print(json.dumps({name: store.read_bytes(m.key(name))[:1].decode() for name in m.names()}))
"""


def test_two_writers_of_one_fingerprint_at_once_both_read_a_complete_manifest(store, tmp_path):
    """Two processes write the same artifact at once and this one commits first, half-way through
    the other's attempt: neither deletes the other's files, both read a complete manifest, and the
    resampling progress stays until the last of them finishes."""
    prefix, go = "x/_/fp", tmp_path / "go"
    other = subprocess.Popen([sys.executable, "-c", _SECOND_WRITER, store.root, prefix, str(go)],
                             cwd=Path(__file__).resolve().parents[2], stdout=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 60
        while not Path(f"{go}.started").exists():
            assert other.poll() is None and time.time() < deadline, "the second writer did not start"
            time.sleep(0.05)
        with store.artifact(prefix, "fp") as w:
            progress = w.scratch("_progress")
            w.write_bytes("part-0", b"0" * 1000)
            w.write_bytes("part-1", b"1" * 1000)
        verify_manifest(store, store.manifest(prefix))
        assert store.list(progress), "progress cleared under a live writer"
        go.touch()
        out, _ = other.communicate(timeout=60)
    finally:
        if other.poll() is None:
            other.kill()
    assert other.returncode == 0
    assert json.loads(out) == {"part-0": "0", "part-1": "1"}
    verify_manifest(store, store.manifest(prefix))
    assert store.list(progress) == []  # the last writer to finish deleted it
    assert len([k for k in store.list(prefix) if "/attempt-" in k]) == 1


def test_a_commit_deletes_dead_writers_attempts_only(store):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    prefix = "x/_/fp"
    records = {"attempt-dead": {"host": __import__("socket").gethostname(), "pid": dead.pid},
               "attempt-elsewhere": {"host": "other-host", "pid": dead.pid}}
    for attempt, record in records.items():
        store.write_json(f"{prefix}/{attempt}/_writer.json", record)
        store.write_bytes(f"{prefix}/{attempt}/part-0", b"partial")
    with store.artifact(prefix, "fp") as art:
        art.write_bytes("part-0", b"complete")
        progress = art.scratch("_progress")
        store.write_bytes(f"{progress}/chunk-000001.parquet", b"rows")
    names = {k.split("/")[3] for k in store.list(prefix, recursive=True)}
    # Another host's writer cannot be told dead from here: its attempt and the progress stay.
    assert "attempt-dead" not in names and "attempt-elsewhere" in names and "_progress" in names
    assert not any(k.endswith("_writer.json") and "elsewhere" not in k for k in store.list(prefix, recursive=True))


def test_verify_detects_corruption(store):
    with store.artifact("x/_/fp", "fp") as art:
        art.write_bytes("blob", b"original")
    m = store.manifest("x/_/fp")
    store.write_bytes(m.key("blob"), b"tampered")
    with pytest.raises(AssertionError, match="sha256"):
        verify_manifest(store, m)


def test_corrupt_manifest_is_a_clear_error(store):
    store.write_bytes("x/_/fp/manifest.json", b"{not json")
    with pytest.raises(StoreError, match="corrupt manifest .*x/_/fp/manifest.json"):
        store.manifest("x/_/fp")


@pytest.mark.parametrize("key", ["../escape", "a/../../b", "a/./b", "a\\..\\b"])
def test_keys_cannot_escape_the_root(store, key):
    with pytest.raises(StoreError, match="escapes"):
        store.write_bytes(key, b"x")


@pytest.mark.parametrize("shard", ["..", "a/b", ".", "a\\b"])
def test_artifact_prefix_rejects_path_components(shard):
    assert artifact_prefix("asset", None, "fp") == "asset/_/fp"
    with pytest.raises(StoreError, match="invalid path component"):
        artifact_prefix("asset", shard, "fp")


def test_duckdb_reads_parquet_from_the_store(store):
    with store.artifact("t/_/fp", "fp") as art:
        with art.open("data.parquet") as f:
            pq.write_table(pa.table({"v": list(range(10))}), f)
    m = store.manifest("t/_/fp")
    con = store.duckdb()
    total = con.execute("select sum(v) from read_parquet(?)", [store.duckdb_path(m.key("data.parquet"))]).fetchone()[0]
    assert total == 45


def test_unsupported_scheme_is_rejected():
    with pytest.raises(StoreError, match="unsupported"):
        ObjectStore("ftp://host/path")


def test_unreachable_s3_endpoint_names_the_url(monkeypatch):
    from tests.conftest import S3_ENV, free_port

    for k, v in S3_ENV.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    store = ObjectStore("s3://nobucket/prefix", storage_options={"config_kwargs": {"connect_timeout": 1, "retries": {"max_attempts": 1}}, "retries": 1})
    with pytest.raises(StoreError, match="s3://nobucket/prefix/k"):
        store.write_bytes("k", b"x")


def test_manifest_json_is_plain_json(local_store):
    with local_store.artifact("x/_/fp", "fp") as art:
        art.write_bytes("a", b"1")
    raw = json.loads(local_store.read_bytes("x/_/fp/manifest.json"))
    assert raw["fingerprint"] == "fp" and raw["files"]["a"]["bytes"] == 1
