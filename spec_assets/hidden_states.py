"""Stage 4: the target's aux and final hidden states per shard, packed without padding, on the object store."""

import dagster as dg

from resources.object_store import ObjectStoreResource
from resources.ray_cluster import RayClusterResource
from resources.target_model import TargetModelResource
from spec_assets.artifact_step import materialize_artifact
from spec_assets.instance import target_pool
from spec_assets.partitions import corpus_shards
from spec_assets.stage_config import stage_config
from training.configs import FeatureConfig
from training.storage import ArtifactRef


class HiddenStatesConfig(stage_config(FeatureConfig)):
    """hidden_states's settings: training.configs.FeatureConfig's fields."""


def _iter_rows(store, key: str, batch_rows: int = 256):
    """(input_ids, loss_mask, id) per row, streamed from the tokenized Parquet a record batch at a time
    (the id names the row in the writer's errors)."""
    import pyarrow.parquet as pq

    with store.open(key) as f:
        for batch in pq.ParquetFile(f).iter_batches(batch_size=batch_rows, columns=["id", "input_ids", "loss_mask"]):
            yield from zip(batch.column("input_ids").to_pylist(), batch.column("loss_mask").to_pylist(),
                           batch.column("id").to_pylist())


@dg.asset(
    partitions_def=corpus_shards,
    # 2: aux ids vLLM and SGLang cannot feed are refused, small targets get distinct default ids,
    # inf/NaN features are refused. 3: parts written by safetensors' own writer (its tensor order
    # and header, not ours): the same tensors, other bytes. 4: the summary names the draft family
    # whose layers it stored (draft_model refuses features of another family).
    code_version="4",
    pool=target_pool(),  # loads the target: one step per device slot across runs (spec_assets/instance.py)
    group_name="features",
    io_manager_key="artifact_refs",
    kinds={"safetensors"},
    automation_condition=dg.AutomationCondition.eager() | dg.AutomationCondition.code_version_changed(),
)
def hidden_states(
    context: dg.AssetExecutionContext,
    config: HiddenStatesConfig,
    tokenized_shards: ArtifactRef,
    object_store: ObjectStoreResource,
    target: TargetModelResource,
    ray_cluster: RayClusterResource,
) -> dg.Output:
    """Offline features for draft training: aux [T, 3H] and last [T, H] per token, in parts of at most part_bytes."""
    from training.hidden_states import write_hidden_states

    store = object_store.store()
    tokenized = store.manifest(tokenized_shards.prefix)

    def build(writer):
        from training.aux_layers import family_layer_ids

        # Local, or Ray actors holding the target compute the writer's batches (SPECDRAFT_RAY_ADDRESS).
        model = ray_cluster.feature_target(target, log=context.log.info)
        # Resolved and checked before any actor starts on a batch; the summary (also the writer's)
        # names the aux ids used and the hidden size.
        aux_ids = family_layer_ids(config.draft_family, config.aux_layer_ids, model.facts.num_layers,
                                   where=f"hidden_states {context.partition_key}")
        rows = ray_cluster.prefetch(model, _iter_rows(store, tokenized.key("data.parquet")),
                                    config.max_tokens_per_batch, aux_ids)
        write_hidden_states(model, rows, writer, log=context.log.info, shard=context.partition_key,
                            **{**config.model_dump(), "aux_layer_ids": list(aux_ids)})

    return materialize_artifact(
        context, store, build=build, upstream={"tokenized_shards": tokenized_shards.fingerprint},
        config=config.model_dump(), target=target.identity(),
    )
