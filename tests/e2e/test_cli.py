"""The command line: `dagster asset materialize` and `specdraft` as real subprocesses on a persistent
instance, then `specdraft run --only-stale-or-missing` and `--resume` on their own instances.

One object store is shared by the whole module, so a step that another test already computed is a
cache hit; each test that counts runs has its own DAGSTER_HOME, so the counts are its own.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import dagster as dg
import pytest

from spec_assets.cli import INVOCATION_TAG, TARGET_TAG, load_last_invocation, main, run_pipeline
from training.demo.corpus import write_demo_corpus

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
SHARDS = ["demo-00000", "demo-00001"]

from tests.conftest import parse_module  # noqa: E402
from tests.spec_assets.conftest import new_dagster_home  # noqa: E402
from tests.spec_assets.small_run import SMALL  # noqa: E402


@pytest.fixture(scope="module")
def shared(tmp_path_factory, tiny_target):
    """Target, corpus and object store for the module; DAGSTER_HOME is set per test."""
    root = tmp_path_factory.mktemp("cli")
    write_demo_corpus(root / "corpus", n_shards=2, rows_per_shard=16, seed=1)
    return {"root": root, "target": tiny_target, "corpus": root / "corpus", "store": (root / "store").as_uri()}


@pytest.fixture
def env(shared, tmp_path, monkeypatch):
    """The variables a shell would export, set here (for in-process calls) and returned (for subprocesses)."""
    values = {
        "DAGSTER_HOME": str(new_dagster_home(tmp_path / "dagster_home")),
        "SPECDRAFT_ROOT": shared["store"],
        "SPECDRAFT_TARGET": str(shared["target"]),
        "SPECDRAFT_CORPUS": str(shared["corpus"]),
    }
    for key, value in values.items():
        monkeypatch.setenv(key, value)
    return values


def cli(args: list[str], env: dict, timeout: int = 300) -> subprocess.CompletedProcess:
    out = subprocess.run([str(BIN / args[0]), *args[1:]], cwd=ROOT, env={**os.environ, **env},
                         capture_output=True, text=True, timeout=timeout)
    return out


def materialized(instance, asset: str) -> dict:
    """partition -> number of materializations of `asset`."""
    records = instance.fetch_materializations(dg.AssetKey(asset), limit=1000).records
    out: dict = {}
    for r in records:
        out[r.partition_key] = out.get(r.partition_key, 0) + 1
    return out


def runs_of(instance, invocation: str) -> list[tuple[str | None, frozenset]]:
    """(partition, assets it planned to materialize) of every run of one `specdraft run` invocation."""
    out = []
    for run in instance.get_runs(filters=dg.RunsFilter(tags={INVOCATION_TAG: invocation})):
        planned = instance.get_records_for_run(
            run.run_id, of_type=dg.DagsterEventType.ASSET_MATERIALIZATION_PLANNED, limit=100).records
        assets = frozenset(r.event_log_entry.dagster_event.asset_key.to_user_string() for r in planned)
        out.append((run.tags.get("dagster/partition"), assets))
    return sorted(out, key=lambda x: (x[0] is None, x[0] or "", sorted(x[1])))


def test_dagster_asset_materialize_one_shard_and_a_fan_in(env):
    # Partitions come from the corpus listing: `specdraft shards` registers them (as corpus_sensor would).
    out = cli(["specdraft", "shards"], env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [SHARDS[0], "(new)", SHARDS[1], "(new)"]

    out = cli(["dagster", "asset", "materialize", "-m", "spec_assets.definitions",
               "--select", "source_corpus", "--partition", SHARDS[1]], env)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    with dg.DagsterInstance.get() as instance:
        assert materialized(instance, "source_corpus") == {SHARDS[1]: 1}  # that shard only

    # The per-shard stages for every shard through `specdraft run`, then the fan-in on its own.
    out = cli(["specdraft", "run", "--select", "*tokenized_shards", "--config-json", json.dumps(SMALL)], env)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "2 runs" in out.stdout
    out = cli(["dagster", "asset", "materialize", "-m", "spec_assets.definitions", "--select", "vocab_map"], env)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    with dg.DagsterInstance.get() as instance:
        assert materialized(instance, "tokenized_shards") == {s: 1 for s in SHARDS}
        assert materialized(instance, "vocab_map") == {None: 1}
        (record,) = instance.fetch_materializations(dg.AssetKey("vocab_map"), limit=1).records
        assert record.asset_materialization.metadata["shards"].value == 2

    # A partition that does not exist is refused before anything runs.
    out = cli(["dagster", "asset", "materialize", "-m", "spec_assets.definitions",
               "--select", "source_corpus", "--partition", "no-such-shard"], env)
    assert out.returncode != 0


def _plan(select: str, config: dict) -> list[str]:
    """The runs `specdraft run --only-stale-or-missing --dry-run` would launch, as 'partition: assets'."""
    lines: list[str] = []
    with dg.DagsterInstance.get() as instance:
        assert run_pipeline(select=select, run_config=config, instance=instance, log=lines.append,
                            only_stale_or_missing=True, dry_run=True) == []
    return sorted(line.removeprefix("would run ") for line in lines if line.startswith("would run "))


def _last_runs() -> list:
    with dg.DagsterInstance.get() as instance:
        return runs_of(instance, load_last_invocation(instance)["id"])


def test_only_stale_or_missing_skips_current_partitions_without_launching_runs(env, shared, tmp_path, capsys,
                                                                             monkeypatch):
    corpus = tmp_path / "corpus"
    shutil.copytree(shared["corpus"], corpus)
    monkeypatch.setenv("SPECDRAFT_CORPUS", str(corpus))
    select, config = "*vocab_map", json.dumps(SMALL)
    assert main(["run", "--select", select, "--config-json", config]) == 0
    with dg.DagsterInstance.get() as instance:
        n_runs = len(instance.get_runs())
        assert all(r.tags.get(TARGET_TAG) for r in instance.get_runs())

    # Every step of that invocation succeeded: nothing to resume, no run launched.
    capsys.readouterr()
    assert main(["run", "--resume"]) == 0
    assert "nothing to resume" in capsys.readouterr().out

    # Everything current: no run at all.
    capsys.readouterr()
    assert main(["run", "--select", select, "--config-json", config, "--only-stale-or-missing"]) == 0
    assert "0 runs" in capsys.readouterr().out
    with dg.DagsterInstance.get() as instance:
        assert len(instance.get_runs()) == n_runs

    # A new source file: its shard and the fan-in, nothing for the other shards.
    write_demo_corpus(tmp_path / "extra", n_shards=1, rows_per_shard=16, seed=3)
    shutil.copy(tmp_path / "extra" / "demo-00000.jsonl", corpus / "demo-00077.jsonl")
    assert main(["run", "--select", select, "--config-json", config, "--only-stale-or-missing"]) == 0
    assert _last_runs() == [
        ("demo-00077", frozenset({"source_corpus", "resampled_corpus", "tokenized_shards"})),
        (None, frozenset({"vocab_map"})),
    ]

    # A tokenization change: tokenized_shards for every shard and the fan-in; the corpus stages stay.
    changed = {"ops": {**SMALL["ops"], "tokenized_shards": {"config": {"max_length": 96}}}}
    assert main(["run", "--select", select, "--config-json", json.dumps(changed), "--only-stale-or-missing"]) == 0
    assert _last_runs() == [
        *[(s, frozenset({"tokenized_shards"})) for s in (*SHARDS, "demo-00077")],
        (None, frozenset({"vocab_map"})),
    ]
    assert _plan(select, changed) == []
    # Spelling out a default is the same effective config (Dagster fills the defaults): nothing to run.
    explicit = {"ops": {**changed["ops"], "source_corpus": {"config": {"heldout_fraction": 0.2, "heldout_seed": 0}}}}
    assert _plan(select, explicit) == []

    # Back to the first config: Dagster's staleness cannot tell, the recorded run config can.
    assert _plan(select, SMALL) == [*[f"{s}: tokenized_shards" for s in (*SHARDS, "demo-00077")], "fan-in: vocab_map"]

    # A rewritten source file (new mtime) re-runs its shard's chain; nothing else.
    path = corpus / "demo-00001.jsonl"
    before = path.stat()
    os.utime(path, (time.time() + 5, time.time() + 5))
    assert _plan(select, changed) == ["demo-00001: source_corpus, resampled_corpus, tokenized_shards",
                                      "fan-in: vocab_map"]

    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert _plan(select, changed) == []

    # The same files in another folder: the recorded source URL no longer matches, every shard re-runs.
    monkeypatch.setenv("SPECDRAFT_CORPUS", str(shutil.copytree(corpus, tmp_path / "moved")))
    assert _plan(select, changed) == [
        *[f"{s}: source_corpus, resampled_corpus, tokenized_shards" for s in (*SHARDS, "demo-00077")],
        "fan-in: vocab_map"]
    monkeypatch.setenv("SPECDRAFT_CORPUS", str(corpus))

    # Another target model: every stage that uses it, not the corpus.
    from training.targets.tiny import build_tiny_target

    other = build_tiny_target(tmp_path / "other", hidden_size=64, num_layers=8, seed=1)
    monkeypatch.setenv("SPECDRAFT_TARGET", str(other))
    assert _plan(select, changed) == [
        *[f"{s}: resampled_corpus, tokenized_shards" for s in (*SHARDS, "demo-00077")], "fan-in: vocab_map"]


def _write_parquet(rows_from: Path, dest: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [json.loads(line) for line in rows_from.read_text().splitlines()]
    pq.write_table(pa.Table.from_pylist(rows), dest)


def test_resume_reruns_only_what_failed_and_never_bypasses_the_gate(env, shared, tmp_path, capsys, monkeypatch):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    shutil.copy(shared["corpus"] / "demo-00000.jsonl", corpus)
    (corpus / "broken-00001.parquet").write_bytes(b"not parquet")
    monkeypatch.setenv("SPECDRAFT_CORPUS", str(corpus))

    assert main(["run", "--config-json", json.dumps(SMALL)]) == 1
    err = capsys.readouterr().err
    assert "broken-00001" in err and "specdraft run --resume" in err
    first = _last_runs()
    per_shard = frozenset({"source_corpus", "resampled_corpus", "tokenized_shards", "hidden_states"})
    assert first == [("broken-00001", per_shard), ("demo-00000", per_shard)]  # no fan-in run: a shard failed
    with dg.DagsterInstance.get() as instance:
        invocation = load_last_invocation(instance)["id"]
        n_good = len(instance.get_runs(filters=dg.RunsFilter(tags={"dagster/partition": "demo-00000"})))

    # Fixed file, then resume: the broken shard's run and the fan-in run, under the same invocation.
    _write_parquet(shared["corpus"] / "demo-00001.jsonl", corpus / "broken-00001.parquet")
    assert main(["run", "--resume"]) == 1  # the random draft fails eval_report's gate
    with dg.DagsterInstance.get() as instance:
        assert load_last_invocation(instance)["id"] == invocation
        assert len(instance.get_runs(filters=dg.RunsFilter(tags={"dagster/partition": "demo-00000"}))) == n_good
        runs = runs_of(instance, invocation)
        assert runs == [first[0], first[0], first[1],
                        (None, frozenset({"vocab_map", "draft_model", "eval_report", "released_draft"}))]
        assert materialized(instance, "draft_model") == {None: 1}
        assert materialized(instance, "released_draft") == {}

    # Resuming again retries the gate with its asset (a cache hit), never released_draft alone.
    capsys.readouterr()
    assert main(["run", "--resume"]) == 1
    err = capsys.readouterr().err
    assert "beats_prompt_lookup" in err
    # It ends by saying what the draft is: tau against prompt lookup at the gate's k, the gate's
    # verdict, where the export is and the commands that serve it, and where to look closer.
    assert "draft vs prompt lookup at k=2" in err and "T=0: EAGLE-3 tau " in err and ", prompt lookup " in err
    assert "quality gate beats_prompt_lookup: FAILED" in err
    export = err.split("not released; the evaluated draft's export: ", 1)[1].split()[0]
    assert Path(export, "config.json").is_file() and Path(export, "model.safetensors").is_file()
    assert f"vllm serve {shared['target']} --speculative-config" in err and f'"model": "{export}"' in err
    assert f"--speculative-draft-model-path {export} --speculative-num-steps 2" in err
    assert "make ui" in err
    with dg.DagsterInstance.get() as instance:
        last = runs_of(instance, invocation)
        assert len(last) == len(runs) + 1
        assert (None, frozenset({"eval_report", "released_draft"})) in last
        assert materialized(instance, "released_draft") == {}
        (record,) = instance.fetch_materializations(dg.AssetKey("eval_report"), limit=1).records
        assert record.asset_materialization.metadata["cache_hit"].value


def test_shards_follow_the_source_files(tmp_path, monkeypatch):
    """`specdraft shards` (sync_shards) adds a partition per new file and drops one whose file is gone."""
    from spec_assets.cli import sync_shards
    from spec_assets.definitions import build_defs
    from spec_assets.partitions import corpus_shards

    folder = tmp_path / "corpus"
    write_demo_corpus(folder, n_shards=2, rows_per_shard=4, seed=0)
    monkeypatch.setenv("SPECDRAFT_CORPUS", str(folder))
    with dg.DagsterInstance.ephemeral() as instance:
        assert sync_shards(build_defs(), instance).shards == ["demo-00000", "demo-00001"]
        (folder / "demo-00000.jsonl").unlink()
        assert sync_shards(build_defs(), instance).shards == ["demo-00001"]
        assert instance.get_dynamic_partitions(corpus_shards.name) == ["demo-00001"]
