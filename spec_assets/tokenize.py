"""Stage 3: token ids and assistant loss masks per shard, and the pruned draft vocabulary over all shards."""


import dagster as dg

from resources.object_store import ObjectStoreResource
from resources.target_model import TargetModelResource
from spec_assets.artifact_step import input_name, materialize_artifact
from spec_assets.metadata import top_counts
from spec_assets.partitions import corpus_shards
from spec_assets.stage_config import stage_config
from training.configs import TokenizeConfig, VocabConfig
from training.storage import ArtifactRef, artifact_prefix


# The chat template settings and the vocab size come from the target resource (shared with resampling
# and evaluation), not from the step's config.
class TokenizedShardsConfig(stage_config((TokenizeConfig, ("max_length", "template", "use_generated_ids")))):
    """tokenized_shards's settings: training.configs.TokenizeConfig's fields but the target's."""


class VocabMapConfig(stage_config(VocabConfig)):
    """vocab_map's settings: training.configs.VocabConfig's fields."""


@dg.asset(
    partitions_def=corpus_shards,
    code_version="2",
    group_name="tokenize",
    io_manager_key="artifact_refs",
    kinds={"parquet"},
    automation_condition=dg.AutomationCondition.eager() | dg.AutomationCondition.code_version_changed(),
)
def tokenized_shards(
    context: dg.AssetExecutionContext,
    config: TokenizedShardsConfig,
    resampled_corpus: ArtifactRef,
    object_store: ObjectStoreResource,
    target: TargetModelResource,
) -> dg.Output:
    """input_ids and loss_mask from the target tokenizer's own chat template (DESIGN.md, tokenized Parquet)."""
    from collections import Counter

    import pyarrow.parquet as pq
    from transformers import AutoTokenizer

    from training import tokenization

    store = object_store.store()
    upstream = store.manifest(resampled_corpus.prefix)

    def build(writer):
        rows = store.read_parquet(upstream.key("data.parquet"))
        tokenizer = AutoTokenizer.from_pretrained(target.model_path(), trust_remote_code=target.trust_remote_code)
        cfg = config.library(TokenizeConfig, chat_template_kwargs=target.template_kwargs(),
                             vocab_size=target.facts().vocab_size)
        where = f"tokenized_shards[{context.partition_key}] ({store.url(upstream.key('data.parquet'))})"
        try:
            result = tokenization.tokenize_conversations(tokenizer, rows, cfg)
            tokenization.check_trainable(result, where)
        except tokenization.TokenizeError as exc:
            raise dg.Failure(f"{where}: {exc}" if not str(exc).startswith(where) else str(exc)) from None
        assert result.n_in == result.n_ok + result.n_rejected, "tokenization counts do not reconcile"
        with writer.open("data.parquet") as f:
            pq.write_table(result.table, f)
        with writer.open("rejects.parquet") as f:
            pq.write_table(result.rejects, f)
        stats = tokenization.tokenized_stats(store.duckdb(), store.duckdb_path(writer.key("data.parquet")))
        # Conversations in = out + rejected; a template that rewrites earlier turns (Qwen3 reasoning)
        # splits a conversation into several rows, so `rows` in the stats may exceed conversations_out.
        writer.summary = {"conversations_in": result.n_in, "conversations_out": result.n_ok,
                          "conversations_rejected": result.n_rejected, **stats,
                          # resampled turns: rows built from the target's own ids, and rows whose masked
                          # ids differ from the generated ids (+ end-of-turn); 0 unless use_generated_ids is off
                          "rows_from_generated_ids": result.rows_from_generated_ids,
                          "generated_id_mismatches": result.id_mismatches,
                          # no ids to train on (pass-through, an openai server without return_token_ids)
                          "conversations_retokenized": result.conversations_retokenized}
        if result.reasoning_turns:  # assistant turns whose reasoning_content the template renders
            writer.summary["reasoning_turns"] = result.reasoning_turns
        if result.tool_call_turns:  # assistant turns that call tools (trained on the calls as rendered)
            writer.summary["tool_call_turns"] = result.tool_call_turns
        if result.template_date:  # a template that reads the clock renders this fixed date
            writer.summary["template_date"] = result.template_date
        if result.notes:  # e.g. reply_rendered_differently: the template re-renders a generated reply
            writer.summary["template_notes"] = {k: f"{v} (e.g. {result.note_examples[k][:300]})"
                                                for k, v in result.notes.items()}
        if result.rejects.num_rows:
            writer.summary["reject_reasons"] = top_counts(Counter(result.rejects["reason"].to_pylist()))

    return materialize_artifact(
        context, store, build=build, upstream={"resampled_corpus": resampled_corpus.fingerprint},
        config=config.model_dump(), target=target.identity(),
    )


def _shard_counts(store, ref: ArtifactRef, vocab_size: int):
    """Masked-token counts of one tokenized shard, cached under that shard's fingerprint."""
    import numpy as np

    from training.vocab import count_masked_tokens

    prefix = artifact_prefix("vocab_counts", ref.partition, ref.fingerprint)
    manifest = store.manifest(prefix)
    if manifest is None:
        tokenized = store.manifest(ref.prefix)
        counts = count_masked_tokens(store.duckdb(), store.duckdb_path(tokenized.key("data.parquet")), vocab_size)
        with store.artifact(prefix, ref.fingerprint) as writer:
            writer.write_bytes("counts.int64.bin", counts.astype(np.int64).tobytes())
            writer.summary = {"vocab_size": vocab_size, "masked_tokens": int(counts.sum())}
        manifest = store.manifest(prefix)
    return np.frombuffer(store.read_bytes(manifest.key("counts.int64.bin")), dtype=np.int64)


@dg.asset(
    code_version="1",
    group_name="tokenize",
    io_manager_key="artifact_refs",
    kinds={"safetensors"},
    automation_condition=dg.AutomationCondition.eager() | dg.AutomationCondition.code_version_changed(),
)
def vocab_map(
    context: dg.AssetExecutionContext,
    config: VocabMapConfig,
    tokenized_shards: dict,
    object_store: ObjectStoreResource,
    target: TargetModelResource,
) -> dg.Output:
    """Draft vocabulary = the most frequent assistant tokens over every shard; d2t/t2d maps (DESIGN.md)."""
    store = object_store.store()
    upstream = {input_name("tokenized_shards", shard): ref.fingerprint for shard, ref in tokenized_shards.items()}

    def build(writer):
        from training.vocab import build_vocab_map, coverage, save_vocab_map

        vocab_size = target.facts().vocab_size
        counts = sum(_shard_counts(store, ref, vocab_size) for ref in tokenized_shards.values())
        maps = build_vocab_map(counts, config.draft_vocab_size)
        writer.write_bytes("vocab_map.safetensors", save_vocab_map(maps))
        draft_vocab = int(maps["d2t"].numel())
        writer.summary = {
            "shards": len(tokenized_shards),
            "target_vocab_size": vocab_size,
            "draft_vocab_size": draft_vocab,
            "masked_tokens": int(counts.sum()),
            "distinct_masked_tokens": int((counts > 0).sum()),
            "coverage": float(coverage(maps["counts"], maps["t2d"])),
        }
        context.log.info(f"draft vocab {draft_vocab} of {vocab_size}; coverage {writer.summary['coverage']:.4f}")

    return materialize_artifact(
        context, store, build=build, upstream=upstream, config=config.model_dump(), target=target.identity()
    )
