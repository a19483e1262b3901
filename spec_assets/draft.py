"""Stage 5: the draft (EAGLE-3 trained with training-time test, or a DFlash block draft),
checkpointed, exported for vLLM (and SGLang for EAGLE-3)."""

import json
import tempfile
from pathlib import Path

import dagster as dg
from pydantic import Field

from resources.object_store import ObjectStoreResource, read_ref
from resources.target_model import TargetModelResource
from spec_assets.artifact_step import input_name, materialize_artifact
from spec_assets.instance import target_pool
from spec_assets.metadata import png_md
from spec_assets.stage_config import stage_config
from training.job import DRAFT_FIELDS, TrainJob
from training.recipe import TrainConfig, data_note
from training.storage import ArtifactRef
from training.train_state import exported_record

EXPORT_FILES = ("config.json", "model.safetensors")


class DraftModelConfig(stage_config(TrainConfig, (TrainJob, DRAFT_FIELDS))):
    """draft_model's settings: every TrainConfig field (None: the recipe of training/recipe.py decides
    from the corpus size), the draft's shape and export (TrainJob's DRAFT_FIELDS), and how the asset
    runs the job."""

    mode: str = Field("offline", description="offline: stored hidden_states; online: the target runs inside "
                                             "the trainer.")
    nproc: int = Field(1, description="Processes; > 1 launches torchrun (gloo on CPU, NCCL on GPU).")
    warm_start: bool = Field(False, description="Start from the previous export (new data, same draft shape).")


def validation_plot_md(validation: list[dict]) -> str:
    """A small PNG of held-out tau and acc_0 per epoch, inline in markdown ('' without records)."""
    import io

    if not validation:
        return ""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5, 3), dpi=80)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    epochs = [r["epoch"] + 1 for r in validation]
    ax.plot(epochs, [r["simulated_acceptance_length"] for r in validation], "o-", label="held-out simulated tau")
    replayed = [(e, r["replayed_acceptance_length"][-1]) for e, r in zip(epochs, validation)
                if r.get("replayed_acceptance_length")]
    if replayed:
        ax.plot(*zip(*replayed), "^-", color="tab:green", label="held-out replayed tau")
    ax.set_xlabel("epoch")
    ax.set_ylabel("tau (TTT chain)")
    ax2 = ax.twinx()
    ax2.plot(epochs, [r["acc"][0] for r in validation], "s--", color="tab:orange", label="held-out acc_0")
    ax2.set_ylabel("acc_0")
    ax.grid(alpha=0.3)
    fig.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80)
    return png_md(buf.getvalue(), "held-out validation per epoch")


def check_feature_family(store, refs: dict[str, ArtifactRef], family: str) -> None:
    """Offline training fuses the layers hidden_states stored: a dg.Failure unless every shard's
    features are of draft_model's family (hidden_states' summary names it)."""
    stored = {shard: store.manifest(ref.prefix).summary.get("draft_family") for shard, ref in refs.items()}
    wrong = {shard: f for shard, f in stored.items() if f != family}
    if not wrong:
        return
    shard, other = next(iter(wrong.items()))
    where = f"hidden_states [{shard}]" + (f" and {len(wrong) - 1} more shards" if len(wrong) > 1 else "")
    if other is None:
        raise dg.Failure(f"{where} does not record whose layers it stored (written before hidden_states code "
                         f"version 4): materialize hidden_states again with draft_family: {family!r}")
    raise dg.Failure(f"draft_model's draft_family is {family!r} but {where} stored the target layers of "
                     f"{other!r}: set hidden_states' draft_family to {family!r} as well (ops.hidden_states.config."
                     f"draft_family) and materialize it, or draft_model's to {other!r}")


