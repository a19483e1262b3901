"""Planning a `specdraft run`: its units (one run per shard, then the fan-ins), the blocking gates
that must run with what they guard, and, for `--only-stale-or-missing`, which asset partitions are
current. Reads the asset graph and the instance through Dagster's public API only."""

from __future__ import annotations

from dataclasses import dataclass, field

# The target model identity a run used: Dagster's staleness cannot see a changed SPECDRAFT_TARGET.
TARGET_TAG = "specdraft/target"
# The source file a shard's run read (URL and listing signature): the materialization metadata of a
# cache hit names the file that first produced the artifact, not the one this run listed.
SOURCE_TAG = "specdraft/source"
# Assets that never touch the target model: no target identity needed to run or to judge them.
TARGETLESS = {"source_corpus"}


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


class AssetGraph:
    """The asset graph read from the AssetsDefinitions' public properties: parents, partitioning,
    code version, op name, blocking checks, and the keys in dependency order."""

    def __init__(self, assets):
        self.assets = list(assets)
        self.by_key = {key: a for a in self.assets for key in a.keys}
        self.ordered: list = []
        seen: set = set()

        def visit(key):  # depth-first, parents first, in the definitions' order: stable plans
            if key not in seen:
                seen.add(key)
                for parent in sorted(self.parents(key), key=self.keys().index):
                    visit(parent)
                self.ordered.append(key)

        for key in self.keys():
            visit(key)
        self.gated = {c.asset_key for a in self.assets for c in a.check_specs if c.blocking}

    def keys(self) -> list:
        return list(self.by_key)

    def parents(self, key) -> set:
        return {p for p in self.by_key[key].asset_deps[key] if p in self.by_key}

    def partitioned(self, key) -> bool:
        return self.by_key[key].partitions_def is not None

    def code_version(self, key) -> str | None:
        return self.by_key[key].get_asset_spec(key).code_version

    def op_name(self, key) -> str:
        return self.by_key[key].op.name


def plan_units(graph: AssetGraph, select: str, shards: list[str]) -> list[Unit]:
    """One unit per shard over the selected per-shard assets, then one unit over the selected fan-ins."""
    import dagster as dg

    selected = dg.AssetSelection.from_string(select).resolve(graph.assets)
    ordered = [k for k in graph.ordered if k in selected]
    per_shard = [k for k in ordered if graph.partitioned(k)]
    fan_in = [k for k in ordered if not graph.partitioned(k)]
    units = [Unit(list(per_shard), shard) for shard in shards] if per_shard else []
    return units + ([Unit(fan_in)] if fan_in else [])


def with_gates(graph: AssetGraph, unit_assets: list, to_run: list) -> list:
    """`to_run` plus every blocking-checked parent in the unit of an asset in it, in unit order:
    a blocking check only stops downstream steps of its own run (DESIGN.md)."""
    keep = set(to_run)
    frontier = list(keep)
    while frontier:
        for parent in graph.parents(frontier.pop()):
            if parent in graph.gated and parent in unit_assets and parent not in keep:
                keep.add(parent)
                frontier.append(parent)
    return [k for k in unit_assets if k in keep]


