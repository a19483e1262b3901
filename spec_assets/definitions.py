"""All Dagster definitions in one place: `dagster dev -w workspace.yaml` loads this module."""

import os

import dagster as dg

from resources.corpus_source import CorpusSourceResource
from resources.object_store import ArtifactRefIOManager, ObjectStoreResource
from resources.target_model import TargetModelResource
from spec_assets import corpus
from spec_assets.partitions import corpus_shards


def _from_env(name: str):
    """EnvVar when the variable is set (the UI shows its name, not its value), else the resource's default."""
    return dg.EnvVar(name) if os.environ.get(name) else ""


object_store = ObjectStoreResource(root=_from_env("SPECDRAFT_ROOT"))

per_shard_assets = [corpus.source_corpus]
fan_in_assets: list = []

shard_job = dg.define_asset_job(
    "shard_job",
    selection=dg.AssetSelection.assets(*per_shard_assets),
    partitions_def=corpus_shards,
    description="Per-shard stages for one corpus shard: pick the partition in the launchpad.",
)

defs = dg.Definitions(
    assets=[*per_shard_assets, *fan_in_assets],
    sensors=[corpus.corpus_sensor],
    jobs=[shard_job],
    resources={
        "object_store": object_store,
        "artifact_refs": ArtifactRefIOManager(object_store=object_store),
        "corpus": CorpusSourceResource(location=_from_env("SPECDRAFT_CORPUS")),
        "target": TargetModelResource(target=_from_env("SPECDRAFT_TARGET")),
    },
)
