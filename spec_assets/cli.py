"""`specdraft run`: the main job from the command line, on a persistent Dagster instance.

It materializes the selected assets for every corpus shard, per-shard stages first (one run per
shard), then the fan-ins (one run), so the runs and their lineage show in `dagster dev`.
Unchanged steps are cache hits, so running it again costs little; `--only-stale-or-missing`
does not even launch the runs whose assets are current, and `--resume` finishes what the last
`specdraft run` left failed or never started.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from training.paths import default_dagster_home

# Every run of one `specdraft run` carries its invocation id, so `--resume` finds them again.
INVOCATION_TAG = "specdraft/invocation"
# The target model identity a run used: Dagster's staleness cannot see a changed SPECDRAFT_TARGET.
TARGET_TAG = "specdraft/target"
# The plan of the last invocation, in the instance's key-value store (SQLite or Postgres alike).
LAST_INVOCATION_KEY = "specdraft/last_invocation"
# The source file a shard's run read (URL and listing signature): the materialization metadata of a
# cache hit names the file that first produced the artifact, not the one this run listed.
SOURCE_TAG = "specdraft/source"
# Assets that never touch the target model: no target identity needed to run or to judge them.
TARGETLESS = {"source_corpus"}


def ensure_dagster_home() -> Path:
    """DAGSTER_HOME, defaulting to a folder in the project's data dir, with telemetry and the UI's
    newsletter dialog off (neither reaches the network)."""
    home = Path(os.environ.get("DAGSTER_HOME") or default_dagster_home()).resolve()
    home.mkdir(parents=True, exist_ok=True)
    from spec_assets.instance import InstanceConfigError, preflight

    try:
        preflight(home)  # dagster.yaml (SQLite, or PostgreSQL from SPECDRAFT_PG_URL); reachable servers
    except InstanceConfigError as exc:
        raise SystemExit(f"specdraft: {exc}") from None
    os.environ["DAGSTER_HOME"] = str(home)
    return home


def corpus_sources(defs) -> dict[str, str]:
    """shard -> source file URL, from the corpus resource (an EnvVar location resolved as in a run)."""
    return {s.shard: s.url for s in defs.resources["corpus"].process_config_and_initialize().sources()}


def source_signature(url: str) -> str:
    """The file's URL and a cheap change signal from its listing: ETag on S3, mtime and size locally
    (what corpus_sensor uses); the asset itself fingerprints the content."""
    import fsspec

    fs, path = fsspec.core.url_to_fs(url)
    info = fs.info(path)
    change = info.get("ETag") or f"{info.get('mtime')}:{info.get('size')}"
    return f"{url} {change}"


def sync_shards(defs, instance) -> list[str]:
    """Make the corpus_shards partitions match the source files, as corpus_sensor does on a tick:
    one per file, none for a file that is gone."""
    from spec_assets.partitions import corpus_shards

    shards = list(corpus_sources(defs))
    existing = set(instance.get_dynamic_partitions(corpus_shards.name))
    new = [s for s in shards if s not in existing]
    if new:
        instance.add_dynamic_partitions(corpus_shards.name, new)
    for gone in sorted(existing - set(shards)):
        instance.delete_dynamic_partition(corpus_shards.name, gone)
    return shards


def _config_for(run_config: dict, keys) -> dict:
    """The part of a run config that a run over `keys` accepts (Dagster rejects config for other assets)."""
    names = {k.to_user_string() for k in keys}
    ops = {name: cfg for name, cfg in run_config.get("ops", {}).items() if name in names}
    return {**{k: v for k, v in run_config.items() if k != "ops"}, **({"ops": ops} if ops else {})}


@dataclass
class Unit:
    """One run of an invocation: some assets for one shard, or the fan-ins (partition None)."""

    assets: list  # AssetKeys in dependency order
    partition: str | None = None
    skipped: list = field(default_factory=list)  # AssetKeys found current (--only-stale-or-missing)

    def to_json(self) -> dict:
        return {"partition": self.partition, "assets": [k.to_user_string() for k in self.assets]}

    @classmethod
    def from_json(cls, data: dict) -> "Unit":
        import dagster as dg

        return cls([dg.AssetKey.from_user_string(a) for a in data["assets"]], data["partition"])


def plan_units(graph, select: str, shards: list[str]) -> list[Unit]:
    """One unit per shard over the selected per-shard assets, then one unit over the selected fan-ins."""
    import dagster as dg

    selected = dg.AssetSelection.from_string(select).resolve(graph)
    ordered = [k for k in graph.toposorted_asset_keys if k in selected]
    per_shard = [k for k in ordered if graph.get(k).partitions_def is not None]
    fan_in = [k for k in ordered if graph.get(k).partitions_def is None]
    units = [Unit(list(per_shard), shard) for shard in shards] if per_shard else []
    return units + ([Unit(fan_in)] if fan_in else [])


def _blocking_checked_assets() -> set:
    """Assets with a blocking check: whatever runs below one must run in the same run as it,
    because a blocking check only stops downstream steps of its own run (DESIGN.md)."""
    from spec_assets.definitions import all_assets

    return {spec.asset_key for a in all_assets for spec in a.check_specs if spec.blocking}


def _with_gates(graph, unit_assets: list, to_run: list) -> list:
    """`to_run` plus every blocking-checked parent in the unit of an asset in it, in unit order."""
    gated = _blocking_checked_assets()
    keep = set(to_run)
    changed = True
    while changed:
        changed = False
        for key in list(keep):
            for parent in graph.get(key).parent_keys:
                if parent in gated and parent in unit_assets and parent not in keep:
                    keep.add(parent)
                    changed = True
    return [k for k in unit_assets if k in keep]


class CurrentnessJudge:
    """Decides whether an asset partition's latest materialization is current, without running it.

    Current means: materialized; Dagster calls it FRESH (code version unchanged, no input with a
    new data version); its run used the same effective op config and target model; its artifact
    is still in the object store; and, for source_corpus, the source file has the URL and listing
    signature (ETag, or mtime and size) its run recorded.
    Anything this cannot see (an edited SPECDRAFT_EVAL_PROMPTS file, another generation backend)
    needs a plain `specdraft run`, whose fingerprints cover every input.
    """

    def __init__(self, instance, defs, run_config: dict, target_identity: str | None):
        from dagster._core.asset_graph_view.asset_graph_view import AssetGraphView
        from dagster._core.definitions.data_version import CachingStaleStatusResolver
        from dagster._core.definitions.temporal_context import TemporalContext
        from dagster._time import get_current_datetime

        self.instance = instance
        self.defs = defs
        self.graph = defs.resolve_asset_graph()
        self.run_config = run_config
        self.target_identity = target_identity
        # Dagster internals (1.13.27): the resolver behind the UI's and GraphQL's staleStatus.
        view = AssetGraphView(
            temporal_context=TemporalContext(effective_dt=get_current_datetime(), last_event_id=None),
            instance=instance,
            asset_graph=self.graph,
        )
        self.resolver = CachingStaleStatusResolver(instance=instance, asset_graph=self.graph, loading_context=view)
        self._runs: dict = {}
        self._sources = None

    def _effective_config(self, key, op_config: dict | None) -> dict:
        from dagster._config import process_config

        schema = self.graph.assets_def_for_key(key).op.config_schema
        if schema is None or schema.config_type is None:
            return {}
        result = process_config(schema.config_type, op_config or {})
        return dict(result.value) if result.success else {"invalid": op_config}

    def _op_config(self, run_config: dict, key) -> dict:
        return ((run_config or {}).get("ops", {}).get(key.to_user_string()) or {}).get("config") or {}

    def _run(self, run_id: str):
        if run_id not in self._runs:
            self._runs[run_id] = self.instance.get_run_by_id(run_id)
        return self._runs[run_id]

    def _source_url(self, shard: str) -> str | None:
        if self._sources is None:
            self._sources = corpus_sources(self.defs)
        return self._sources.get(shard)

    def why_not_current(self, key, partition: str | None) -> str | None:
        """None when current, else the first reason it is not (for the log)."""
        import dagster as dg
        import fsspec
        from dagster._core.definitions.data_version import StaleStatus

        records = self.instance.fetch_materializations(
            dg.AssetRecordsFilter(asset_key=key, asset_partitions=[partition] if partition else None), limit=1
        ).records
        if not records:
            return "missing"
        record = records[0]
        status = self.resolver.get_status(key, partition)
        if status != StaleStatus.FRESH:
            causes = self.resolver.get_stale_causes(key, partition)
            return f"{status.value.lower()}: " + ("; ".join(c.reason for c in causes) or "no reason given")
        run = self._run(record.run_id)
        if run is None:
            return "its run was deleted"
        wanted = self._effective_config(key, self._op_config(self.run_config, key))
        if self._effective_config(key, self._op_config(run.run_config, key)) != wanted:
            return "config changed"
        if key.to_user_string() not in TARGETLESS and run.tags.get(TARGET_TAG) != self.target_identity:
            return "target model changed (or not recorded)"
        path = record.asset_materialization.metadata.get("path")
        if path is None:
            return "no artifact path recorded"
        fs, root = fsspec.core.url_to_fs(path.value)
        if not fs.exists(f"{root.rstrip('/')}/manifest.json"):
            return "artifact missing from the store"
        if key.to_user_string() == "source_corpus" and partition is not None:
            url = self._source_url(partition)
            if url is None:
                return "source file gone"
            if run.tags.get(SOURCE_TAG) != source_signature(url):
                return "source file changed, moved (or not recorded)"
        return None


def _target_identity(defs) -> str:
    return defs.resources["target"].process_config_and_initialize().identity()


def _uses_target(units: list[Unit]) -> bool:
    return any(k.to_user_string() not in TARGETLESS for u in units for k in u.assets)


def _trim_current(units: list[Unit], judge: CurrentnessJudge, log) -> list[Unit]:
    """Drop current asset partitions; keep whatever sits below something that will run."""
    graph = judge.graph
    scheduled: set = set()  # (AssetKey, partition) that will run in this invocation
    trimmed = []
    for unit in units:
        to_run = []
        for key in unit.assets:
            parents = graph.get(key).parent_keys
            upstream_runs = any(
                parent == k and (unit.partition is None or p in (unit.partition, None))
                for parent in parents for k, p in scheduled
            )
            reason = "an input runs in this invocation" if upstream_runs else judge.why_not_current(key, unit.partition)
            if reason is not None:
                to_run.append(key)
                scheduled.add((key, unit.partition))
                where = f" [{unit.partition}]" if unit.partition else ""
                log(f"  {key.to_user_string()}{where}: {reason}")
        to_run = _with_gates(graph, unit.assets, to_run)
        scheduled.update((k, unit.partition) for k in to_run)
        trimmed.append(Unit(to_run, unit.partition, [k for k in unit.assets if k not in to_run]))
    return trimmed


def _save_invocation(instance, record: dict) -> None:
    instance.run_storage.set_cursor_values({LAST_INVOCATION_KEY: json.dumps(record, sort_keys=True)})


def load_last_invocation(instance) -> dict | None:
    """The plan of the last `specdraft run` on this instance: id, selection, run config, units."""
    raw = instance.run_storage.get_cursor_values({LAST_INVOCATION_KEY}).get(LAST_INVOCATION_KEY)
    return json.loads(raw) if raw else None


def _execute(units: list[Unit], run_config: dict, instance, tags: dict, log) -> list:
    """One in-process run per unit; the fan-in unit only when every shard unit succeeded."""
    import dagster as dg

    from spec_assets.definitions import all_assets, defs

    # Source files are listed once, when some unit reads one (their signatures go in the run tags).
    source_asset = dg.AssetKey("source_corpus")
    reads_sources = any(u.partition is not None and source_asset in u.assets for u in units)
    sources = corpus_sources(defs) if reads_sources else {}
    results = []
    shards_ok = True

    def unit_tags_for(unit) -> dict:
        unit_tags = dict(tags)
        if unit.partition is not None and source_asset in unit.assets and unit.partition in sources:
            unit_tags[SOURCE_TAG] = source_signature(sources[unit.partition])  # a gone file fails the step
        return unit_tags

    from spec_assets.instance import shard_parallelism

    in_parallel = {}  # id(unit) -> RunOutcome: shard runs executed out of process, SPECDRAFT_PARALLEL at once
    shard_units = [u for u in units if u.assets and u.partition is not None]
    if shard_parallelism() > 1 and len(shard_units) > 1:
        from spec_assets.parallel import execute_parallel

        t0 = time.time()
        outcomes = execute_parallel(shard_units, lambda u: _config_for(run_config, u.assets), unit_tags_for,
                                    instance, log, shard_parallelism())
        in_parallel = {id(u): o for u, o in zip(shard_units, outcomes)}
        log(f"{len(shard_units)} shard runs, {shard_parallelism()} at a time, in {time.time() - t0:.1f}s")
    for unit in units:
        if not unit.assets:
            continue
        if unit.partition is None and not shards_ok:
            # A fan-in over a failed shard would fail on its missing input; report the shard instead.
            log(f"{', '.join(k.to_user_string() for k in unit.assets)}: not started, a shard failed")
            continue
        t0 = time.time()
        result = in_parallel.get(id(unit)) or dg.materialize(
            all_assets, selection=unit.assets, partition_key=unit.partition, instance=instance,
            resources=defs.resources, run_config=_config_for(run_config, unit.assets),
            tags=unit_tags_for(unit), raise_on_error=False)
        results.append(result)
        if unit.partition is not None:
            shards_ok = shards_ok and result.success
        where = f"shard {unit.partition}: " if unit.partition else ""
        status = "ok" if result.success else "FAILED: " + "; ".join(failure_messages(result))
        log(f"{where}{', '.join(k.to_user_string() for k in unit.assets)} in {time.time() - t0:.1f}s {status}")
    return results


def _console_config(run_config: dict | None) -> dict:
    # The console shows step progress and our log lines, not every engine event (the UI has those).
    return {"loggers": {"console": {"config": {"log_level": "INFO"}}}, **(run_config or {})}


def run_pipeline(select: str = "*", run_config: dict | None = None, instance=None, log=print,
                 only_stale_or_missing: bool = False, dry_run: bool = False):
    """Materialize `select` (a Dagster asset selection string) for every shard, in dependency order.

    Returns the runs' results in launch order. With `only_stale_or_missing`, asset partitions whose
    latest materialization is current are not run at all; `dry_run` plans and launches nothing.
    """
    import dagster as dg

    from spec_assets.definitions import defs

    instance = instance or dg.DagsterInstance.get()
    run_config = _console_config(run_config)
    graph = defs.resolve_asset_graph()
    units = plan_units(graph, select, sync_shards(defs, instance))
    # The identity hashes the target's files (the default demo target is built on first use): only
    # when a run will use it or staleness is judged against it.
    needs_identity = _uses_target(units) and (only_stale_or_missing or not dry_run)
    target_identity = _target_identity(defs) if needs_identity else None

    if only_stale_or_missing:
        judge = CurrentnessJudge(instance, defs, run_config, target_identity)
        units = _trim_current(units, judge, log)
        skipped = sum(len(u.skipped) for u in units)
        launching = [u for u in units if u.assets]
        log(f"only stale or missing: {skipped} asset partitions current, {len(launching)} runs to launch")
        units = launching
    if dry_run:
        for unit in units:
            log(f"would run {unit.partition or 'fan-in'}: {', '.join(k.to_user_string() for k in unit.assets)}")
        return []

    invocation = str(uuid.uuid4())
    _save_invocation(instance, {
        "id": invocation, "select": select, "run_config": run_config, "started": time.time(),
        "units": [u.to_json() for u in units],
    })
    tags = {INVOCATION_TAG: invocation, **({TARGET_TAG: target_identity} if target_identity else {})}
    return _execute(units, run_config, instance, tags, log)


def _succeeded_steps(instance, invocation: str) -> set[tuple[str, str | None]]:
    """(step key, partition) of every step that succeeded in a run of the invocation."""
    import dagster as dg

    done = set()
    for run in instance.get_runs(filters=dg.RunsFilter(tags={INVOCATION_TAG: invocation})):
        partition = run.tags.get("dagster/partition")
        records = instance.get_records_for_run(run.run_id, of_type=dg.DagsterEventType.STEP_SUCCESS, limit=10_000)
        done.update((r.event_log_entry.dagster_event.step_key, partition) for r in records.records)
    return done


def resume_pipeline(instance=None, log=print):
    """Run again what the last `specdraft run` left failed or never started: same plan, same config,
    same invocation id, so a second resume continues where this one stops. Returns the results."""
    import dagster as dg

    from spec_assets.definitions import defs

    instance = instance or dg.DagsterInstance.get()
    record = load_last_invocation(instance)
    if record is None:
        log("nothing to resume: no specdraft run recorded on this instance")
        return []
    graph = defs.resolve_asset_graph()
    done = _succeeded_steps(instance, record["id"])
    units = []
    for unit in map(Unit.from_json, record["units"]):
        remaining = [k for k in unit.assets
                     if (graph.assets_def_for_key(k).op.name, unit.partition) not in done]
        if remaining:
            units.append(Unit(_with_gates(graph, unit.assets, remaining), unit.partition))
    if not units:
        log(f"nothing to resume: every step of invocation {record['id']} succeeded")
        return []
    log(f"resuming invocation {record['id']}: " + "; ".join(
        f"{u.partition or 'fan-in'}: {', '.join(k.to_user_string() for k in u.assets)}" for u in units))
    target_identity = _target_identity(defs) if _uses_target(units) else None
    tags = {INVOCATION_TAG: record["id"], **({TARGET_TAG: target_identity} if target_identity else {})}
    return _execute(units, record["run_config"], instance, tags, log)


def failure_messages(result) -> list[str]:
    """One line per failed step: the step and its error message (a failed gate names its check)."""
    out = []
    for event in result.all_events:
        if event.is_step_failure:
            error = event.step_failure_data.error
            message = " ".join((error.message if error else "failed").split())
            out.append(f"{event.step_key}: {message[:400]}")
    if not out and not result.success:  # the run failed outside any step (e.g. its process died)
        out.append(f"run {getattr(result, 'run_id', None)}: {getattr(result, 'error', None) or 'failed before any step'}")
    return out


def list_shards(instance=None, log=print) -> list[str]:
    """Register a corpus_shards partition per source file and print them (what corpus_sensor adds)."""
    import dagster as dg

    from spec_assets.definitions import defs
    from spec_assets.partitions import corpus_shards

    instance = instance or dg.DagsterInstance.get()
    before = set(instance.get_dynamic_partitions(corpus_shards.name))
    shards = sync_shards(defs, instance)
    for shard in shards:
        log(f"{shard}{'' if shard in before else '  (new)'}")
    return shards


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="specdraft", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="materialize every asset for every shard, in dependency order")
    run.add_argument("--select", help="asset selection, e.g. 'source_corpus' or 'tokenized_shards+' (default: all)")
    run.add_argument("--config-json", help='run config, e.g. \'{"ops": {"tokenized_shards": {"config": {"max_length": 1024}}}}\'')
    run.add_argument("--only-stale-or-missing", action="store_true",
                     help="launch nothing for asset partitions whose latest materialization is current")
    run.add_argument("--resume", action="store_true",
                     help="re-run only what failed or never started in the last `specdraft run` (its selection and config)")
    run.add_argument("--dry-run", action="store_true", help="print the runs it would launch, launch nothing")
    sub.add_parser("shards", help="list the corpus shards and register new ones as partitions")
    args = parser.parse_args(argv)

    home = ensure_dagster_home()
    if args.command == "shards":
        list_shards()
        return 0
    if args.resume and (args.select or args.config_json or args.only_stale_or_missing or args.dry_run):
        parser.error("--resume repeats the last run's selection and config; it takes no other option")
    run_config = json.loads(args.config_json) if args.config_json else None
    t0 = time.time()
    if args.resume:
        results = resume_pipeline()
    else:
        results = run_pipeline(select=args.select or "*", run_config=run_config,
                               only_stale_or_missing=args.only_stale_or_missing, dry_run=args.dry_run)
    if args.dry_run:
        print("dry run: nothing launched")
        return 0
    failed = [line for r in results if not r.success for line in failure_messages(r)]
    if failed:
        print("specdraft run failed:\n  " + "\n  ".join(failed), file=sys.stderr)
        print(f"see the runs in the UI: DAGSTER_HOME={home} dagster dev -w workspace.yaml", file=sys.stderr)
        print("re-run what failed with: specdraft run --resume", file=sys.stderr)
        return 1
    print(f"specdraft run finished in {time.time() - t0:.1f}s: {len(results)} runs; recorded in DAGSTER_HOME={home}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
