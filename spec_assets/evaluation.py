"""Stage 6: measured acceptance and speedup of the draft, a quality gate, and the release it guards."""

import tempfile
from pathlib import Path

import dagster as dg
from pydantic import Field

from resources.corpus_source import CorpusSourceResource
from resources.object_store import ObjectStoreResource
from resources.target_model import TargetModelResource
from spec_assets.artifact_step import input_name, materialize_artifact
from spec_assets.instance import target_pool
from spec_assets.metadata import recorded
from spec_assets.stage_config import stage_config
from training.configs import EvalConfig
from training.storage import ArtifactRef, artifact_prefix

GATE_CHECK = "beats_prompt_lookup"


class EvalReportConfig(stage_config(EvalConfig)):
    """eval_report's settings: training.configs.EvalConfig's fields, and where the prompts come from."""

    prompts_url: str = Field("", description="A held-out prompt file; empty: the corpus resource's eval_prompts "
                                             "(SPECDRAFT_EVAL_PROMPTS), else every shard's held-out rows.")


def _prompt_rows(context, store, url: str, source_corpus: dict[str, ArtifactRef]) -> tuple[list[dict], dict[str, str]]:
    """Held-out conversations and the fingerprints they come from: the prompt file at `url`, or
    else every shard's heldout.parquet."""
    from training.evaluation.prompts import PromptFileError, read_prompt_file
    from training.filesystem import filesystem
    from training.fingerprint import file_digest

    if url:
        fs, path = filesystem(url)
        try:
            rows = read_prompt_file(url, log=context.log.warning)
        except PromptFileError as exc:
            raise dg.Failure(str(exc)) from None
        return rows, {"prompts": file_digest(fs, path)}
    rows, upstream = [], {}
    for shard, ref in sorted(source_corpus.items()):
        rows += store.read_parquet(store.manifest(ref.prefix).key("heldout.parquet")).to_pylist()
        upstream[input_name("source_corpus", shard)] = ref.fingerprint
    return rows, upstream


def _local_export(store, draft_ref: ArtifactRef, folder: Path) -> Path:
    """The draft's serving export as a local directory (downloaded when the store is S3)."""
    manifest = store.manifest(draft_ref.prefix)
    for name in manifest.names("export/"):
        dest = folder / name
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(store.read_bytes(manifest.key(name)))
    return folder / "export"


def _family(record) -> str:
    # Materializations from before draft_model code version 4 name no family: EAGLE-3 was the only one.
    return recorded(record, "draft_family") or "eagle3"


def _trained_on(record) -> str | None:
    """The vocab_map data version (its fingerprint) a draft_model materialization read, from its
    DataProvenance: "the same data" for drafts. vocab_map is the fan-in over every shard's
    tokenized_shards, so one fingerprint fixes the tokenized rows (corpus, resampling, chat template,
    target) and the draft vocabulary; hidden_states differ by family by design."""
    provenance = dg.DataProvenance.from_tags(record.asset_materialization.tags or {})
    version = provenance.input_data_versions.get(dg.AssetKey("vocab_map")) if provenance else None
    return version.value if version is not None else None


def compared_drafts(instance, store, draft: ArtifactRef, page: int = 100) -> tuple[dict[str, ArtifactRef], dict]:
    """The newest draft_model materialization of each other family trained on the same data as `draft`
    (the same vocab_map, `_trained_on`) whose artifact is still in the store, and what was compared
    on: {"vocab_map": fingerprint or None, "note": one line when a family has no such draft}. Read
    from Dagster's public records, newest first."""
    from training.aux_layers import FAMILIES

    records, cursor = [], None
    while True:  # draft_model is materialized rarely: every record is few pages
        got = instance.fetch_materializations(dg.AssetRecordsFilter(asset_key=dg.AssetKey("draft_model")),
                                              limit=page, cursor=cursor)
        records += got.records
        if not got.has_more:
            break
        cursor = got.cursor
    own = next((r for r in records if recorded(r, "fingerprint") == draft.fingerprint), None)
    vocab = _trained_on(own) if own else None
    if vocab is None:
        return {}, {"vocab_map": None, "note": f"No other family compared: this instance holds no lineage "
                                               f"(vocab_map) of draft_model {draft.fingerprint[:12]}."}
    others = [f for f in FAMILIES if f != _family(own)]
    found: dict[str, ArtifactRef] = {}
    for r in records:
        fp, fam = recorded(r, "fingerprint"), _family(r)
        if fam in others and fam not in found and fp and _trained_on(r) == vocab:
            prefix = artifact_prefix("draft_model", None, fp)
            if store.manifest(prefix) is not None:  # else deleted from the store: an older one may remain
                found[fam] = ArtifactRef("draft_model", None, fp, prefix)
    missing = [f for f in others if f not in found]
    note = (f"No {' or '.join(missing)} draft trained on the same data (vocab_map {vocab[:12]}) to compare: "
            f"train one with draft_model's (and hidden_states') draft_family: {missing[0]}.") if missing else None
    return found, {"vocab_map": vocab, "note": note}


