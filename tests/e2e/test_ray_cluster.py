"""Resampling and hidden-state extraction on a real two-node Ray cluster (loopback, one CPU per
node, started and stopped here by PID): the output equals the local path's bitwise, the step's
log streams the actors' progress, a worker node killed mid-shard is survived (its batches go to
the other node's actor) and reported with its node, nothing partial is left, and a rerun
completes; an unreachable address fails `specdraft run` at once, naming it and the cause."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import dagster as dg
import pytest

from resources.generation_backend import GenerationBackendResource
from resources.ray_cluster import RayClusterResource
from resources.target_model import TargetModelResource
from tests.conftest import free_port, run_events
from tests.ray_cluster import RayCluster, why_unavailable
from tests.spec_assets.conftest import graph_env, make_resources
from training.storage import ObjectStore

ROOT = Path(__file__).resolve().parents[2]
SHARD = "demo-00000"
PER_SHARD = ["source_corpus", "resampled_corpus", "tokenized_shards", "hidden_states"]

pytestmark = pytest.mark.timeout(150, method="thread")  # ray.get blocks in C: no SIGALRM
_why = why_unavailable()
if _why:
    print(f"SKIP tests/e2e/test_ray_cluster.py: {_why}", file=sys.stderr)
needs_ray = pytest.mark.skipif(_why is not None, reason=_why or "")


@pytest.fixture(scope="module")
def cluster():
    c = RayCluster(num_cpus=1).start()
    try:
        yield c
    finally:
        import ray

        ray.shutdown()  # this process joined as a driver; leave before the nodes go
        c.stop()


def config(batch_size: int, new_tokens: int) -> dict:
    return {"ops": {
        "source_corpus": {"config": {"heldout_fraction": 0.2}},
        "resampled_corpus": {"config": {"max_new_tokens": new_tokens, "batch_size": batch_size}},
        "tokenized_shards": {"config": {"max_length": 128}},
        # Small batches: several feature batches, so both actors get some.
        "hidden_states": {"config": {"max_tokens_per_batch": 256}},
    }}


def materialize(env: dict, store: Path, ray_address: str, run_config: dict, selection=PER_SHARD, instance=None,
                chat_template_kwargs: str = ""):
    from spec_assets.definitions import all_assets
    from spec_assets.partitions import corpus_shards

    target = TargetModelResource(target=env["SPECDRAFT_TARGET"], device="cpu", chat_template_kwargs=chat_template_kwargs)
    resources = make_resources(store.as_uri(), env["SPECDRAFT_CORPUS"], target=target,
                               generator=GenerationBackendResource(target=target),
                               ray_cluster=RayClusterResource(address=ray_address))
    own = instance is None
    instance = instance or dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions(corpus_shards.name, [SHARD])
    t0 = time.perf_counter()
    run_config = {"ops": {k: v for k, v in run_config["ops"].items() if k in selection}}
    result = dg.materialize(all_assets, selection=selection, partition_key=SHARD, instance=instance,
                            resources=resources, run_config=run_config, raise_on_error=False)
    wall = time.perf_counter() - t0
    logs = [e.user_message for e in run_events(instance, result.run_id)]
    if own:
        instance.dispose()
    return result, logs, wall


def files(store: Path, asset: str) -> dict[str, str]:
    """name -> sha256 of the shard's complete artifact of `asset` (from its manifest)."""
    s = ObjectStore(store.as_uri())
    prefixes = [p for p in s.list(f"{asset}/{SHARD}", recursive=True) if p.endswith("/manifest.json")]
    assert len(prefixes) == 1, prefixes
    manifest = s.manifest(prefixes[0].rsplit("/", 1)[0])
    return {name: f["sha256"] for name, f in manifest.files.items()}


def preamble_target(tiny_target, folder: Path) -> Path:
    """The tiny target with a template that reads a chat setting (`preamble`, written before every conversation)."""
    import shutil

    from transformers import AutoTokenizer

    shutil.copytree(tiny_target, folder)
    tok = AutoTokenizer.from_pretrained(folder)
    tok.chat_template = tok.chat_template.replace("{{ bos_token }}", "{{ bos_token }}{{ preamble | default('') }}", 1)
    assert "preamble" in tok.chat_template
    tok.save_pretrained(folder)
    return folder


