"""Incremental recomputation on a persistent Dagster instance (DAGSTER_HOME in a temp folder).

One module-scoped pipeline on a tiny random target, then, in order: an unchanged re-run, a new
source file, a tokenization config change, and a code-version bump seen through Dagster's GraphQL
staleness. Each test asserts which steps were cache hits (same fingerprint = same DataVersion) and
which were recomputed. eval_report's blocking gate is set to fail (min_tau above its ceiling), so
released_draft never runs here; the assertions cover every other asset.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import dagster as dg
import pytest

from spec_assets.cli import failure_messages, run_pipeline
from spec_assets.tokenize import tokenized_shards
from tests.spec_assets.conftest import graph_env
from tests.webserver import dagster_webserver
from training.demo.corpus import write_demo_corpus

ROOT = Path(__file__).resolve().parents[2]

PER_SHARD = ("source_corpus", "resampled_corpus", "tokenized_shards", "hidden_states")
FAN_IN = ("vocab_map", "draft_model", "eval_report")  # released_draft: blocked by the gate
DATA_VERSION_TAG = "dagster/data_version"

SMALL = {
    "ops": {
        "source_corpus": {"config": {"heldout_fraction": 0.2}},
        "resampled_corpus": {"config": {"max_new_tokens": 8, "batch_size": 16}},
        "tokenized_shards": {"config": {"max_length": 128}},
        "hidden_states": {"config": {"max_tokens_per_batch": 2048}},
        "draft_model": {"config": {"epochs": 1, "max_steps": 2, "ttt_length": 2, "max_tokens_per_batch": 1024}},
        "eval_report": {"config": {"ks": [1, 2], "temperatures": [0.0], "max_new_tokens": 4, "max_prompts": 2,
                                   # above the ceiling k+1 = 3: the gate fails whatever the draft
                                   "gate_k": 2, "min_tau": 4.0, "served": False}},
    }
}

# The same definitions with tokenized_shards' code_version bumped, as a second code location.
BUMPED_DEFS = '''
import dagster as dg

from spec_assets import definitions as base


def _bump(spec):
    if spec.key == dg.AssetKey("tokenized_shards"):
        return spec.replace_attributes(code_version=str(int(spec.code_version) + 1))
    return spec


assets = [a.map_asset_specs(_bump) for a in base.all_assets]
defs = dg.Definitions(assets=assets, resources=base.build_resources())
'''

STALENESS = """
query Staleness($keys: [AssetKeyInput!], $partition: String) {
  assetNodes(assetKeys: $keys) {
    assetKey { path }
    opVersion
    staleStatus(partition: $partition)
    staleCauses(partition: $partition) { key { path } partitionKey category reason }
  }
}
"""


@dataclass
class Pipeline:
    corpus: Path
    home: Path
    first: dict  # (asset, partition) -> AssetMaterialization of the first, cold run
    first_seconds: float

    def instance(self) -> dg.DagsterInstance:
        """A fresh handle on the instance in DAGSTER_HOME: the state lives on disk, not in this process."""
        return dg.DagsterInstance.get()

    def shards(self) -> list[str]:
        return sorted(p.stem for p in self.corpus.glob("*.jsonl"))


def steps(results) -> dict:
    """(asset, partition) -> the AssetMaterialization each step of these runs recorded."""
    out = {}
    for result in results:
        for event in result.get_asset_materialization_events():
            m = event.materialization
            key = (m.asset_key.to_user_string(), m.partition)
            assert key not in out, f"{key} materialized twice"
            out[key] = m
    return out


def cache_hit(m: dg.AssetMaterialization) -> bool:
    return m.metadata["cache_hit"].value


def run(config: dict, **kwargs) -> tuple[dict, float]:
    """`specdraft run` in process on a new instance handle; every failure must be the gate's."""
    t0 = time.perf_counter()
    with dg.DagsterInstance.get() as instance:
        results = run_pipeline(run_config=config, instance=instance, log=lambda _: None, **kwargs)
    seconds = time.perf_counter() - t0
    failures = [line for r in results for line in failure_messages(r)]
    assert all(line.startswith("eval_report: ") and "beats_prompt_lookup" in line for line in failures), failures
    return steps(results), seconds


