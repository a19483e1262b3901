"""Stage 4: the target's aux and final hidden states per shard, packed without padding, on the object store."""

import dagster as dg

from resources.object_store import ObjectStoreResource
from resources.ray_cluster import RayClusterResource
from resources.target_model import TargetModelResource
from spec_assets.artifact_step import materialize_artifact
from spec_assets.instance import target_pool
from spec_assets.partitions import corpus_shards
from training.storage import ArtifactRef


class HiddenStatesConfig(dg.Config):
    max_tokens_per_batch: int = 8192
    part_bytes: int = 1 << 30
    dtype: str = "bf16"  # bf16 | fp8 (e4m3 with per-row scales)
    aux_layer_ids: list[int] = []  # empty: (2, L//2, L-3), vLLM's convention


def _iter_rows(store, key: str, batch_rows: int = 256):
    """(input_ids, loss_mask) per row, streamed from the tokenized Parquet a record batch at a time."""
    import pyarrow.parquet as pq

    with store.open(key) as f:
        for batch in pq.ParquetFile(f).iter_batches(batch_size=batch_rows, columns=["input_ids", "loss_mask"]):
            yield from zip(batch.column("input_ids").to_pylist(), batch.column("loss_mask").to_pylist())


@dg.asset(
    partitions_def=corpus_shards,
    code_version="1",
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
    from training.targets import default_aux_layer_ids

    store = object_store.store()
    tokenized = store.manifest(tokenized_shards.prefix)

    def build(writer):
        # Local, or Ray actors holding the target compute the writer's batches (SPECDRAFT_RAY_ADDRESS).
        model = ray_cluster.feature_target(target, log=context.log.info)
        aux_ids = tuple(config.aux_layer_ids) or default_aux_layer_ids(model.facts.num_layers)
        rows = ray_cluster.prefetch(model, _iter_rows(store, tokenized.key("data.parquet")),
                                    config.max_tokens_per_batch, aux_ids)
        summary = write_hidden_states(
            model, rows, writer,
            aux_layer_ids=aux_ids, max_tokens_per_batch=config.max_tokens_per_batch,
            part_bytes=config.part_bytes, dtype=config.dtype, log=context.log.info,
        )
        writer.summary = {**summary, "aux_layer_ids": list(aux_ids), "hidden_size": model.facts.hidden_size}

    return materialize_artifact(
        context, store, build=build, upstream={"tokenized_shards": tokenized_shards.fingerprint},
        config=config.model_dump(), target=target.identity(),
    )
