"""draft_model trains offline on the layers hidden_states stored: both must name the same draft family,
else a clear failure before any training (naming both settings and what to set)."""

import dagster as dg
import pytest

from resources.generation_backend import GenerationBackendResource
from resources.target_model import TargetModelResource
from spec_assets.cli import failure_messages
from spec_assets.definitions import per_shard_assets
from spec_assets.draft import check_feature_family, draft_model
from spec_assets.partitions import corpus_shards
from spec_assets.tokenize import vocab_map
from tests.spec_assets.conftest import make_resources
from training.demo.corpus import write_demo_corpus
from training.storage import ArtifactRef, artifact_prefix

SHARD = "demo-00000"


def test_draft_model_refuses_features_of_another_family(instance, tmp_path, tiny_target):
    write_demo_corpus(tmp_path / "corpus", n_shards=1, rows_per_shard=8, seed=0)
    target = TargetModelResource(target=str(tiny_target), device="cpu")
    res = make_resources((tmp_path / "store").as_uri(), str(tmp_path / "corpus"), target=target,
                         generator=GenerationBackendResource(target=target))
    instance.add_dynamic_partitions(corpus_shards.name, [SHARD])
    shard = dg.materialize(per_shard_assets, instance=instance, resources=res, partition_key=SHARD,
                           run_config={"ops": {"resampled_corpus": {"config": {"resample": False}}}})
    (features,) = shard.asset_materializations_for_node("hidden_states")
    assert features.metadata["draft_family"].value == "eagle3"  # the default family's layers, recorded

    result = dg.materialize([*per_shard_assets, vocab_map, draft_model], selection=["vocab_map", "draft_model"],
                            instance=instance, resources=res, raise_on_error=False,
                            run_config={"ops": {"draft_model": {"config": {"draft_family": "dflash"}}}})
    (message,) = failure_messages(result)
    assert message.startswith("draft_model: ") and ("draft_model's draft_family is 'dflash' but hidden_states "
                                                     "[demo-00000] stored the target layers of 'eagle3'") in message
    assert "set hidden_states' draft_family to 'dflash' as well" in message
    assert result.asset_materializations_for_node("draft_model") == []


def test_features_that_name_no_family_are_refused_with_what_to_do(local_store):
    """A hidden_states artifact written before the family was recorded (code version 3)."""
    refs = {}
    for shard, family in (("a", "dflash"), ("b", None), ("c", None)):
        prefix = artifact_prefix("hidden_states", shard, f"fp{shard}")
        with local_store.artifact(prefix, f"fp{shard}") as writer:
            writer.write_json("x.json", {})
            writer.summary = {"draft_family": family} if family else {}
        refs[shard] = ArtifactRef("hidden_states", shard, f"fp{shard}", prefix)
    check_feature_family(local_store, {"a": refs["a"]}, "dflash")  # the same family: no complaint
    with pytest.raises(dg.Failure, match=r"hidden_states \[b\] and 1 more shards does not record whose layers .* "
                                         r"materialize hidden_states again with draft_family: 'dflash'"):
        check_feature_family(local_store, refs, "dflash")