@needs_ray
def test_ray_path_equals_local_path_bitwise(cluster, tiny_target, tmp_path):
    # Chat settings the template reads: the actors must render with them as the local path does.
    env = graph_env(tmp_path, preamble_target(tiny_target, tmp_path / "preamble"), n_shards=1)
    cfg = config(batch_size=4, new_tokens=12)
    # Several target replies per conversation and prompts the target writes: the copies are made, and
    # the prompts written (resample_batch), by the one driver both paths run.
    cfg["ops"]["resampled_corpus"]["config"]["replies_per_prompt"] = 2
    cfg["ops"]["resampled_corpus"]["config"]["written_prompts"] = 1
    kwargs = '{"preamble": "Answer briefly."}'
    local, _, local_wall = materialize(env, tmp_path / "local", "", cfg, chat_template_kwargs=kwargs)
    assert local.success
    remote, logs, ray_wall = materialize(env, tmp_path / "ray", cluster.address, cfg, chat_template_kwargs=kwargs)
    assert remote.success, logs[-20:]
    for asset in ("resampled_corpus", "hidden_states"):
        assert files(tmp_path / "ray", asset) == files(tmp_path / "local", asset), asset
    from transformers import AutoTokenizer

    s = ObjectStore((tmp_path / "ray").as_uri())
    (data,) = [p for p in s.list(f"tokenized_shards/{SHARD}", recursive=True) if p.endswith("/data.parquet")]
    first = s.read_parquet(data).column("input_ids").to_pylist()[0]
    assert "Answer briefly." in AutoTokenizer.from_pretrained(env["SPECDRAFT_TARGET"]).decode(first)  # it took effect
    ids = s.read_parquet(data).column("id").to_pylist()
    replies, written = sum("~reply1" in i for i in ids), sum("~prompt1" in i for i in ids)
    assert len(ids) > 2 and replies >= len(ids) - replies - written - 2  # the copies reached tokenization
    # every conversation's written prompt came out of resampling, kept or a reject with its reason
    out = [p for p in s.list(f"resampled_corpus/{SHARD}", recursive=True) if p.endswith(".parquet")]
    prompted = {i.split("~prompt1")[0] for p in out for i in s.read_parquet(p).column("id").to_pylist() if "~prompt1" in i}
    conversations = {i.split("#")[0] for i in ids if "~" not in i}
    assert conversations and conversations <= prompted
    # Progress streamed into the step's log, from actors on both nodes.
    text = "\n".join(logs)
    assert "ray: 2 target actors on" in text
    batch_lines = [line for line in logs if line.startswith("resample: batch") and "from actor" in line]
    assert len(batch_lines) >= 3
    assert any("from actor 0 on node" in line for line in batch_lines) and any("from actor 1 on node" in line for line in batch_lines)
    print(f"\nray overhead per shard (4 per-shard steps, 2 one-CPU actors): ray {ray_wall:.1f}s / local {local_wall:.1f}s "
          f"= {ray_wall / local_wall:.2f}")


@needs_ray
def test_worker_node_killed_mid_shard_is_survived_and_a_rerun_completes(cluster, tiny_target, tmp_path):
    env = graph_env(tmp_path, tiny_target, n_shards=1)
    cfg = config(batch_size=1, new_tokens=48)  # a batch per row: time to kill a node in between
    store = tmp_path / "ray"
    progress = store / "resampled_corpus" / SHARD
    killed = threading.Event()

    def kill_when_a_batch_is_saved():
        deadline = time.time() + 90
        while time.time() < deadline and not killed.is_set():
            if any(progress.glob("*/_progress/chunk-*.parquet")):
                cluster.worker.kill()
                killed.set()
                return
            time.sleep(0.05)

    watcher = threading.Thread(target=kill_when_a_batch_is_saved, daemon=True)
    watcher.start()
    with dg.DagsterInstance.ephemeral() as instance:
        result, logs, _ = materialize(env, store, cluster.address, cfg, selection=PER_SHARD[:2], instance=instance)
        watcher.join(5)
        assert killed.is_set(), "the shard finished before a batch was saved"
        text = "\n".join(logs)
        if result.success:
            # Retried on the surviving node; the death was reported with its node.
            assert re.search(r"ray: actor \d on node \S+ \(node id [0-9a-f]{12}, pid \d+\) died: ", text), text[-3000:]
            local, _, _ = materialize(env, tmp_path / "local", "", cfg, selection=PER_SHARD[:2])
            assert files(store, "resampled_corpus") == files(tmp_path / "local", "resampled_corpus")
        else:
            # Failed clearly, naming the node, with no manifest anywhere for the shard.
            message = " ".join(str(e.step_failure_data.error.message) for e in result.all_events if e.is_step_failure)
            assert re.search(r"actor \d on node \S+ \(node id [0-9a-f]{12}", message), message
            assert not list((store / "resampled_corpus").glob(f"{SHARD}/*/manifest.json"))
        rerun, rerun_logs, _ = materialize(env, store, cluster.address, cfg, selection=PER_SHARD[:2], instance=instance)
        assert rerun.success, rerun_logs[-20:]
        assert len(list((store / "resampled_corpus").glob(f"{SHARD}/*/manifest.json"))) == 1


