"""Stage 5: the draft (EAGLE-3 trained with training-time test, or a DFlash block draft),
checkpointed, exported for vLLM (and SGLang for EAGLE-3)."""

import json
import tempfile
import warnings
from pathlib import Path
from typing import Optional

import dagster as dg

from resources.object_store import ObjectStoreResource, read_ref
from resources.target_model import TargetModelResource
from spec_assets.artifact_step import materialize_artifact
from spec_assets.instance import target_pool
from training.recipe import TrainConfig
from training.storage import ArtifactRef

EXPORT_FILES = ("config.json", "model.safetensors")
_DEFAULTS = TrainConfig()


class DraftModelConfig(dg.Config):
    """Every TrainConfig field (same names, same defaults: tests/spec_assets/test_draft_config.py
    fails on drift; None = the recipe of training/recipe.py decides from the corpus size), plus
    how the asset runs the job."""

    mode: str = "offline"  # offline: stored hidden_states; online: the target runs inside the trainer
    nproc: int = 1  # > 1 launches torchrun (gloo on CPU, NCCL on GPU)
    warm_start: bool = False  # start from the previous export (new data, same draft shape)
    # embed_tokens.weight in the export: off, since current vLLM and SGLang use the target's own
    # embedding (README "Serving the draft"); on for tools that need a self-contained draft.
    export_embed_tokens: bool = False
    # the draft's lm_head starts at the target's head rows of the draft vocab (bench_recipe: tau
    # 3.30 vs 3.23 at k=4, T=0, on stories260K), or "random" (normal, std 0.02)
    head_init: str = "target"
    # The draft's widths; None: recipe.draft_width's rule, i.e. the target's own (the EAGLE-3
    # convention) for targets at least 256 wide, and 256 wide with a 2,048-wide MLP below that (a
    # one-layer draft that narrow is capacity-bound: README "The training recipe"). A wider draft
    # keeps the target's head_dim and KV heads, adds query heads, and exports its own embedding.
    draft_intermediate_size: Optional[int] = None
    draft_hidden_size: Optional[int] = None
    # eagle3 (chain drafts) | dflash (block drafts: ttt_length + 1 slots, one draft forward per step;
    # set hidden_states' draft_family alike, so the features hold the layers it fuses)
    draft_family: str = "eagle3"
    dflash_layers: int = 1  # a DFlash draft's decoder layers

    ttt_length: int = _DEFAULTS.ttt_length
    step_weight: float = _DEFAULTS.step_weight
    lr: Optional[float] = _DEFAULTS.lr
    min_lr_ratio: float = _DEFAULTS.min_lr_ratio
    weight_decay: float = _DEFAULTS.weight_decay
    betas: list[float] = list(_DEFAULTS.betas)
    eps: float = _DEFAULTS.eps
    warmup_steps: Optional[int] = _DEFAULTS.warmup_steps
    warmup_ratio: Optional[float] = _DEFAULTS.warmup_ratio
    epochs: Optional[int] = _DEFAULTS.epochs
    max_steps: Optional[int] = _DEFAULTS.max_steps
    max_tokens_per_batch: Optional[int] = _DEFAULTS.max_tokens_per_batch
    grad_accum: int = _DEFAULTS.grad_accum
    grad_clip: float = _DEFAULTS.grad_clip
    seed: int = _DEFAULTS.seed
    validation_rows: Optional[int] = _DEFAULTS.validation_rows
    export_checkpoint: str = _DEFAULTS.export_checkpoint  # best (held-out tau) | last
    checkpoint_every: int = _DEFAULTS.checkpoint_every
    log_every: int = _DEFAULTS.log_every
    keep_checkpoints: int = _DEFAULTS.keep_checkpoints
    metrics_flush_seconds: float = _DEFAULTS.metrics_flush_seconds

    def train_config(self) -> TrainConfig:
        from dataclasses import fields

        return TrainConfig(**{f.name: getattr(self, f.name) for f in fields(TrainConfig)})


def _r(x: float, digits: int = 3) -> float:
    """Round to `digits` significant digits: what a person reads in the UI."""
    from math import floor, isfinite, log10

    if not isfinite(x) or x == 0:
        return x
    return round(x, max(0, digits - 1 - floor(log10(abs(x)))))


def validation_plot_md(validation: list[dict]) -> str:
    """A small PNG of held-out tau and acc_0 per epoch, inline in markdown ('' without records)."""
    import base64
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
    png = base64.b64encode(buf.getvalue()).decode()
    return f"![held-out validation per epoch](data:image/png;base64,{png})"


