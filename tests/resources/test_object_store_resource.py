import dagster as dg
import pytest

from resources.object_store import ArtifactRefIOManager, ObjectStoreResource
from training.storage import ArtifactRef


def test_root_is_the_field_else_the_project_data_folder(monkeypatch, tmp_path):
    monkeypatch.setenv("SPECDRAFT_DATA_DIR", str(tmp_path))
    assert ObjectStoreResource(root=(tmp_path / "x").as_uri()).store().root == (tmp_path / "x").as_uri()
    # The resource never reads SPECDRAFT_ROOT itself: definitions.py wires it (tests/spec_assets/test_definitions.py).
    monkeypatch.setenv("SPECDRAFT_ROOT", (tmp_path / "r").as_uri())
    assert ObjectStoreResource().store().root == (tmp_path / "store").as_uri()


def test_io_manager_round_trips_refs_per_shard_and_fan_in(tmp_path):
    shards = dg.StaticPartitionsDefinition(["a", "b"])
    store = ObjectStoreResource(root=(tmp_path / "s").as_uri())
    resources = {"artifact_refs": ArtifactRefIOManager(object_store=store)}

    @dg.asset(partitions_def=shards, io_manager_key="artifact_refs")
    def up(context):
        return ArtifactRef("up", context.partition_key, f"fp-{context.partition_key}", f"up/{context.partition_key}/fp")

    @dg.asset(partitions_def=shards, io_manager_key="artifact_refs")
    def per_shard(context, up: ArtifactRef):
        assert up.partition == context.partition_key
        return ArtifactRef("per_shard", context.partition_key, up.fingerprint, "x")

    @dg.asset(io_manager_key="artifact_refs")
    def fan_in(up: dict):
        assert sorted(up) == ["a", "b"] and up["b"].fingerprint == "fp-b"
        return ArtifactRef("fan_in", None, "f", "y")

    with dg.DagsterInstance.ephemeral() as instance:
        dg.materialize([up, per_shard], partition_key="a", resources=resources, instance=instance)
        with pytest.raises(dg.Failure, match="partition 'b' has not been materialized"):
            dg.materialize([up, fan_in], selection=[fan_in], resources=resources, instance=instance)
        dg.materialize([up], partition_key="b", resources=resources, instance=instance)
        assert dg.materialize([up, fan_in], selection=[fan_in], resources=resources, instance=instance).success