@needs_ray
def test_every_actor_dying_fails_clearly_with_no_artifact_and_a_rerun_resumes(cluster, tiny_target, tmp_path):
    env = graph_env(tmp_path, tiny_target, n_shards=1)
    cfg = config(batch_size=1, new_tokens=48)
    store = tmp_path / "ray"
    progress = store / "resampled_corpus" / SHARD
    killed: list[int] = []

    def kill_actors_when_a_batch_is_saved():
        deadline = time.time() + 90
        while time.time() < deadline:
            if any(progress.glob("*/_progress/chunk-*.parquet")):
                for pid in cluster.actor_pids("TargetActor"):
                    os.kill(pid, signal.SIGKILL)
                    killed.append(pid)
                return
            time.sleep(0.05)

    watcher = threading.Thread(target=kill_actors_when_a_batch_is_saved, daemon=True)
    watcher.start()
    with dg.DagsterInstance.ephemeral() as instance:
        result, logs, _ = materialize(env, store, cluster.address, cfg, selection=PER_SHARD[:2], instance=instance)
        watcher.join(5)
        assert killed, "no actor process found to kill"
        assert not result.success
        (failure,) = [e for e in result.all_events if e.is_step_failure]
        message = failure.step_failure_data.error.message
        assert failure.step_key == "resampled_corpus" and "every" in message and "died" in message, message
        assert re.search(r"actor \d on node \S+ \(node id [0-9a-f]{12}, pid \d+\) died", message), message
        assert not list((store / "resampled_corpus").glob(f"{SHARD}/*/manifest.json"))  # nothing readers trust
        saved = len(list(progress.glob("*/_progress/chunk-*.parquet")))
        assert saved >= 1
        # The rerun starts new actors and resumes from the batches the dead ones finished.
        rerun, rerun_logs, _ = materialize(env, store, cluster.address, cfg, selection=PER_SHARD[:2], instance=instance)
        assert rerun.success, rerun_logs[-20:]
        assert any(re.match(r"resample: [1-9]\d* rows resumed", line) for line in rerun_logs), rerun_logs
        local, _, _ = materialize(env, tmp_path / "local", "", cfg, selection=PER_SHARD[:2])
        assert files(store, "resampled_corpus") == files(tmp_path / "local", "resampled_corpus")


@needs_ray
def test_unreachable_ray_address_fails_specdraft_run_at_once(tiny_target, tmp_path):
    port = free_port()  # nothing listens there
    env = {**graph_env(tmp_path, tiny_target, n_shards=1), "SPECDRAFT_RAY_ADDRESS": f"127.0.0.1:{port}"}
    t0 = time.time()
    out = subprocess.run([sys.executable, "-m", "spec_assets.cli", "run", "--select", "source_corpus"], cwd=ROOT,
                         env={**os.environ, **env}, capture_output=True, text=True, timeout=60)
    assert out.returncode != 0 and time.time() - t0 < 30
    assert f"Ray cluster at 127.0.0.1:{port} (SPECDRAFT_RAY_ADDRESS) is unreachable" in out.stderr, out.stderr[-2000:]
    assert "refused" in out.stderr.lower(), out.stderr[-2000:]