@dg.asset(
    # 3: the report names the draft's family (eagle3 | dflash), and c / est. speedup count a DFlash
    # block as one draft forward per step. 4: the newest draft of each other family trained on the
    # same data is simulated beside it (compare_families)
    code_version="4",
    pool=target_pool(),  # loads the target: one step per device slot across runs (spec_assets/instance.py)
    group_name="evaluate",
    io_manager_key="artifact_refs",
    kinds={"pytorch", "markdown"},
    check_specs=[dg.AssetCheckSpec(GATE_CHECK, asset="eval_report", blocking=True,
                                   description="tau at gate_k beats prompt-lookup drafting and min_tau")],
    # A new shard's source_corpus must not re-evaluate (and re-release) the old draft: follow the draft.
    automation_condition=(
        dg.AutomationCondition.eager().ignore(dg.AssetSelection.assets("source_corpus"))
        | dg.AutomationCondition.code_version_changed()
    ),
)
def eval_report(
    context: dg.AssetExecutionContext,
    config: EvalReportConfig,
    draft_model: ArtifactRef,
    source_corpus: dict[str, ArtifactRef],
    object_store: ObjectStoreResource,
    corpus: CorpusSourceResource,
    target: TargetModelResource,
):
    """Speculative decoding simulated on the target: tau per k, acceptance by position, speedup, plots.

    Prompts: config.prompts_url, else the corpus resource's eval_prompts (SPECDRAFT_EVAL_PROMPTS),
    else the held-out rows of every source_corpus shard (read through their pointers)."""
    from training.evaluation import evaluate, gate, load_result, write_report
    from training.evaluation.prompts import stratified_prompts

    store = object_store.store()
    rows, prompt_sources = _prompt_rows(context, store, config.prompts_url or corpus.eval_prompts, source_corpus)
    prompts = stratified_prompts(rows, config.max_prompts)
    if not prompts:
        raise dg.Failure("eval_report has no held-out prompts: the shards' heldout.parquet files are empty; "
                         "set SPECDRAFT_EVAL_PROMPTS to a prompt file or source_corpus heldout_fraction > 0")

    # Like with like: the other families' newest drafts of the same data, simulated beside this one
    # (only this one is gated, served and released).
    compared, compared_on = (compared_drafts(context.instance, store, draft_model) if config.compare_families
                             else ({}, {"vocab_map": None, "note": "Other families not compared (compare_families: false)."}))
    if compared_on["note"]:
        context.log.info(compared_on["note"])

    def export_url(ref: ArtifactRef) -> str:
        """The export's folder in the store (not the temporary download folder)."""
        return store.url(store.manifest(ref.prefix).key("export/config.json").rsplit("/", 1)[0])

    def build(writer):
        with tempfile.TemporaryDirectory() as tmp:
            others = [str(_local_export(store, ref, Path(tmp) / family)) for family, ref in compared.items()]
            # The simulator runs the HF model whatever the pipeline's backend; vLLM is measured by `served`.
            result = evaluate(target.load(backend="hf"), str(_local_export(store, draft_model, Path(tmp) / "draft")),
                              prompts, log=context.log.info, compare=others,
                              **config.model_dump(exclude={"prompts_url"}))
        result.config["draft"] = export_url(draft_model)
        result.config["compared_drafts"] = {family: export_url(ref) for family, ref in compared.items()}
        result.config["compare_note"] = compared_on["note"]
        report = write_report(result, writer, k=config.gate_k)
        writer.summary = {"prompts": len(prompts), "prompts_rejected": result.config["prompts_rejected"],
                          **report["summary"], "min_tau": config.min_tau,
                          "compared_drafts": {family: ref.fingerprint for family, ref in compared.items()},
                          "compared_on_vocab_map": compared_on["vocab_map"],
                          "report_md": report["markdown"]}

    output = materialize_artifact(
        context, store, build=build,
        upstream={"draft_model": draft_model.fingerprint, **prompt_sources,
                  **{f"compared/{family}": ref.fingerprint for family, ref in compared.items()}},
        config=config.model_dump(), target=target.identity(),
    )
    yield output
    manifest = store.manifest(output.value.prefix)
    result = load_result(store.read_json(manifest.key("report.json")))
    passed, detail = gate(result, config.gate_k, config.min_tau)
    context.log.info(f"quality gate: {detail}")
    yield dg.AssetCheckResult(check_name=GATE_CHECK, passed=passed, metadata={"detail": detail},
                              severity=dg.AssetCheckSeverity.ERROR)


@dg.asset(
    code_version="1",
    group_name="evaluate",
    io_manager_key="artifact_refs",
    kinds={"safetensors"},
    automation_condition=dg.AutomationCondition.eager(),
)
def released_draft(
    context: dg.AssetExecutionContext,
    draft_model: ArtifactRef,
    eval_report: ArtifactRef,
    object_store: ObjectStoreResource,
) -> dg.Output:
    """The serving export that passed the quality gate; `releases/latest.json` points at it."""
    store = object_store.store()
    export = store.manifest(draft_model.prefix)
    summary = store.manifest(eval_report.prefix).summary

    def build(writer):
        for name in export.names("export/"):
            writer.write_bytes(name.removeprefix("export/"), store.read_bytes(export.key(name)))
        writer.summary = {"tau": summary.get("tau"), "k": summary.get("k"), "draft_fingerprint": draft_model.fingerprint}

    output = materialize_artifact(
        context, store, build=build,
        upstream={"draft_model": draft_model.fingerprint, "eval_report": eval_report.fingerprint},
    )
    released = store.manifest(output.value.prefix)
    # A stable pointer for serving: `vllm serve ... --speculative-config '{"model": <path>}'`.
    store.write_json("releases/latest.json", {
        "fingerprint": released.fingerprint,
        "files": {n: store.url(released.key(n)) for n in released.names()},
        "export_dir": store.url(released.key("config.json")).rsplit("/", 1)[0],
    })
    return output
