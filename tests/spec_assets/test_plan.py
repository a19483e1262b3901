"""The currentness judge of `specdraft run --only-stale-or-missing` on a real (ephemeral) instance:
what an input change, a new or gone shard, or an input the asset never read means for an asset
partition, judged from the fingerprints its materialization recorded as `inputs`."""

from __future__ import annotations

import dagster as dg
import pytest

from spec_assets.definitions import defs
from spec_assets.plan import AssetGraph, CurrentnessJudge

SHARDS = "corpus_shards"


@pytest.fixture
def judged():
    with dg.DagsterInstance.ephemeral() as instance:
        instance.add_dynamic_partitions(SHARDS, ["a", "b"])
        judge = CurrentnessJudge(instance, defs, AssetGraph(defs.assets), {}, None, {})

        def report(asset: str, partition: str | None, fingerprint: str, inputs: dict | None = None):
            metadata = {"fingerprint": fingerprint}
            if inputs is not None:
                metadata["inputs"] = dg.MetadataValue.json(inputs)
            instance.report_runless_asset_event(dg.AssetMaterialization(asset, partition=partition, metadata=metadata))

        def changed(asset: str, partition: str | None = None) -> str | None:
            key = dg.AssetKey(asset)
            return judge._changed_input(key, partition, judge._latest(key, partition))

        yield instance, report, changed


def test_a_shard_input_is_judged_by_the_fingerprint_it_read_whatever_committed_after(judged):
    instance, report, changed = judged
    report("source_corpus", "a", "src-a")
    report("resampled_corpus", "a", "res-a", {"source_corpus": "src-a"})
    # Another shard's run commits its source_corpus later (concurrent runs on PostgreSQL can leave
    # Dagster's input pointer behind this run's own input): nothing about shard a changed.
    report("source_corpus", "b", "src-b")
    assert changed("resampled_corpus", "a") is None
    report("source_corpus", "a", "src-a")  # re-run as a cache hit: same fingerprint
    assert changed("resampled_corpus", "a") is None
    report("source_corpus", "a", "src-a2")
    assert changed("resampled_corpus", "a") == "input source_corpus [a] changed"
    report("resampled_corpus", "b", "res-b", {"source_corpus": "src-b"})
    instance.add_dynamic_partitions(SHARDS, ["c"])
    report("resampled_corpus", "c", "res-c", {"source_corpus": "src-c"})
    assert changed("resampled_corpus", "c") == "input source_corpus [c] missing"


def test_a_fan_in_sees_a_new_a_gone_and_a_changed_shard(judged):
    instance, report, changed = judged
    report("tokenized_shards", "a", "tok-a")
    report("tokenized_shards", "b", "tok-b")
    report("vocab_map", None, "vocab", {"tokenized_shards/a": "tok-a", "tokenized_shards/b": "tok-b"})
    assert changed("vocab_map") is None
    instance.add_dynamic_partitions(SHARDS, ["c"])
    report("tokenized_shards", "c", "tok-c")
    assert changed("vocab_map") == "input tokenized_shards [c] new"
    instance.delete_dynamic_partition(SHARDS, "c")
    assert changed("vocab_map") is None
    instance.delete_dynamic_partition(SHARDS, "b")
    assert changed("vocab_map") == "input tokenized_shards [b] gone"
    instance.add_dynamic_partitions(SHARDS, ["b"])
    report("tokenized_shards", "b", "tok-b2")
    assert changed("vocab_map") == "input tokenized_shards [b] changed"


def test_a_parent_it_did_not_read_does_not_count_and_unrecorded_inputs_are_not_current(judged):
    _, report, changed = judged
    for shard in ("a", "b"):
        report("hidden_states", shard, f"hs-{shard}")
        report("tokenized_shards", shard, f"tok-{shard}")
    report("vocab_map", None, "vocab")
    # Offline training read hidden_states and vocab_map, not tokenized_shards.
    report("draft_model", None, "draft", {"hidden_states/a": "hs-a", "hidden_states/b": "hs-b", "vocab_map": "vocab"})
    report("tokenized_shards", "a", "tok-a2")
    assert changed("draft_model") is None
    report("vocab_map", None, "vocab2")
    assert changed("draft_model") == "input vocab_map changed"
    # A materialization that recorded no inputs (made before specdraft recorded them) runs once more.
    report("draft_model", None, "draft")
    assert changed("draft_model") == "inputs not recorded"