class CurrentnessJudge:
    """Decides whether an asset partition's latest materialization is current, without running it.

    Current means: materialized with the code version the asset has now; every input partition
    it read (its own shard's, or every shard's for a fan-in) still has the fingerprint it read
    (its `inputs` metadata), none is new and none gone; its run used the same effective op config
    and target model; its artifact is still in the object store; and, for source_corpus, the
    source file has the URL and listing signature its run recorded. Built on Dagster's public
    records (materializations, their metadata and DataProvenance code version, runs).
    Anything this cannot see (an edited prompt file, another generation backend) needs a plain
    `specdraft run`, whose fingerprints cover every input.
    """

    def __init__(self, instance, defs, graph: AssetGraph, run_config: dict, target_identity: str | None,
                 sources: dict[str, str]):
        import dagster as dg

        self.instance = instance
        self.graph = graph
        # One job per asset, only to let Dagster fill an op config's defaults (validate_run_config).
        self.config_defs = dg.Definitions(
            assets=graph.assets, resources=defs.resources,
            jobs=[dg.define_asset_job(f"config_of_{graph.op_name(k)}", selection=[k]) for k in graph.keys()])
        self.run_config = run_config
        self.target_identity = target_identity
        self.sources = sources  # shard -> SOURCE_TAG value of its file now
        self._runs: dict = {}
        self._config_jobs: dict = {}

    def _latest(self, key, partition: str | None):
        import dagster as dg

        records = self.instance.fetch_materializations(dg.AssetRecordsFilter(
            asset_key=key, asset_partitions=[partition] if partition else None), limit=1).records
        return records[0] if records else None

    def _effective_config(self, key, run_config: dict | None) -> dict:
        """The asset's op config with its defaults filled in, as Dagster would run it."""
        import dagster as dg

        name = key.to_user_string()
        op_config = (((run_config or {}).get("ops") or {}).get(name) or {}).get("config") or {}
        if key not in self._config_jobs:
            self._config_jobs[key] = self.config_defs.resolve_job_def(f"config_of_{self.graph.op_name(key)}")
        job = self._config_jobs[key]
        try:
            return dg.validate_run_config(job, {"ops": {name: {"config": op_config}}})["ops"][name]["config"]
        except dg.DagsterInvalidConfigError:
            return {"invalid": op_config}

    def _run(self, run_id: str):
        if run_id not in self._runs:
            self._runs[run_id] = self.instance.get_run_by_id(run_id)
        return self._runs[run_id]

    def _changed_input(self, key, partition: str | None, record) -> str | None:
        """The first input partition whose fingerprint differs from the one `record` read, that is
        new, or, for a fan-in, that is gone. What it read is the materialization's own `inputs`
        metadata (spec_assets/artifact_step.py), exact whatever order concurrent runs committed in;
        a parent it did not read (the other data asset of a draft_model mode, the corpus when
        eval_report reads a prompt file) cannot have changed its output."""
        from spec_assets.artifact_step import input_name
        from spec_assets.metadata import recorded
        from spec_assets.partitions import corpus_shards

        read = recorded(record, "inputs")
        if read is None:
            return "inputs not recorded"  # made before specdraft recorded them: run once more, a cache hit
        for parent in sorted(self.graph.parents(key)):
            asset = parent.to_user_string()
            fan_in = partition is None and self.graph.partitioned(parent)
            if not fan_in:
                names = {partition if self.graph.partitioned(parent) else None: input_name(asset)}
            else:
                shards = sorted(self.instance.get_dynamic_partitions(corpus_shards.name))
                names = {p: input_name(asset, p) for p in shards}
                gone = sorted(n for n in read if n.startswith(f"{asset}/") and n not in names.values())
                if gone:
                    return f"input {asset} [{gone[0].removeprefix(f'{asset}/')}] gone"
            if not any(n in read for n in names.values()):
                continue  # not an input it read
            for p, name in names.items():
                where = f"{asset}{f' [{p}]' if p else ''}"
                latest = self._latest(parent, p)
                if latest is None:
                    return f"input {where} missing"
                if name not in read:
                    return f"input {where} new"
                if read[name] != recorded(latest, "fingerprint"):
                    return f"input {where} changed"
        return None

    def why_not_current(self, key, partition: str | None) -> str | None:
        """None when current, else the first reason it is not (for the log)."""
        import dagster as dg

        from training.filesystem import filesystem

        record = self._latest(key, partition)
        if record is None:
            return "missing"
        provenance = dg.DataProvenance.from_tags(record.asset_materialization.tags or {})
        if provenance is None or provenance.code_version != self.graph.code_version(key):
            return "new code version"
        changed = self._changed_input(key, partition, record)
        if changed:
            return changed
        run = self._run(record.run_id)
        if run is None:
            return "its run was deleted"
        if self._effective_config(key, run.run_config) != self._effective_config(key, self.run_config):
            return "config changed"
        if key.to_user_string() not in TARGETLESS and run.tags.get(TARGET_TAG) != self.target_identity:
            return "target model changed (or not recorded)"
        path = record.asset_materialization.metadata.get("path")
        if path is None:
            return "no artifact path recorded"
        fs, root = filesystem(path.value)
        if not fs.exists(f"{root.rstrip('/')}/manifest.json"):
            return "artifact missing from the store"
        if key.to_user_string() == "source_corpus" and partition is not None:
            if partition not in self.sources:
                return "source file gone"
            if run.tags.get(SOURCE_TAG) != self.sources[partition]:
                return "source file changed, moved (or not recorded)"
        return None


def trim_current(units: list[Unit], judge: CurrentnessJudge, log) -> list[Unit]:
    """Drop current asset partitions; keep whatever sits below something that will run."""
    graph = judge.graph
    scheduled: set = set()  # (AssetKey, partition) that will run in this invocation
    trimmed = []
    for unit in units:
        to_run = []
        for key in unit.assets:
            upstream_runs = any(
                parent == k and (unit.partition is None or p in (unit.partition, None))
                for parent in graph.parents(key) for k, p in scheduled
            )
            reason = "an input runs in this invocation" if upstream_runs else judge.why_not_current(key, unit.partition)
            if reason is not None:
                to_run.append(key)
                scheduled.add((key, unit.partition))
                log(f"  {key.to_user_string()}{f' [{unit.partition}]' if unit.partition else ''}: {reason}")
        to_run = with_gates(graph, unit.assets, to_run)
        scheduled.update((k, unit.partition) for k in to_run)
        trimmed.append(Unit(to_run, unit.partition, [k for k in unit.assets if k not in to_run]))
    return trimmed