def expected_keys(shards) -> set:
    return {(a, s) for a in PER_SHARD for s in shards} | {(a, None) for a in FAN_IN}


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory, tiny_target):
    root = tmp_path_factory.mktemp("incremental")
    env = graph_env(root, tiny_target, n_shards=2)
    corpus, home = Path(env["SPECDRAFT_CORPUS"]), Path(env["DAGSTER_HOME"])
    with pytest.MonkeyPatch.context() as mp:
        for key, value in env.items():
            mp.setenv(key, value)
        first, seconds = run(SMALL)
        assert set(first) == expected_keys(["demo-00000", "demo-00001"])
        assert not any(cache_hit(m) for m in first.values()), "a cold store cannot have cache hits"
        yield Pipeline(corpus=corpus, home=home, first=first, first_seconds=seconds)


def test_unchanged_rerun_is_all_cache_hits_with_the_same_data_versions(pipeline):
    again, seconds = run(SMALL)
    assert set(again) == set(pipeline.first)
    for key, m in again.items():
        assert cache_hit(m), f"{key} was recomputed"
        assert m.tags[DATA_VERSION_TAG] == pipeline.first[key].tags[DATA_VERSION_TAG], key
        assert m.metadata["fingerprint"].value == m.tags[DATA_VERSION_TAG], key
    # Dagster's own record of the latest version agrees (the instance on disk, a fresh handle).
    with pipeline.instance() as instance:
        record = instance.get_latest_data_version_record(dg.AssetKey("draft_model"))
        assert record.asset_materialization.tags[DATA_VERSION_TAG] == again[("draft_model", None)].tags[DATA_VERSION_TAG]
    print(f"\nunchanged re-run: {seconds:.1f}s vs cold run {pipeline.first_seconds:.1f}s "
          f"({seconds / pipeline.first_seconds:.0%}; launch overhead only, see bench/bench_incremental.py)")


def test_every_materialization_records_the_fingerprint_of_each_input_it_read(pipeline):
    """The `inputs` metadata `--only-stale-or-missing` judges by (spec_assets/plan.py): for every
    asset of the graph, each parent it reads is named with the fingerprint that parent has, one
    entry per shard for a fan-in. Unread here: offline training does not read tokenized_shards, and
    eval_report reads the held-out rows of source_corpus (no prompt file in this environment)."""
    from spec_assets.artifact_step import input_name
    from spec_assets.definitions import defs
    from spec_assets.plan import AssetGraph

    graph, unread = AssetGraph(defs.assets), {("draft_model", "tokenized_shards")}
    shards = ["demo-00000", "demo-00001"]
    checked = set()
    for (asset, partition), m in pipeline.first.items():
        inputs = m.metadata["inputs"].value
        for parent in (p.to_user_string() for p in graph.parents(dg.AssetKey(asset))):
            expected = ({input_name(parent): pipeline.first[(parent, partition)]} if partition or (parent, None) in pipeline.first
                        else {input_name(parent, s): pipeline.first[(parent, s)] for s in shards})
            if (asset, parent) in unread:
                assert not set(expected) & set(inputs), (asset, parent, inputs)
                continue
            for name, read in expected.items():
                assert inputs.get(name) == read.metadata["fingerprint"].value, (asset, partition, name, inputs)
            checked.add((asset, parent))
    # every parent edge of the graph but released_draft's (the gate blocks it here)
    assert checked == {(k.to_user_string(), p.to_user_string()) for k in graph.keys() for p in graph.parents(k)
                       if k.to_user_string() != "released_draft"} - unread


def test_new_source_file_computes_its_shard_and_the_fan_ins_only(pipeline, tmp_path):
    before = pipeline.shards()
    write_demo_corpus(tmp_path / "extra", n_shards=1, rows_per_shard=16, seed=7)
    shutil.copy(tmp_path / "extra" / "demo-00000.jsonl", pipeline.corpus / "demo-00099.jsonl")

    done, _ = run(SMALL)
    assert set(done) == expected_keys([*before, "demo-00099"])
    recomputed = {key for key, m in done.items() if not cache_hit(m)}
    assert recomputed == {(a, "demo-00099") for a in PER_SHARD} | {(a, None) for a in FAN_IN}
    with pipeline.instance() as instance:
        assert "demo-00099" in instance.get_dynamic_partitions("corpus_shards")
    assert done[("vocab_map", None)].metadata["shards"].value == len(before) + 1
    assert done[("draft_model", None)].metadata["shards"].value == len(before) + 1


