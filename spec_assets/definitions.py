"""All Dagster definitions in one place: `dagster dev -w workspace.yaml` loads this module."""

import os

import dagster as dg

from resources.corpus_source import CorpusSourceResource
from resources.generation_backend import GenerationBackendResource
from resources.object_store import ArtifactRefIOManager, ObjectStoreResource
from resources.ray_cluster import RayClusterResource
from resources.target_model import TargetModelResource
from spec_assets import corpus, draft, evaluation, hidden_states, resample, tokenize
from spec_assets.partitions import corpus_shards


def _from_env(name: str):
    """EnvVar when the variable is set (the UI shows its name, not its value), else the resource's
    default. Read when the definitions are built, so a set variable resolves at run time."""
    return dg.EnvVar(name) if os.environ.get(name) else ""


def build_resources() -> dict:
    """The resources, every deployment setting wired from its environment variable: here and nowhere
    else (resources/ never read os.environ; README "Configuration" lists the variables)."""
    object_store = ObjectStoreResource(root=_from_env("SPECDRAFT_ROOT"))
    target = TargetModelResource(target=_from_env("SPECDRAFT_TARGET"), backend=_from_env("SPECDRAFT_BACKEND") or "hf",
                                 chat_template_kwargs=_from_env("SPECDRAFT_CHAT_TEMPLATE_KWARGS"))
    return {
        "object_store": object_store,
        "artifact_refs": ArtifactRefIOManager(object_store=object_store),
        "corpus": CorpusSourceResource(location=_from_env("SPECDRAFT_CORPUS"),
                                       eval_prompts=_from_env("SPECDRAFT_EVAL_PROMPTS")),
        "target": target,
        "generator": GenerationBackendResource(target=target, base_url=_from_env("OPENAI_BASE_URL")),
        "ray_cluster": RayClusterResource(address=_from_env("SPECDRAFT_RAY_ADDRESS")),
    }


per_shard_assets = [corpus.source_corpus, resample.resampled_corpus, tokenize.tokenized_shards,
                    hidden_states.hidden_states]
fan_in_assets = [tokenize.vocab_map, draft.draft_model, evaluation.eval_report, evaluation.released_draft]
all_assets = [*per_shard_assets, *fan_in_assets]

shard_job = dg.define_asset_job(
    "shard_job",
    selection=dg.AssetSelection.assets(*per_shard_assets),
    partitions_def=corpus_shards,
    description="Per-shard stages for one corpus shard: pick the partition in the launchpad.",
)
train_job = dg.define_asset_job(
    "train_job",
    selection=dg.AssetSelection.assets(*fan_in_assets),
    description="Fan-in stages over every shard: vocabulary, draft training and export, evaluation, release.",
)

automation = dg.AutomationConditionSensorDefinition(
    "specdraft_automation",
    target=dg.AssetSelection.all(),
    default_status=dg.DefaultSensorStatus.STOPPED,
    minimum_interval_seconds=60,
    description="Runs the per-shard stages for new shards and rebuilds what a code change made stale.",
)


def build_defs() -> dg.Definitions:
    """The code location's Definitions over the environment as it is now: `specdraft` builds them per
    command, the code server (dagster dev, the daemon, step processes) once at load."""
    return dg.Definitions(
        assets=all_assets,
        sensors=[corpus.corpus_sensor, automation],
        schedules=[draft.nightly_retrain],
        jobs=[shard_job, train_job],
        resources=build_resources(),
    )


defs = build_defs()
