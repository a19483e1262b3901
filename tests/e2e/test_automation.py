"""Automation on a persistent instance: what the automation sensor would request, tick by tick.

`dg.evaluate_automation_conditions` runs the same evaluation as `specdraft_automation` (our
AutomationConditionSensorDefinition) against a real, fully materialized instance on a tiny target;
`build_sensor_context` / `build_schedule_context` drive corpus_sensor and nightly_retrain.
"""

from __future__ import annotations

import datetime
import shutil

import dagster as dg
import pytest

from spec_assets.cli import failure_messages, run_pipeline
from spec_assets.corpus import corpus_sensor
from spec_assets.definitions import all_assets, build_defs, defs
from training.demo.corpus import write_demo_corpus

PER_SHARD = ("source_corpus", "resampled_corpus", "tokenized_shards", "hidden_states")
FAN_IN = ("vocab_map", "draft_model", "eval_report", "released_draft")
FIRST, NEW = "demo-00000", "demo-00042"

from tests.spec_assets.conftest import graph_env  # noqa: E402
from tests.spec_assets.small_run import SMALL  # noqa: E402


def requested(result) -> dict[str, set]:
    """asset -> requested partitions (None for an unpartitioned asset), only the requested ones."""
    out = {}
    for assets_def in all_assets:
        for key in assets_def.keys:
            partitions = result.get_requested_partitions(key)
            if partitions:
                out[key.to_user_string()] = set(partitions)
    return out


@pytest.fixture(scope="module")
def env(tmp_path_factory, tiny_target):
    """One shard, every asset materialized (released_draft by hand: the gate is set to fail), and the
    definitions over that environment."""
    root = tmp_path_factory.mktemp("automation")
    with pytest.MonkeyPatch.context() as mp:
        for key, value in graph_env(root, tiny_target, n_shards=1).items():
            mp.setenv(key, value)
        defs = build_defs()  # over the environment just set
        with dg.DagsterInstance.get() as instance:
            results = run_pipeline(run_config=SMALL, instance=instance, log=lambda _: None)
            assert [r.success for r in results] == [True, False]
            assert all("beats_prompt_lookup" in line for line in failure_messages(results[-1]))
            assert dg.materialize(all_assets, selection=["released_draft"], instance=instance,
                                  resources=defs.resources).success
            yield instance, root, defs


def test_nothing_requested_when_everything_is_fresh(env):
    instance, _, defs = env
    for key in (*PER_SHARD, *FAN_IN):
        assert instance.get_latest_materialization_event(dg.AssetKey(key)) is not None, key
    first = dg.evaluate_automation_conditions(defs=defs, instance=instance)
    assert requested(first) == {}
    second = dg.evaluate_automation_conditions(defs=defs, instance=instance, cursor=first.cursor)
    assert requested(second) == {}


def test_new_shard_requests_its_own_partitions_then_the_fan_in(env):
    instance, root, defs = env
    tick = dg.evaluate_automation_conditions(defs=defs, instance=instance)
    assert requested(tick) == {}

    # corpus_sensor finds the new file: a partition and a source_corpus run for it, nothing else.
    write_demo_corpus(root / "extra", n_shards=1, rows_per_shard=16, seed=5)
    shutil.copy(root / "extra" / "demo-00000.jsonl", root / "corpus" / f"{NEW}.jsonl")
    corpus = defs.resources["corpus"].process_config_and_initialize()
    sensed = corpus_sensor(dg.build_sensor_context(instance=instance, resources={"corpus": corpus}))
    (added,) = sensed.dynamic_partitions_requests
    assert list(added.partition_keys) == [NEW]
    assert [r.partition_key for r in sensed.run_requests] == [NEW]
    instance.add_dynamic_partitions("corpus_shards", list(added.partition_keys))

    # A partition without its source_corpus yet: automation waits (eager never runs over a missing input).
    tick = dg.evaluate_automation_conditions(defs=defs, instance=instance, cursor=tick.cursor)
    assert requested(tick) == {}

    assert dg.materialize(all_assets, selection=["source_corpus"], partition_key=NEW, instance=instance,
                          resources=defs.resources, run_config={"ops": {"source_corpus": SMALL["ops"]["source_corpus"]}},
                          tags=sensed.run_requests[0].tags).success
    tick = dg.evaluate_automation_conditions(defs=defs, instance=instance, cursor=tick.cursor)
    asked = requested(tick)
    # The new shard's per-shard chain, in one tick; no other shard, no retraining.
    for key in ("resampled_corpus", "tokenized_shards", "hidden_states"):
        assert asked.pop(key) == {NEW}, key
    assert "source_corpus" not in asked and "draft_model" not in asked
    # vocab_map waits until every shard's tokenized_shards exists.
    assert "vocab_map" not in asked

    # The automation run for the new shard, then the next tick: the vocabulary fan-in, still no training.
    result = dg.materialize(all_assets, selection=["resampled_corpus", "tokenized_shards", "hidden_states"],
                            partition_key=NEW, instance=instance, resources=defs.resources,
                            run_config={"ops": {k: SMALL["ops"][k] for k in ("resampled_corpus", "tokenized_shards")}})
    assert result.success
    tick = dg.evaluate_automation_conditions(defs=defs, instance=instance, cursor=tick.cursor)
    asked = requested(tick)
    assert asked.get("vocab_map") == {None}
    assert not any(key in asked for key in (*PER_SHARD, "draft_model"))
    # Training is left to nightly_retrain: the draft waits while the new shard's data is ready.


def test_code_version_bump_requests_a_rebuild_of_every_partition(env):
    instance, _, defs = env
    shards = instance.get_dynamic_partitions("corpus_shards")
    base = dg.evaluate_automation_conditions(defs=defs, instance=instance)

    def bump(spec):
        if spec.key == dg.AssetKey("tokenized_shards"):
            return spec.replace_attributes(code_version=str(int(spec.code_version) + 1))
        return spec

    bumped = dg.Definitions(assets=[a.map_asset_specs(bump) for a in all_assets], resources=defs.resources)
    tick = dg.evaluate_automation_conditions(defs=bumped, instance=instance, cursor=base.cursor)
    asked = requested(tick)
    assert asked.get("tokenized_shards") == set(shards)
    assert "source_corpus" not in asked and "resampled_corpus" not in asked


def test_nightly_retrain_targets_the_fan_ins():
    schedule = defs.resolve_schedule_def("nightly_retrain")
    assert schedule.cron_schedule == "0 2 * * *"
    assert schedule.default_status == dg.DefaultScheduleStatus.STOPPED
    context = dg.build_schedule_context(
        scheduled_execution_time=datetime.datetime(2026, 1, 2, 2, 0, tzinfo=datetime.timezone.utc),
    )
    (request,) = schedule.evaluate_tick(context).run_requests
    assert request.partition_key is None  # one run over every shard, not a partition
    job = defs.resolve_job_def(schedule.job_name)
    selected = {k.to_user_string() for k in job.asset_layer.selected_asset_keys}
    assert selected == set(FAN_IN)
    assert request.asset_selection is None or {k.to_user_string() for k in request.asset_selection} == selected

    automation = defs.resolve_sensor_def("specdraft_automation")
    assert isinstance(automation, dg.AutomationConditionSensorDefinition)
    assert automation.default_status == dg.DefaultSensorStatus.STOPPED
    graph = defs.resolve_asset_graph()
    assert automation.asset_selection.resolve(graph) == set(graph.materializable_asset_keys)