def training_summary(result: dict, mode: str, shards: int) -> dict:
    """The manifest summary of a training run: headline numbers as plain rounded floats (the
    Plots tab charts them), the resolved recipe, per-k rows and the held-out curve."""
    best = max(result["validation"], key=lambda r: r["simulated_acceptance_length"], default=None)
    replayed = (best or {}).get("replayed_acceptance_length")
    cfg = result["config"]
    return {
        "mode": mode,
        "shards": shards,
        "steps": result["steps"],
        "tokens_seen": result["tokens_seen"],
        "final_loss": _r(result["final_loss"], 4),
        "heldout_tau": _r(best["simulated_acceptance_length"], 4) if best else None,
        "train_tau": _r(result["simulated_acceptance_length"], 4),
        "exported_step": result["exported_step"],
        "train_seconds": round(result["wall_seconds"], 1),
        "recipe": {k: cfg[k] for k in ("epochs", "max_tokens_per_batch", "lr", "warmup_ratio", "validation_rows",
                                       "ttt_length", "export_checkpoint")},
        "recipe_fields": result["recipe_fields"],
        "acc_by_k": [{"k": k, "train_acc": _r(a), "train_cond_acc": _r(c),
                      "heldout_acc": _r(best["acc"][k]) if best else None,
                      "heldout_cond_acc": _r(best["cond_acc"][k]) if best else None,
                      # tau of chain drafting k+1 tokens replayed on held-out text: tracks decoded tau
                      "heldout_replayed_tau": _r(replayed[k]) if replayed else None}
                     for k, (a, c) in enumerate(zip(result["acc"], result["cond_acc"]))],
        "heldout_curve": [{"epoch": r["epoch"], "step": r["step"], "tau": _r(r["simulated_acceptance_length"], 4),
                           "replayed_tau": (_r(r["replayed_acceptance_length"][-1], 4)
                                            if r.get("replayed_acceptance_length") else None),
                           "acc_0": _r(r["acc"][0]), "loss": _r(r["loss"], 4)} for r in result["validation"]],
        "heldout_plot_md": validation_plot_md(result["validation"]),
    }


def target_spec(target: TargetModelResource):
    """The resource as the TrainJob's TargetSpec: online training loads this very target (its
    backend, device, trust_remote_code and chat settings, parsed as the resource parses them, from its
    field or SPECDRAFT_CHAT_TEMPLATE_KWARGS), not a hard-coded hf one. The resource sets no dtype:
    the job's "auto" is what the resource's own load uses."""
    from training.job import TargetSpec

    return TargetSpec(
        target.model_path(), backend=target.backend, device=target.device,
        trust_remote_code=target.trust_remote_code, chat_template_kwargs=target.template_kwargs() or None,
    )


def _acc_table(rows: list[dict]) -> dg.TableMetadataValue:
    cols = ["k", "train_acc", "train_cond_acc", "heldout_acc", "heldout_cond_acc"]
    types = {"k": "int"}
    return dg.TableMetadataValue(
        records=[dg.TableRecord({c: r.get(c) for c in cols if r.get(c) is not None}) for r in rows],
        schema=dg.TableSchema(columns=[dg.TableColumn(c, types.get(c, "float")) for c in cols]),
    )


@dg.asset(
    # 3: the draft's default width follows recipe.draft_width (drafts of targets under 256 wide change)
    # 4: draft_family (eagle3 | dflash) in the summary; a dflash draft exports DFlashDraftModel
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
    from training.job import TrainJob

    if config.mode not in ("offline", "online"):
        raise dg.Failure(f"draft_model mode must be 'offline' or 'online', not {config.mode!r}")
    store = object_store.store()
    data_asset, refs = (("hidden_states", hidden_states) if config.mode == "offline"
                        else ("tokenized_shards", tokenized_shards))
    refs = dict(sorted(refs.items()))
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

        job = TrainJob(
            store_root=store.root,
            # Checkpoints live under the fingerprint, outside the attempt folder: a killed run resumes.
            run_prefix=f"{writer.prefix}/_run",
            target=target_spec(target),
            vocab_map=vocab_map.prefix,
            train=config.train_config(),
            hidden_states=[r.prefix for r in refs.values()] if config.mode == "offline" else [],
            tokenized=[store.manifest(r.prefix).key("data.parquet") for r in refs.values()]
            if config.mode == "online" else [],
            init_from=store.manifest(warm_from.prefix).key("export/model.safetensors") if warm_from else None,
            export_embed_tokens=config.export_embed_tokens,
            head_init=config.head_init,
            draft_intermediate_size=config.draft_intermediate_size,
            draft_hidden_size=config.draft_hidden_size,
            draft_family=config.draft_family,
            dflash_layers=config.dflash_layers,
        )
        with tempfile.TemporaryDirectory() as tmp:
            job.export_dir = str(Path(tmp) / "export")
            result = train_main.launch(job, config.nproc, log=context.log.info)
            files = {name: (Path(job.export_dir) / name).read_bytes() for name in EXPORT_FILES}
            for name, data in files.items():
                writer.write_bytes(f"export/{name}", data)
            exported = json.loads(files["config.json"])
        writer.summary = {**training_summary(result, config.mode, len(refs)),
                          # the resolved draft shape (recipe.draft_width unless configured)
                          "draft_width": {k: exported[k] for k in ("hidden_size", "intermediate_size",
                                                                   "num_attention_heads", "target_hidden_size")},
                          "draft_family": config.draft_family,
                          "warm_start_from": warm_from.fingerprint if warm_from else None,
                          "export_path": store.url(writer.key("export"))}

    output = materialize_artifact(
        context, store, build=build, upstream=upstream, config=config.model_dump(), target=target.identity()
    )
    summary = store.manifest(output.value.prefix).summary
    metadata = dict(output.metadata)
    if summary.get("acc_by_k"):
        metadata["acc_by_k"] = _acc_table(summary["acc_by_k"])
    with warnings.catch_warnings():  # data_version is flagged beta (see artifact_step)
        warnings.simplefilter("ignore", dg.BetaWarning)
        return dg.Output(output.value, data_version=output.data_version, metadata=metadata)


nightly_retrain = dg.ScheduleDefinition(
    name="nightly_retrain",
    cron_schedule="0 2 * * *",
    target=dg.AssetSelection.assets("vocab_map", "draft_model", "eval_report", "released_draft"),
    default_status=dg.DefaultScheduleStatus.STOPPED,
    description="Retrain the draft on everything that arrived, evaluate it, release it if it passes the gate.",
)