def test_tokenization_config_change_recomputes_only_what_depends_on_it(pipeline):
    baseline, _ = run(SMALL)  # whatever ran before, start from a state that is current for SMALL
    config = {"ops": {**SMALL["ops"], "tokenized_shards": {"config": {"max_length": 96}}}}
    done, _ = run(config)
    shards = pipeline.shards()
    assert set(done) == expected_keys(shards)
    recomputed = {key for key, m in done.items() if not cache_hit(m)}
    assert recomputed == ({(a, s) for a in ("tokenized_shards", "hidden_states") for s in shards}
                          | {(a, None) for a in ("vocab_map", "draft_model", "eval_report")})
    for key in done.keys() - recomputed:  # source_corpus and resampled_corpus, every shard
        assert key[0] in ("source_corpus", "resampled_corpus")
        assert done[key].tags[DATA_VERSION_TAG] == baseline[key].tags[DATA_VERSION_TAG]
    for key in recomputed:
        assert done[key].tags[DATA_VERSION_TAG] != baseline[key].tags[DATA_VERSION_TAG], key
    # The new max_length took effect: conversations are cut shorter.
    tokens = {k[1]: m.metadata["tokens"].value for k, m in done.items() if k[0] == "tokenized_shards"}
    assert sum(tokens.values()) < sum(baseline[("tokenized_shards", s)].metadata["tokens"].value for s in shards)


def staleness(server, shards) -> dict:
    """(asset, partition) -> (staleStatus, root causes [(asset, partition, category, reason)], code version),
    from the webserver's GraphQL API, as the UI asks it."""
    out = {}
    queries = [(PER_SHARD, s) for s in shards] + [((*FAN_IN, "released_draft"), None)]
    for assets, partition in queries:
        data = server.graphql(STALENESS, {"keys": [{"path": [a]} for a in assets], "partition": partition})
        for node in data["assetNodes"]:
            causes = [(c["key"]["path"][0], c["partitionKey"], c["category"], c["reason"]) for c in node["staleCauses"]]
            out[(node["assetKey"]["path"][0], partition)] = (node["staleStatus"], causes, node["opVersion"])
    return out


def test_code_version_bump_shows_stale_in_dagster_and_a_run_clears_it(pipeline, tmp_path):
    run(SMALL)  # current everywhere (cache hits when the earlier tests ran)
    shards = pipeline.shards()
    bumped_file = tmp_path / "bumped_defs.py"
    bumped_file.write_text(BUMPED_DEFS)

    # Two webservers on the pipeline's instance: the code location as it is, and with the bump.
    env = {"DAGSTER_HOME": str(pipeline.home), "PYTHONPATH": str(ROOT)}
    with dagster_webserver(["-m", "spec_assets.definitions"], env, tmp_path / "base.log") as base_server, \
            dagster_webserver(["-f", str(bumped_file), "-a", "defs"], env, tmp_path / "bumped.log") as bumped_server, \
            pipeline.instance() as instance:
        base = staleness(base_server, shards)
        assert {k: v[0] for k, v in base.items() if k[0] != "released_draft"} == {
            k: "FRESH" for k in expected_keys(shards)}
        assert base[("released_draft", None)][0] == "MISSING"  # the gate never let it run

        bumped = staleness(bumped_server, shards)
        for shard in shards:
            status, causes, version = bumped[("tokenized_shards", shard)]
            assert (status, causes) == ("STALE", [("tokenized_shards", shard, "CODE", "has a new code version")])
            assert version == str(int(tokenized_shards.code_versions_by_key[tokenized_shards.key]) + 1)
        # Staleness is one step deep: nothing else is stale until the new code runs.
        assert {k for k, v in bumped.items() if v[0] == "STALE"} == {("tokenized_shards", s) for s in shards}

        # A run of the bumped asset clears it; its new data version makes the next step stale.
        import importlib.util

        spec = importlib.util.spec_from_file_location("bumped_defs", bumped_file)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        for shard in shards:
            result = dg.materialize(module.assets, selection=["tokenized_shards"], partition_key=shard,
                                    instance=instance, resources=module.defs.resources,
                                    run_config={"ops": {"tokenized_shards": SMALL["ops"]["tokenized_shards"]}})
            assert result.success
            (m,) = [e.materialization for e in result.get_asset_materialization_events()]
            assert not cache_hit(m), "a new code version is a new fingerprint"

        after = staleness(bumped_server, shards)
        for shard in shards:
            assert after[("tokenized_shards", shard)][0] == "FRESH"
            status, causes, _ = after[("hidden_states", shard)]
            assert status == "STALE"
            assert causes == [("tokenized_shards", shard, "DATA", "has a new data version")]
        status, causes, _ = after[("vocab_map", None)]
        assert status == "STALE"
        assert {c[:2] for c in causes} == {("tokenized_shards", s) for s in shards}
        for shard in shards:
            assert after[("source_corpus", shard)][0] == after[("resampled_corpus", shard)][0] == "FRESH"
