"""Stage 5: the EAGLE-3 draft trained with training-time test, checkpointed, exported for vLLM/SGLang."""

import tempfile
from pathlib import Path
from typing import Optional

import dagster as dg

from resources.object_store import ObjectStoreResource, read_ref
from resources.target_model import TargetModelResource
from spec_assets.artifact_step import materialize_artifact
from spec_assets.instance import target_pool
from spec_assets.partitions import corpus_shards
from training.storage import ArtifactRef

EXPORT_FILES = ("config.json", "model.safetensors")


class DraftModelConfig(dg.Config):
    mode: str = "offline"  # offline: stored hidden_states; online: the target runs inside the trainer
    ttt_length: int = 7
    step_weight: float = 0.8
    lr: float = 3e-3
    epochs: int = 4
    max_steps: Optional[int] = None
    max_tokens_per_batch: int = 4096
    grad_accum: int = 1
    warmup_ratio: float = 0.05
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    seed: int = 0
    checkpoint_every: int = 100
    log_every: int = 10
    nproc: int = 1  # > 1 launches torchrun (gloo on CPU, NCCL on GPU)
    warm_start: bool = False  # start from the previous export (new data, same draft shape)

    def train_config(self) -> dict:
        keys = ("ttt_length", "step_weight", "lr", "epochs", "max_steps", "max_tokens_per_batch", "grad_accum",
                "warmup_ratio", "weight_decay", "grad_clip", "seed", "checkpoint_every", "log_every")
        return {k: getattr(self, k) for k in keys}


@dg.asset(
    deps=["hidden_states", "tokenized_shards"],
    code_version="1",
    pool=target_pool(),  # loads the target: one step per device slot across runs (spec_assets/instance.py)
    group_name="train",
    io_manager_key="artifact_refs",
    kinds={"pytorch", "safetensors"},
    # Training is the expensive step: new shards wait for nightly_retrain instead of each
    # triggering a run; a code change still rebuilds at once when automation is on.
    automation_condition=dg.AutomationCondition.code_version_changed(),
)
def draft_model(
    context: dg.AssetExecutionContext,
    config: DraftModelConfig,
    vocab_map: ArtifactRef,
    object_store: ObjectStoreResource,
    target: TargetModelResource,
) -> dg.Output:
    """EAGLE-3 draft trained on every shard (offline from hidden_states, or online), with its serving export."""
    if config.mode not in ("offline", "online"):
        raise dg.Failure(f"draft_model mode must be 'offline' or 'online', not {config.mode!r}")
    store = object_store.store()
    shards = sorted(context.instance.get_dynamic_partitions(corpus_shards.name))
    data_asset = "hidden_states" if config.mode == "offline" else "tokenized_shards"
    refs = {shard: read_ref(store, data_asset, shard) for shard in shards}
    upstream = {f"{data_asset}/{s}": r.fingerprint for s, r in refs.items()} | {"vocab_map": vocab_map.fingerprint}
    warm_from = None
    if config.warm_start:
        try:
            warm_from = read_ref(store, "draft_model")
        except dg.Failure:
            context.log.info("warm_start: no earlier draft_model, training from scratch")
        if warm_from is not None:
            upstream["warm_start"] = warm_from.fingerprint

    def build(writer):
        from training import train_main

        model_path = target.model_path()
        spec = {
            "store_root": store.root,
            # Checkpoints live under the fingerprint, outside the attempt folder: a killed run resumes.
            "run_prefix": f"{writer.prefix}/_run",
            "target_dir": model_path,
            "vocab_map": vocab_map.prefix,
            "train": config.train_config(),
        }
        if config.mode == "offline":
            spec["hidden_states"] = [r.prefix for r in refs.values()]
        else:
            spec["tokenized"] = [store.manifest(r.prefix).key("data.parquet") for r in refs.values()]
            spec["target"] = {"spec": model_path, "backend": "hf"}
        if warm_from is not None:
            spec["init_from"] = store.manifest(warm_from.prefix).key("export/model.safetensors")
        with tempfile.TemporaryDirectory() as tmp:
            spec["export_dir"] = str(Path(tmp) / "export")
            result = train_main.launch(spec, config.nproc, log=context.log.info)
            for name in EXPORT_FILES:
                writer.write_bytes(f"export/{name}", (Path(spec["export_dir"]) / name).read_bytes())
        acc_table = [
            {"k": k, "acc_k": round(a, 4), "conditional acceptance": round(c, 4)}
            for k, (a, c) in enumerate(zip(result["acc"], result["cond_acc"]))
        ]
        writer.summary = {
            "mode": config.mode,
            "shards": len(refs),
            "steps": result["steps"],
            "tokens_seen": result["tokens_seen"],
            "final_loss": round(result["final_loss"], 5),
            "simulated_acceptance_length": round(result["simulated_acceptance_length"], 4),
            "train_seconds": round(result["wall_seconds"], 1),
            "warm_start_from": warm_from.fingerprint if warm_from else None,
            "acc_by_step": acc_table,
            "export_path": store.url(writer.key("export")),
        }

    return materialize_artifact(
        context, store, build=build, upstream=upstream, config=config.model_dump(), target=target.identity()
    )


nightly_retrain = dg.ScheduleDefinition(
    name="nightly_retrain",
    cron_schedule="0 2 * * *",
    target=dg.AssetSelection.assets("vocab_map", "draft_model", "eval_report", "released_draft"),
    default_status=dg.DefaultScheduleStatus.STOPPED,
    description="Retrain the draft on everything that arrived, evaluate it, release it if it passes the gate.",
)
