"""Stage 1: the source corpus, one partition per source file, and the sensor that finds new files."""

import json
from dataclasses import dataclass

import dagster as dg

from resources.corpus_source import CorpusSourceResource
from resources.object_store import ObjectStoreResource
from spec_assets.artifact_step import materialize_artifact
from spec_assets.metadata import top_counts
from spec_assets.partitions import corpus_shards
from spec_assets.stage_config import stage_config
from training.configs import SplitConfig

PREVIEW_ROWS = 5


class SourceCorpusConfig(stage_config(SplitConfig)):
    """source_corpus's settings: training.configs.SplitConfig's fields."""


def _preview(table, n: int = PREVIEW_ROWS) -> list[dict]:
    rows = []
    for row in table.slice(0, n).to_pylist():
        first_user = next((m["content"] for m in row["messages"] if m["role"] == "user"), "")
        rows.append({"id": row["id"], "turns": len(row["messages"]), "first user turn": first_user[:80]})
    return rows


@dg.asset(
    partitions_def=corpus_shards,
    code_version="2",
    group_name="corpus",
    io_manager_key="artifact_refs",
    kinds={"parquet"},
    # New and changed files are requested by corpus_sensor; automation adds code-version rebuilds.
    automation_condition=dg.AutomationCondition.code_version_changed(),
)
def source_corpus(
    context: dg.AssetExecutionContext,
    config: SourceCorpusConfig,
    object_store: ObjectStoreResource,
    corpus: CorpusSourceResource,
) -> dg.Output:
    """Normalized conversations of one source file: training rows (data.parquet), held-out rows for
    evaluation (heldout.parquet) and the rows that could not be normalized (rejects.parquet)."""
    import pyarrow.parquet as pq

    from training.corpus import corpus_stats, read_source, split_heldout
    from training.filesystem import filesystem
    from training.fingerprint import file_digest

    store = object_store.store()
    source = corpus.source_for(context.partition_key)
    fs, path = filesystem(source.url)
    digest = file_digest(fs, path)

    def build(writer):
        result = read_source(source.url)
        assert result.n_read == result.n_accepted + result.n_rejected, "ingestion counts do not reconcile"
        train, heldout = split_heldout(result.rows, config.heldout_fraction, config.heldout_seed)
        with writer.open("data.parquet") as f:
            pq.write_table(train, f)
        with writer.open("heldout.parquet") as f:
            pq.write_table(heldout, f)
        with writer.open("rejects.parquet") as f:
            pq.write_table(result.rejects, f)
        con = store.duckdb()
        stats = corpus_stats(con, store.duckdb_path(writer.key("data.parquet")))
        by_reason = con.execute(
            "select reason, count(*) as n from read_parquet(?) group by reason order by n desc, reason",
            [store.duckdb_path(writer.key("rejects.parquet"))],
        ).fetchall()
        writer.summary = {
            "source_url": source.url,
            "rows_read": result.n_read,
            "rows_accepted": result.n_accepted,
            "rows_rejected": result.n_rejected,
            "rows_train": train.num_rows,
            "rows_heldout": heldout.num_rows,
            "formats": result.formats,
            "rejects_by_reason": top_counts(dict(by_reason)),
            **stats,
            "preview": _preview(train),
        }
        context.log.info(
            f"{source.url}: read {result.n_read}, accepted {result.n_accepted}, rejected {result.n_rejected}"
        )

    return materialize_artifact(context, store, build=build, upstream={"source": digest}, config=config.model_dump())


def listing_signature(url: str) -> str:
    """A cheap change signal from a source file's listing: its ETag on S3, mtime and size locally.
    The asset itself fingerprints the content, so a touched but unchanged file is still a cache hit."""
    from training.filesystem import filesystem

    fs, path = filesystem(url)
    info = fs.info(path)
    return str(info.get("ETag") or f"{info.get('mtime')}:{info.get('size')}")


@dataclass
class ShardSync:
    """How the corpus_shards partitions must change to match the source files: one partition per
    file, none for a file that is gone. corpus_sensor turns it into requests, `specdraft` applies it."""

    urls: dict[str, str]  # shard -> source file URL, in listing order
    signatures: dict[str, str]  # shard -> listing_signature of its file
    new: list[str]  # shards without a partition yet
    removed: list[str]  # partitions whose file is gone

    @property
    def shards(self) -> list[str]:
        return list(self.urls)


def plan_shard_sync(corpus: CorpusSourceResource, existing) -> ShardSync:
    """List the source files once and compare them with the `existing` partition keys."""
    sources = corpus.sources()
    urls = {s.shard: s.url for s in sources}
    existing = set(existing)
    return ShardSync(
        urls=urls,
        signatures={shard: listing_signature(url) for shard, url in urls.items()},
        new=[shard for shard in urls if shard not in existing],
        # A shard whose file is gone leaves the partition set: the fan-ins (vocab_map, draft_model,
        # eval_report) read every partition and would otherwise fail on its missing source.
        removed=sorted(existing - urls.keys()),
    )


@dg.sensor(
    name="corpus_sensor",
    minimum_interval_seconds=60,
    default_status=dg.DefaultSensorStatus.STOPPED,
    asset_selection=[source_corpus],
    description="Adds a corpus_shards partition for each new source file, re-runs a shard whose file changed, "
                "and drops the partition of a file that is gone.",
)
def corpus_sensor(context: dg.SensorEvaluationContext, corpus: CorpusSourceResource) -> dg.SensorResult:
    known: dict[str, str] = json.loads(context.cursor) if context.cursor else {}
    sync = plan_shard_sync(corpus, context.instance.get_dynamic_partitions(corpus_shards.name))
    changed = [s for s in sync.shards if s not in sync.new and s in known and known[s] != sync.signatures[s]]
    requests = [dg.RunRequest(partition_key=shard, run_key=f"{shard}:{sync.signatures[shard]}")
                for shard in sync.new + changed]
    partition_requests = ([corpus_shards.build_add_request(sync.new)] if sync.new else []) + (
        [corpus_shards.build_delete_request(sync.removed)] if sync.removed else [])
    return dg.SensorResult(
        run_requests=requests,
        dynamic_partitions_requests=partition_requests,
        cursor=json.dumps(sync.signatures, sort_keys=True),
    )
