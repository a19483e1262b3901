"""`specdraft run`: the main job from the command line, on a persistent Dagster instance.

It materializes the selected assets for every corpus shard, per-shard stages first (one run per
shard), then the fan-ins (one run), so the runs and their lineage show in `dagster dev`, and ends
by saying what it made (spec_assets/run_summary.py). Unchanged steps are cache hits, so running it
again costs little; `--only-stale-or-missing` does not even launch the runs whose assets are
current, and `--resume` finishes what the last `specdraft run` left failed or never started.
Dagster's public API only: no private module, no storage internal
(tests/spec_assets/test_definitions.py scans every module for them).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import uuid
from pathlib import Path

from spec_assets.plan import (
    SOURCE_TAG,
    TARGET_TAG,
    TARGETLESS,
    AssetGraph,
    CurrentnessJudge,
    Unit,
    plan_units,
    trim_current,
    with_gates,
)
from training.paths import default_dagster_home

# Every run of one `specdraft run` carries its invocation id and the invocation's plan (selection,
# run config, units, start time) as JSON: the runs are the record `--resume` reads back, through
# Dagster's public run and materialization records (as a backfill's runs carry its id).
INVOCATION_TAG = "specdraft/invocation"
PLAN_TAG = "specdraft/plan"
COMMAND_TAG = "specdraft/command"  # "run" on every run `specdraft run` launches: the last one is found by it


def ensure_dagster_home() -> Path:
    """DAGSTER_HOME, defaulting to a folder in the project's data dir, with telemetry and the UI's
    newsletter dialog off (neither reaches the network)."""
    home = Path(os.environ.get("DAGSTER_HOME") or default_dagster_home()).resolve()
    home.mkdir(parents=True, exist_ok=True)
    from spec_assets.definitions import build_defs
    from spec_assets.instance import InstanceConfigError, preflight

    # The Ray cluster's address as the ray_cluster resource has it (definitions.py: SPECDRAFT_RAY_ADDRESS).
    with build_defs().resources["ray_cluster"].process_config_and_initialize_cm() as ray_cluster:
        ray_address = ray_cluster.ray_address()
    try:
        # dagster.yaml (SQLite, or PostgreSQL from SPECDRAFT_PG_URL); reachable servers
        preflight(home, ray_address=ray_address)
    except InstanceConfigError as exc:
        raise SystemExit(f"specdraft: {exc}") from None
    os.environ["DAGSTER_HOME"] = str(home)
    return home


def open_instance():
    """The Dagster instance every command records its runs in (DAGSTER_HOME's dagster.yaml)."""
    import dagster as dg

    return dg.DagsterInstance.get()


def _resource(defs, name: str):
    """A resource of the definitions, initialized as a run would (its EnvVars resolved now)."""
    return defs.resources[name].process_config_and_initialize()


def source_signature(url: str, listing_signature: str) -> str:
    """What SOURCE_TAG records: the file's URL and its listing signature."""
    return f"{url} {listing_signature}"


def sync_shards(defs, instance):
    """Make the corpus_shards partitions match the source files, as corpus_sensor does on a tick:
    one per file, none for a file that is gone. Returns the spec_assets.corpus.ShardSync (shards in
    listing order, URLs, signatures, new, removed)."""
    from spec_assets.corpus import plan_shard_sync
    from spec_assets.partitions import corpus_shards

    sync = plan_shard_sync(_resource(defs, "corpus"), instance.get_dynamic_partitions(corpus_shards.name))
    if sync.new:
        instance.add_dynamic_partitions(corpus_shards.name, sync.new)
    for gone in sync.removed:
        instance.delete_dynamic_partition(corpus_shards.name, gone)
    return sync


def _config_for(run_config: dict, keys) -> dict:
    """The part of a run config that a run over `keys` accepts (Dagster rejects config for other assets)."""
    names = {k.to_user_string() for k in keys}
    ops = {name: cfg for name, cfg in run_config.get("ops", {}).items() if name in names}
    return {**{k: v for k, v in run_config.items() if k != "ops"}, **({"ops": ops} if ops else {})}


def _target_identity(defs) -> str:
    return _resource(defs, "target").identity()


def _uses_target(units: list[Unit]) -> bool:
    return any(k.to_user_string() not in TARGETLESS for u in units for k in u.assets)


def _invocation_tags(record: dict) -> dict[str, str]:
    plan = {k: record[k] for k in ("select", "run_config", "started", "units")}
    return {COMMAND_TAG: "run", INVOCATION_TAG: record["id"], PLAN_TAG: json.dumps(plan, sort_keys=True)}


def load_last_invocation(instance) -> dict | None:
    """The last `specdraft run` on this instance that launched a run: id, selection, run config,
    units, and `done`, the [asset, partition] pairs one of its runs materialized."""
    import dagster as dg

    latest = instance.get_run_records(filters=dg.RunsFilter(tags={COMMAND_TAG: "run"}), limit=1)
    if not latest:
        return None
    tags = latest[0].dagster_run.tags
    record = {"id": tags[INVOCATION_TAG], **json.loads(tags[PLAN_TAG])}
    run_ids = {r.dagster_run.run_id for r in instance.get_run_records(
        filters=dg.RunsFilter(tags={INVOCATION_TAG: record["id"]}))}
    done = set()
    for unit in record["units"]:
        for asset in unit["assets"]:
            recs = instance.fetch_materializations(dg.AssetRecordsFilter(
                asset_key=dg.AssetKey.from_user_string(asset), after_timestamp=record["started"],
                asset_partitions=[unit["partition"]] if unit["partition"] is not None else None), limit=1000).records
            if any(r.run_id in run_ids for r in recs):
                done.add((asset, unit["partition"]))
    record["done"] = sorted(done, key=str)
    return record


def _execute(units: list[Unit], record: dict, instance, tags: dict, log, defs) -> list:
    """One in-process run per unit; the fan-in unit only when every shard unit succeeded. Every run
    carries the invocation's tags, so `--resume` finds what its runs materialized."""
    import dagster as dg

    from spec_assets.definitions import all_assets
    from spec_assets.instance import release_dead_runs, runner_tags

    release_dead_runs(instance, log)  # a killed earlier run would hold its pool slot forever
    tags = {**tags, **runner_tags()}
    # Source files are listed once, when some unit reads one (their signatures go in the run tags).
    source_asset = dg.AssetKey("source_corpus")
    reads_sources = any(u.partition is not None and source_asset in u.assets for u in units)
    sources = _current_sources(defs) if reads_sources else {}
    results = []
    shards_ok = True

    def unit_tags_for(unit) -> dict:
        unit_tags = dict(tags)
        if unit.partition is not None and source_asset in unit.assets and unit.partition in sources:
            unit_tags[SOURCE_TAG] = sources[unit.partition]  # a file gone since fails the step
        return unit_tags

    from spec_assets.instance import shard_parallelism

    in_parallel = {}  # id(unit) -> RunOutcome: shard runs executed out of process, SPECDRAFT_PARALLEL at once
    shard_units = [u for u in units if u.assets and u.partition is not None]
    if shard_parallelism() > 1 and len(shard_units) > 1:
        from spec_assets.parallel import execute_parallel

        t0 = time.time()
        outcomes = execute_parallel(shard_units, lambda u: _config_for(record["run_config"], u.assets), unit_tags_for,
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
            resources=defs.resources, run_config=_config_for(record["run_config"], unit.assets),
            tags=unit_tags_for(unit), raise_on_error=False)
        results.append(result)
        if unit.partition is not None:
            shards_ok = shards_ok and result.success
        where = f"shard {unit.partition}: " if unit.partition else ""
        status = "ok" if result.success else "FAILED: " + "; ".join(failure_messages(result))
        log(f"{where}{', '.join(k.to_user_string() for k in unit.assets)} in {time.time() - t0:.1f}s {status}")
    return results


def _current_sources(defs) -> dict[str, str]:
    """shard -> SOURCE_TAG value (URL and listing signature) of its source file now."""
    from spec_assets.corpus import plan_shard_sync

    sync = plan_shard_sync(_resource(defs, "corpus"), [])
    return {s: source_signature(sync.urls[s], sync.signatures[s]) for s in sync.shards}


def _console_config(run_config: dict | None) -> dict:
    # The console shows step progress and our log lines, not every engine event (the UI has those).
    return {"loggers": {"console": {"config": {"log_level": "INFO"}}}, **(run_config or {})}


def run_pipeline(select: str = "*", run_config: dict | None = None, instance=None, log=print,
                 only_stale_or_missing: bool = False, dry_run: bool = False):
    """Materialize `select` (a Dagster asset selection string) for every shard, in dependency order.

    Returns the runs' results in launch order. With `only_stale_or_missing`, asset partitions whose
    latest materialization is current are not run at all; `dry_run` plans and launches nothing.
    """
    from spec_assets.definitions import all_assets, build_defs

    defs = build_defs()  # over the environment of this call
    instance = instance or open_instance()
    run_config = _console_config(run_config)
    graph = AssetGraph(all_assets)
    sync = sync_shards(defs, instance)
    units = plan_units(graph, select, sync.shards)
    # The identity hashes the target's files (the default demo target is built on first use): only
    # when a run will use it or staleness is judged against it.
    needs_identity = _uses_target(units) and (only_stale_or_missing or not dry_run)
    target_identity = _target_identity(defs) if needs_identity else None

    if only_stale_or_missing:
        sources = {s: source_signature(sync.urls[s], sync.signatures[s]) for s in sync.shards}
        judge = CurrentnessJudge(instance, defs, graph, run_config, target_identity, sources)
        units = trim_current(units, judge, log)
        skipped = sum(len(u.skipped) for u in units)
        units = [u for u in units if u.assets]
        log(f"only stale or missing: {skipped} asset partitions current, {len(units)} runs to launch")
    if dry_run:
        for unit in units:
            log(f"would run {unit.partition or 'fan-in'}: {', '.join(k.to_user_string() for k in unit.assets)}")
        return []

    record = {"id": str(uuid.uuid4()), "select": select, "run_config": run_config, "started": time.time(),
              "units": [u.to_json() for u in units]}
    tags = {**_invocation_tags(record), **({TARGET_TAG: target_identity} if target_identity else {})}
    return _execute(units, record, instance, tags, log, defs)


def resume_pipeline(instance=None, log=print):
    """Run again what the last `specdraft run` left failed or never started: same plan, same config,
    same invocation id, so a second resume continues where this one stops. Returns the results."""
    from spec_assets.definitions import all_assets, build_defs

    defs = build_defs()  # over the environment of this call
    instance = instance or open_instance()
    record = load_last_invocation(instance)
    if record is None:
        log("nothing to resume: no specdraft run recorded on this instance")
        return []
    graph = AssetGraph(all_assets)
    done = {(asset, partition) for asset, partition in record.get("done", [])}
    units = []
    for unit in map(Unit.from_json, record["units"]):
        remaining = [k for k in unit.assets if (k.to_user_string(), unit.partition) not in done]
        if remaining:
            units.append(Unit(with_gates(graph, unit.assets, remaining), unit.partition))
    if not units:
        log(f"nothing to resume: every step of invocation {record['id']} succeeded")
        return []
    log(f"resuming invocation {record['id']}: " + "; ".join(
        f"{u.partition or 'fan-in'}: {', '.join(k.to_user_string() for k in u.assets)}" for u in units))
    target_identity = _target_identity(defs) if _uses_target(units) else None
    tags = {**_invocation_tags(record), **({TARGET_TAG: target_identity} if target_identity else {})}
    return _execute(units, record, instance, tags, log, defs)


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
    from spec_assets.definitions import build_defs

    sync = sync_shards(build_defs(), instance or open_instance())
    for shard in sync.shards:
        log(f"{shard}{'  (new)' if shard in sync.new else ''}")
    return sync.shards


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
    from spec_assets.run_summary import print_summary

    failed = [line for r in results if not r.success for line in failure_messages(r)]
    print_summary(results, home, time.time() - t0, failed)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
