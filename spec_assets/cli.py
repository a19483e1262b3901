"""`specdraft run`: the main job from the command line, on a persistent Dagster instance.

It materializes the selected assets for every corpus shard, per-shard stages first (one run per
shard), then the fan-ins (one run), so the runs and their lineage show in `dagster dev`.
Unchanged steps are cache hits, so running it again costs little.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from training.paths import default_dagster_home


def ensure_dagster_home() -> Path:
    """DAGSTER_HOME, defaulting to a folder in the project's data dir, with telemetry off (no network)."""
    home = Path(os.environ.get("DAGSTER_HOME") or default_dagster_home()).resolve()
    home.mkdir(parents=True, exist_ok=True)
    config = home / "dagster.yaml"
    if not config.exists():
        config.write_text("telemetry:\n  enabled: false\n")
    os.environ["DAGSTER_HOME"] = str(home)
    return home


def sync_shards(defs, instance) -> list[str]:
    """Add a corpus_shards partition for every source file (what corpus_sensor does on a tick)."""
    from spec_assets.partitions import corpus_shards

    shards = [s.shard for s in defs.resources["corpus"].sources()]
    existing = set(instance.get_dynamic_partitions(corpus_shards.name))
    new = [s for s in shards if s not in existing]
    if new:
        instance.add_dynamic_partitions(corpus_shards.name, new)
    return shards


def _config_for(run_config: dict, keys) -> dict:
    """The part of a run config that a run over `keys` accepts (Dagster rejects config for other assets)."""
    names = {k.to_user_string() for k in keys}
    ops = {name: cfg for name, cfg in run_config.get("ops", {}).items() if name in names}
    return {**{k: v for k, v in run_config.items() if k != "ops"}, **({"ops": ops} if ops else {})}


def run_pipeline(select: str = "*", run_config: dict | None = None, instance=None, log=print):
    """Materialize `select` (a Dagster asset selection string) for every shard, in dependency order."""
    import dagster as dg

    from spec_assets.definitions import all_assets, defs

    instance = instance or dg.DagsterInstance.get()
    # The console shows step progress and our log lines, not every engine event (the UI has those).
    run_config = {"loggers": {"console": {"config": {"log_level": "INFO"}}}, **(run_config or {})}
    graph = defs.resolve_asset_graph()
    selected = dg.AssetSelection.from_string(select).resolve(graph)
    ordered = [k for k in graph.toposorted_asset_keys if k in selected]
    per_shard = [k for k in ordered if graph.get(k).partitions_def is not None]
    fan_in = [k for k in ordered if graph.get(k).partitions_def is None]

    shards = sync_shards(defs, instance)
    results = []

    def run(selection, partition_key=None):
        t0 = time.time()
        result = dg.materialize(all_assets, selection=selection, partition_key=partition_key, instance=instance,
                                resources=defs.resources, run_config=_config_for(run_config, selection),
                                raise_on_error=False)
        results.append(result)
        where = f"shard {partition_key}: " if partition_key else ""
        status = "ok" if result.success else "FAILED: " + "; ".join(failure_messages(result))
        log(f"{where}{', '.join(k.to_user_string() for k in selection)} in {time.time() - t0:.1f}s {status}")
        return result.success

    per_shard_ok = all([run(per_shard, shard) for shard in shards]) if per_shard else True
    # A fan-in over a failed shard would fail on its missing input; report the shard instead.
    if fan_in and per_shard_ok:
        run(fan_in)
    return results


def failure_messages(result) -> list[str]:
    """One line per failed step: the step and its error message (a failed gate names its check)."""
    out = []
    for event in result.all_events:
        if event.is_step_failure:
            error = event.step_failure_data.error
            message = " ".join((error.message if error else "failed").split())
            out.append(f"{event.step_key}: {message[:400]}")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="specdraft", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="materialize every asset for every shard, in dependency order")
    run.add_argument("--select", default="*", help="asset selection, e.g. 'source_corpus' or 'tokenized_shards+' (default: all)")
    run.add_argument("--config-json", help='run config, e.g. \'{"ops": {"tokenized_shards": {"config": {"max_length": 1024}}}}\'')
    args = parser.parse_args(argv)

    home = ensure_dagster_home()
    run_config = json.loads(args.config_json) if args.config_json else None
    t0 = time.time()
    results = run_pipeline(select=args.select, run_config=run_config)
    failed = [line for r in results if not r.success for line in failure_messages(r)]
    if failed:
        print("specdraft run failed:\n  " + "\n  ".join(failed), file=sys.stderr)
        print(f"see the runs in the UI: DAGSTER_HOME={home} dagster dev -w workspace.yaml", file=sys.stderr)
        return 1
    print(f"specdraft run finished in {time.time() - t0:.1f}s; runs recorded in DAGSTER_HOME={home}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
