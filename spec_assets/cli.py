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
    assets = all_assets

    shards = sync_shards(defs, instance)
    results = []
    if per_shard:
        for shard in shards:
            t0 = time.time()
            results.append(
                dg.materialize(assets, selection=per_shard, partition_key=shard, instance=instance,
                               resources=defs.resources, run_config=run_config)
            )
            log(f"shard {shard}: {', '.join(k.to_user_string() for k in per_shard)} in {time.time() - t0:.1f}s")
    if fan_in:
        t0 = time.time()
        results.append(
            dg.materialize(assets, selection=fan_in, instance=instance, resources=defs.resources, run_config=run_config)
        )
        log(f"{', '.join(k.to_user_string() for k in fan_in)} in {time.time() - t0:.1f}s")
    return results


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
    try:
        run_pipeline(select=args.select, run_config=run_config)
    except Exception as exc:  # a failed step: Dagster has logged it; say where to look
        print(f"specdraft run failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        print(f"see the run in the UI: DAGSTER_HOME={home} dagster dev -w workspace.yaml", file=sys.stderr)
        return 1
    print(f"specdraft run finished in {time.time() - t0:.1f}s; runs recorded in DAGSTER_HOME={home}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
