"""Shard runs in parallel: each shard's run is executed by Dagster's `execute_job` in its own
process, with the multiprocess executor (every step a subprocess), on the shared instance.

`specdraft run` with SPECDRAFT_PARALLEL=N keeps up to N shard runs going at once. Steps that
load the target carry the `target-<device kind>` pool (spec_assets.instance.target_pool): the
instance hands out that pool's slots (SPECDRAFT_TARGET_SLOTS, default 1 per pool) across all
runs, so N runs in flight never put more target-loading steps on a device than it has slots;
the other steps (source_corpus, tokenized_shards) overlap freely.

Needs an instance that takes concurrent writers: PostgreSQL (SPECDRAFT_PG_URL). SQLite locks.

Child: `python -m spec_assets.parallel SPEC.json` runs one unit (assets, partition, run config,
tags) of the definitions' `shard_job` and writes {"run_id", "success", "events"} to the spec's
`result` path (the events as Dagster's public `serialize_value` writes them).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field


@dataclass
class RunOutcome:
    """What an ExecuteInProcessResult tells `specdraft run`, for a run executed in another process:
    `success`, `run_id`, `dagster_run` and `all_events` (the run's DagsterEvents, as the child's
    ExecuteJobResult had them)."""

    run_id: str | None
    success: bool
    dagster_run: object = None
    all_events: list = field(default_factory=list)
    error: str | None = None  # the child died before Dagster recorded the failure


def _outcome(instance, result: dict, error: str | None) -> RunOutcome:
    import dagster as dg

    if result.get("run_id") is None:
        return RunOutcome(None, False, error=error)
    events = dg.deserialize_value(result["events"], list)
    return RunOutcome(result["run_id"], bool(result["success"]), instance.get_run_by_id(result["run_id"]), events, error)


def execute_parallel(units: list, run_config_for, tags_for, instance, log, parallel: int) -> list[RunOutcome]:
    """Run `units` (cli.Unit, one shard each) with up to `parallel` at once; outcomes in unit order.

    `run_config_for(unit)` and `tags_for(unit)` give each run's config and tags.
    """
    from spec_assets.instance import instance_home, require_concurrent_writers

    require_concurrent_writers(instance_home())
    lock = threading.Lock()

    def one(unit) -> RunOutcome:
        with tempfile.TemporaryDirectory(prefix="specdraft-run-") as tmp:
            spec_path, result_path = os.path.join(tmp, "spec.json"), os.path.join(tmp, "result.json")
            with open(spec_path, "w") as f:
                json.dump({"assets": [k.to_user_string() for k in unit.assets], "partition": unit.partition,
                           "run_config": run_config_for(unit), "tags": tags_for(unit), "result": result_path,
                           "max_concurrent": parallel}, f)
            # Own session: a Ctrl-C to `specdraft run` reaches it through Dagster's own handling.
            proc = subprocess.run([sys.executable, "-m", "spec_assets.parallel", spec_path], start_new_session=True)
            result = json.load(open(result_path)) if os.path.exists(result_path) else {}
        error = None if result else f"run process exited with {proc.returncode} before Dagster recorded a result"
        outcome = _outcome(instance, result, error)
        with lock:
            log(f"shard {unit.partition}: run {outcome.run_id} {'ok' if outcome.success else 'FAILED'}")
        return outcome

    with ThreadPoolExecutor(max_workers=parallel) as pool:
        return list(pool.map(one, units))


def shard_job():
    """The definitions' per-shard asset job, for `dg.reconstructable`: every step process of the
    multiprocess executor rebuilds the job by importing this module and calling this function."""
    from spec_assets.definitions import defs

    return defs.resolve_job_def("shard_job")


def _child(spec_path: str) -> int:
    import dagster as dg

    from spec_assets.instance import runner_tags
    from spec_assets.parallel import shard_job as importable  # not __main__'s copy: the step processes import it

    spec = json.load(open(spec_path))
    job = dg.reconstructable(importable)

    tags = {**spec["tags"], **runner_tags()}  # this process executes the run (release_dead_runs)
    if spec["partition"] is not None:
        tags["dagster/partition"] = spec["partition"]
    # forkserver with the code location, torch and transformers preloaded: a step process forks
    # ready instead of importing them again (seconds per step on a small machine).
    start = {"forkserver": {"preload_modules": ["spec_assets.definitions", "torch", "transformers", "training.targets.hf"]}}
    run_config = {**spec["run_config"], "execution": {"config": {"multiprocess": {
        "max_concurrent": spec["max_concurrent"], "start_method": start}}}}
    with dg.DagsterInstance.get() as instance:
        with dg.execute_job(job, instance, run_config=run_config, tags=tags,
                            asset_selection=[dg.AssetKey.from_user_string(a) for a in spec["assets"]]) as result:
            with open(spec["result"], "w") as f:
                json.dump({"run_id": result.run_id, "success": result.success,
                           "events": dg.serialize_value(list(result.all_events))}, f)
    return 0


if __name__ == "__main__":
    sys.exit(_child(sys.argv[1]))
