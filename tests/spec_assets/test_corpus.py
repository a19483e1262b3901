"""source_corpus materialized in-process, its cache hit, and corpus_sensor, on local disk and S3."""

import json

import dagster as dg
import pytest

from spec_assets.corpus import corpus_sensor, source_corpus
from spec_assets.partitions import corpus_shards
from tests.spec_assets.conftest import make_resources
from training.demo.corpus import write_demo_corpus
from training.storage import ArtifactRef, ObjectStore


@pytest.fixture
def corpus_dir(tmp_path):
    folder = tmp_path / "corpus"
    write_demo_corpus(folder, n_shards=2, rows_per_shard=40, seed=0)
    # One file with bad rows next to the good shards: rejects, not failures.
    (folder / "mixed-00000.jsonl").write_text(
        json.dumps({"id": "ok", "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]})
        + "\n{not json\n"
        + json.dumps({"id": "noasst", "messages": [{"role": "user", "content": "hi"}]})
        + "\n"
    )
    return folder


def _materialize(instance, resources, shard):
    instance.add_dynamic_partitions(corpus_shards.name, [shard])
    result = dg.materialize([source_corpus], instance=instance, resources=resources, partition_key=shard)
    (mat,) = result.asset_materializations_for_node("source_corpus")
    return result, mat


def test_source_corpus_on_demo_shard_then_cache_hit(instance, corpus_dir, tmp_path):
    resources = make_resources((tmp_path / "store").as_uri(), str(corpus_dir))
    result, mat = _materialize(instance, resources, "demo-00000")
    md = mat.metadata
    assert md["cache_hit"].value is False
    assert md["rows_read"].value == 40 and md["rows_accepted"].value == 40 and md["rows_rejected"].value == 0
    assert "first user turn" in [c.name for c in md["preview"].schema.columns]  # a table, one row per conversation
    assert len(md["preview"].records) == 5
    ref = result.output_for_node("source_corpus")
    assert isinstance(ref, ArtifactRef) and ref.partition == "demo-00000"

    store = ObjectStore((tmp_path / "store").as_uri())
    manifest = store.manifest(ref.prefix)
    table = store.read_parquet(manifest.key("data.parquet"))
    heldout = store.read_parquet(manifest.key("heldout.parquet"))
    assert table.column_names[:3] == ["id", "messages", "source"]
    assert table.num_rows == md["rows_train"].value and heldout.num_rows == md["rows_heldout"].value
    assert table.num_rows + heldout.num_rows == 40 and table.num_rows > heldout.num_rows

    again, mat2 = _materialize(instance, resources, "demo-00000")
    assert mat2.metadata["cache_hit"].value is True
    assert mat2.metadata["fingerprint"].value == md["fingerprint"].value
    # The same DataVersion: Dagster sees nothing new downstream.
    versions = [
        instance.get_latest_data_version_record(dg.AssetKey("source_corpus"), partition_key="demo-00000")
    ]
    assert versions[0] is not None
    assert again.output_for_node("source_corpus") == ref


def test_rejects_are_counted_with_reasons(instance, corpus_dir, tmp_path):
    resources = make_resources((tmp_path / "store").as_uri(), str(corpus_dir))
    _, mat = _materialize(instance, resources, "mixed-00000")
    md = mat.metadata
    assert md["rows_read"].value == 3
    assert md["rows_accepted"].value == 1 and md["rows_rejected"].value == 2
    assert md["rows_read"].value == md["rows_accepted"].value + md["rows_rejected"].value
    assert set(md["rejects_by_reason"].value) == {"malformed_json", "no_assistant_turn"}


def test_many_distinct_reasons_fold_into_one_count(instance, corpus_dir, tmp_path):
    from spec_assets.metadata import MAX_REASONS

    lines = [json.dumps({"messages": [{"role": f"bogus{i}", "content": "x"}, {"role": "assistant", "content": "y"}]})
             for i in range(MAX_REASONS + 10)]
    (corpus_dir / "roles-00000.jsonl").write_text("\n".join(lines) + "\n")
    resources = make_resources((tmp_path / "store").as_uri(), str(corpus_dir))
    result, mat = _materialize(instance, resources, "roles-00000")
    reasons = mat.metadata["rejects_by_reason"].value
    assert len(reasons) == MAX_REASONS + 1 and reasons["(10 more reasons)"] == 10
    assert sum(reasons.values()) == mat.metadata["rows_rejected"].value == MAX_REASONS + 10
    # rejects.parquet keeps every row with its own reason.
    store = ObjectStore((tmp_path / "store").as_uri())
    rejects = store.read_parquet(store.manifest(result.output_for_node("source_corpus").prefix).key("rejects.parquet"))
    assert sorted(rejects.column("reason").to_pylist()) == sorted(f"unknown_role:bogus{i}" for i in range(MAX_REASONS + 10))


def test_changed_file_gets_a_new_fingerprint(instance, corpus_dir, tmp_path):
    resources = make_resources((tmp_path / "store").as_uri(), str(corpus_dir))
    _, first = _materialize(instance, resources, "mixed-00000")
    with open(corpus_dir / "mixed-00000.jsonl", "a") as f:
        f.write(json.dumps({"prompt": "p", "completion": "c"}) + "\n")
    _, second = _materialize(instance, resources, "mixed-00000")
    assert second.metadata["cache_hit"].value is False
    assert second.metadata["fingerprint"].value != first.metadata["fingerprint"].value
    assert second.metadata["rows_read"].value == 4


def test_source_corpus_reads_and_writes_s3(instance, corpus_dir, s3_bucket):
    from training.storage import ObjectStore

    corpus_store = ObjectStore(f"{s3_bucket}/corpus")
    for path in sorted(corpus_dir.glob("demo-*.jsonl")):
        corpus_store.write_bytes(path.name, path.read_bytes())
    resources = make_resources(f"{s3_bucket}/store", f"{s3_bucket}/corpus")
    _, mat = _materialize(instance, resources, "demo-00001")
    assert mat.metadata["rows_accepted"].value == 40
    assert str(mat.metadata["path"].value).startswith(f"{s3_bucket}/store/source_corpus/demo-00001/")
    _, again = _materialize(instance, resources, "demo-00001")
    assert again.metadata["cache_hit"].value is True


def test_missing_shard_file_fails_with_its_name(instance, corpus_dir, tmp_path):
    resources = make_resources((tmp_path / "store").as_uri(), str(corpus_dir))
    instance.add_dynamic_partitions(corpus_shards.name, ["gone-00009"])
    with pytest.raises(dg.Failure, match="gone-00009"):
        dg.materialize([source_corpus], instance=instance, resources=resources, partition_key="gone-00009")


def test_corpus_sensor_adds_and_removes_partitions_with_files(instance, corpus_dir):
    from resources.corpus_source import CorpusSourceResource

    corpus = CorpusSourceResource(location=str(corpus_dir))
    ctx = dg.build_sensor_context(instance=instance, resources={"corpus": corpus})
    result = corpus_sensor(ctx)
    (added,) = result.dynamic_partitions_requests
    assert sorted(added.partition_keys) == ["demo-00000", "demo-00001", "mixed-00000"]
    assert sorted(r.partition_key for r in result.run_requests) == sorted(added.partition_keys)
    instance.add_dynamic_partitions(corpus_shards.name, added.partition_keys)

    # Nothing new: no requests. A new file: one partition and one run.
    quiet = corpus_sensor(dg.build_sensor_context(instance=instance, resources={"corpus": corpus}, cursor=result.cursor))
    assert not quiet.dynamic_partitions_requests and not quiet.run_requests
    (corpus_dir / "extra-00001.jsonl").write_text(
        json.dumps({"prompt": "2+2?", "completion": "4"}) + "\n"
    )
    more = corpus_sensor(dg.build_sensor_context(instance=instance, resources={"corpus": corpus}, cursor=result.cursor))
    assert more.dynamic_partitions_requests[0].partition_keys == ["extra-00001"]
    assert [r.partition_key for r in more.run_requests] == ["extra-00001"]
    instance.add_dynamic_partitions(corpus_shards.name, ["extra-00001"])

    # A file that is gone: its partition is deleted, nothing runs.
    (corpus_dir / "mixed-00000.jsonl").unlink()
    gone = corpus_sensor(dg.build_sensor_context(instance=instance, resources={"corpus": corpus}, cursor=more.cursor))
    (deleted,) = gone.dynamic_partitions_requests
    assert isinstance(deleted, dg.DeleteDynamicPartitionsRequest)
    assert deleted.partition_keys == ["mixed-00000"] and not gone.run_requests