def training_summary(result: dict, mode: str, shards: int) -> dict:
    """The manifest summary of a training run: headline numbers as plain floats (the Plots tab charts
    them; spec_assets/metadata.py rounds them for display), the resolved recipe, per-k rows and the
    held-out curve."""
    # The exported weights' held-out record (the best epoch's unless export_checkpoint="last").
    best = exported_record(result["validation"], result["exported_step"])
    replayed = (best or {}).get("replayed_acceptance_length")
    cfg = result["config"]
    return {
        "mode": mode,
        "shards": shards,
        "steps": result["steps"],
        "tokens_seen": result["tokens_seen"],
        "final_loss": result["final_loss"],
        "heldout_tau": best["simulated_acceptance_length"] if best else None,
        "train_tau": result["simulated_acceptance_length"],
        "exported_step": result["exported_step"],
        "train_seconds": result["wall_seconds"],
        "recipe": {k: cfg[k] for k in ("epochs", "max_tokens_per_batch", "lr", "warmup_ratio", "validation_rows",
                                       "ttt_length", "export_checkpoint")},
        "recipe_fields": result["recipe_fields"],
        "acc_by_k": [{"k": k, "train_acc": a, "train_cond_acc": c,
                      "heldout_acc": best["acc"][k] if best else None,
                      "heldout_cond_acc": best["cond_acc"][k] if best else None,
                      # tau of chain drafting k+1 tokens replayed on held-out text: tracks decoded tau
                      "heldout_replayed_tau": replayed[k] if replayed else None}
                     for k, (a, c) in enumerate(zip(result["acc"], result["cond_acc"]))],
        "heldout_curve": [{"epoch": r["epoch"], "step": r["step"], "tau": r["simulated_acceptance_length"],
                           "replayed_tau": (r["replayed_acceptance_length"][-1]
                                            if r.get("replayed_acceptance_length") else None),
                           "acc_0": r["acc"][0], "loss": r["loss"]} for r in result["validation"]],
        "heldout_plot_md": validation_plot_md(result["validation"]),
    }


@dg.asset(
    # 3: the draft's default width follows recipe.draft_width (drafts of targets under 256 wide change)
    # 4: corpora of 10 to 199 rows are validated too, and their best epoch exported; draft_family
    # (eagle3 | dflash) in the summary, a dflash draft exports DFlashDraftModel
    code_version="4",
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
    hidden_states: dict,
    tokenized_shards: dict,
    object_store: ObjectStoreResource,
    target: TargetModelResource,
) -> dg.Output:
    """EAGLE-3 draft trained on every shard (offline from hidden_states, or online), with its serving export.

    hidden_states and tokenized_shards arrive through the artifact_refs IO manager as
    {shard: ArtifactRef} over all partitions (Dagster's default mapping for an unpartitioned
    asset), so the lineage the UI shows is what the code reads.
    """
    if config.mode not in ("offline", "online"):
        raise dg.Failure(f"draft_model mode must be 'offline' or 'online', not {config.mode!r}")
    store = object_store.store()
    data_asset, refs = (("hidden_states", hidden_states) if config.mode == "offline"
                        else ("tokenized_shards", tokenized_shards))
    refs = dict(sorted(refs.items()))
    if config.mode == "offline":
        check_feature_family(store, refs, config.draft_family)
    upstream = {input_name(data_asset, s): r.fingerprint for s, r in refs.items()} | {"vocab_map": vocab_map.fingerprint}
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

        job = TrainJob(
            store_root=store.root,
            # Checkpoints live under the fingerprint, outside the attempt folder: a killed run resumes.
            run_prefix=f"{writer.prefix}/_run",
            target=target.spec(),  # the resolved target: online training loads this very one
            vocab_map=vocab_map.prefix,
            train=config.library(TrainConfig),
            hidden_states=[r.prefix for r in refs.values()] if config.mode == "offline" else [],
            tokenized=[store.manifest(r.prefix).key("data.parquet") for r in refs.values()]
            if config.mode == "online" else [],
            init_from=store.manifest(warm_from.prefix).key("export/model.safetensors") if warm_from else None,
            **{name: getattr(config, name) for name in DRAFT_FIELDS},
        )
        with tempfile.TemporaryDirectory() as tmp:
            job.export_dir = str(Path(tmp) / "export")
            result = train_main.launch(job, config.nproc, log=context.log.info)
            files = {name: (Path(job.export_dir) / name).read_bytes() for name in EXPORT_FILES}
            for name, data in files.items():
                writer.write_bytes(f"export/{name}", data)
            exported = json.loads(files["config.json"])
        # Too little data to generalize is the first thing to know about a draft (recipe.data_note).
        trainable = store.manifest(vocab_map.prefix).summary.get("masked_tokens")
        note = data_note(trainable) if trainable is not None else None
        if note:
            context.log.warning(note)
        writer.summary = {**training_summary(result, config.mode, len(refs)),
                          "trainable_tokens": trainable, "data_note": note,
                          # the resolved draft shape (recipe.draft_width unless configured)
                          "draft_width": {k: exported[k] for k in ("hidden_size", "intermediate_size",
                                                                   "num_attention_heads", "target_hidden_size")},
                          "draft_family": config.draft_family,
                          "warm_start_from": warm_from.fingerprint if warm_from else None,
                          "export_path": store.url(writer.key("export"))}

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
