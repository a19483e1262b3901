"""The instance configuration `specdraft` writes (no server needed): PostgreSQL by env reference,
never the URL or its password; a hand-written dagster.yaml left alone; pools in the config; bad
settings refused before anything runs. The server itself: tests/e2e/test_postgres.py."""

from __future__ import annotations

import pytest
import yaml

from spec_assets.instance import (
    RUNNER_TAG,
    InstanceConfigError,
    ensure_instance,
    instance_yaml,
    preflight,
    redact_url,
    release_dead_runs,
    runner_tags,
    target_pool,
)
from tests.spec_assets.conftest import pool_occupancy

URL = "postgresql://alice:s3cret-Pw@db.internal:5433/dagster?sslmode=require"


def test_redact_url_keeps_user_host_port_db_only():
    assert redact_url(URL) == "postgresql://alice@db.internal:5433/dagster"
    assert "s3cret" not in redact_url(URL)


def test_yaml_references_the_env_var_and_sets_the_pool_limit(monkeypatch):
    monkeypatch.setenv("SPECDRAFT_TARGET_SLOTS", "8")
    config = yaml.safe_load(instance_yaml(pg=True))
    assert config["storage"] == {"postgres": {"postgres_url": {"env": "SPECDRAFT_PG_URL"}}}
    assert config["concurrency"]["pools"] == {"granularity": "op", "default_limit": 8}
    assert "storage" not in yaml.safe_load(instance_yaml(pg=False))  # SQLite: Dagster's default


def test_pool_per_device_kind(monkeypatch):
    assert target_pool() == "target-cpu"
    monkeypatch.setenv("SPECDRAFT_DEVICE_KIND", "h100")
    assert target_pool() == "target-h100"


def test_switching_storage_rewrites_our_file_but_never_a_hand_written_one(tmp_path, monkeypatch):
    monkeypatch.setenv("SPECDRAFT_PG_URL", URL)
    monkeypatch.setattr("spec_assets.instance.check_postgres", lambda url: None)  # no server here
    monkeypatch.setattr("spec_assets.instance.set_pool_limit", lambda home: None)
    config = ensure_instance(tmp_path)
    assert "postgres_url" in config.read_text() and "s3cret" not in config.read_text()
    monkeypatch.delenv("SPECDRAFT_PG_URL")
    assert "postgres" not in ensure_instance(tmp_path).read_text()  # back to SQLite

    config.write_text("telemetry:\n  enabled: true\nrun_monitoring:\n  enabled: true\n")  # the user's own
    ensure_instance(tmp_path)
    assert "run_monitoring" in config.read_text()
    monkeypatch.setenv("SPECDRAFT_PG_URL", URL)
    with pytest.raises(InstanceConfigError, match="written by hand and has no postgres storage"):
        ensure_instance(tmp_path)


def test_bad_settings_are_refused_before_anything_runs(tmp_path, monkeypatch):
    monkeypatch.setenv("SPECDRAFT_PARALLEL", "2")
    with pytest.raises(InstanceConfigError, match="SPECDRAFT_PARALLEL=2 needs .* SPECDRAFT_PG_URL"):
        preflight(tmp_path)
    monkeypatch.setenv("SPECDRAFT_PARALLEL", "1")
    monkeypatch.setenv("SPECDRAFT_TARGET_SLOTS", "0")
    with pytest.raises(InstanceConfigError, match="SPECDRAFT_TARGET_SLOTS must be a positive integer"):
        preflight(tmp_path)
    monkeypatch.setenv("SPECDRAFT_TARGET_SLOTS", "1")
    with pytest.raises(InstanceConfigError, match="needs host:port"):
        preflight(tmp_path, ray_address="not-an-address")


# A run whose one step takes a target-pool slot, says so with a marker file, then holds it.
HOLDER = """
import sys, time
import dagster as dg
from spec_assets.instance import runner_tags

@dg.op(pool=sys.argv[3])
def hold():
    open(sys.argv[1], "w").close()
    time.sleep(float(sys.argv[2]))

@dg.job
def holder():
    hold()

with dg.DagsterInstance.get() as instance:
    holder.execute_in_process(instance=instance, tags=runner_tags())
"""


def _wait_for(path, proc, seconds: float = 120) -> None:
    import time

    deadline = time.monotonic() + seconds
    while not path.exists():
        assert proc.poll() is None, f"the holder run exited with {proc.returncode} before taking its slot"
        assert time.monotonic() < deadline, f"no {path.name} within {seconds}s"
        time.sleep(0.2)


@pytest.mark.slow  # two real runs in their own processes (about a minute on 2 busy cores)
def test_a_killed_runs_pool_slot_is_freed_and_the_run_failed(tmp_path, monkeypatch):
    """A run whose process was SIGKILLed stays STARTED holding its target-pool slot; the next
    `specdraft` marks it failed and frees the slot (a step waiting for it then runs), and leaves live
    and foreign runs alone. Real runs claim the slots; the pool is read with `dagster instance
    concurrency get` (no storage internals)."""
    import socket
    import subprocess
    import sys
    from pathlib import Path

    import dagster as dg

    root = Path(__file__).resolve().parents[2]
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    monkeypatch.setenv("PYTHONPATH", str(root))
    ensure_instance(home)  # the pool at its limit of 1 (SPECDRAFT_TARGET_SLOTS unset)
    pool = target_pool()

    def holder(name: str, seconds: float) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path / name), str(seconds), pool], cwd=root,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    dead = holder("dead", 600)
    _wait_for(tmp_path / "dead", dead)
    dead.kill()
    dead.wait()
    waiting = holder("waiting", 0)  # its step waits for the slot the dead run holds
    try:
        with dg.DagsterInstance.get() as instance:
            host = socket.gethostname()
            runs = {}
            for name, runner in [("alive", runner_tags()[RUNNER_TAG]), ("elsewhere", f"other-host:{dead.pid}")]:
                run = instance.create_run_for_job(dg.GraphDefinition(name=f"g_{name}").to_job(),
                                                  tags={RUNNER_TAG: runner})
                instance.handle_run_event(run.run_id, dg.DagsterEvent(
                    event_type_value="PIPELINE_START", job_name=run.job_name))
                runs[name] = run.run_id
            (record,) = instance.get_run_records(filters=dg.RunsFilter(tags={RUNNER_TAG: f"{host}:{dead.pid}"}))
            runs["dead"] = record.dagster_run.run_id
            assert pool_occupancy(home, pool) == (1, 1)
            assert not (tmp_path / "waiting").exists()

            assert release_dead_runs(instance, log=lambda m: None) == [runs["dead"]]
            status = {n: instance.get_run_by_id(r).status for n, r in runs.items()}
            assert status == {"dead": dg.DagsterRunStatus.FAILURE, "alive": dg.DagsterRunStatus.STARTED,
                              "elsewhere": dg.DagsterRunStatus.STARTED}
            # The step that was waiting gets the freed slot, runs and hands it back.
            assert waiting.wait(120) == 0 and (tmp_path / "waiting").exists()
            assert pool_occupancy(home, pool) == (0, 1)
            assert release_dead_runs(instance, log=lambda m: None) == []
    finally:
        if waiting.poll() is None:
            waiting.kill()
            waiting.wait()
