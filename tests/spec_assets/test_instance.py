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


def test_a_killed_runs_pool_slot_is_freed_and_the_run_failed(tmp_path):
    """A run whose process was SIGKILLed stays STARTED holding its target-pool slot; the next
    `specdraft` marks it failed and frees the slot, and leaves live and foreign runs alone."""
    import socket
    import subprocess
    import sys

    import dagster as dg

    dead = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    dead.kill()
    dead.wait()
    host = socket.gethostname()
    pool = "target-cpu"
    with dg.instance_for_test(temp_dir=str(tmp_path)) as instance:
        storage = instance.event_log_storage
        storage.set_concurrency_slots(pool, 1)
        runs = {}
        for name, runner in [("dead", f"{host}:{dead.pid}"), ("alive", runner_tags()[RUNNER_TAG]),
                             ("elsewhere", f"other-host:{dead.pid}")]:
            run = instance.create_run_for_job(dg.GraphDefinition(name=f"g_{name}").to_job(), tags={RUNNER_TAG: runner})
            instance.handle_run_event(run.run_id, dg.DagsterEvent(
                event_type_value="PIPELINE_START", job_name=run.job_name))
            runs[name] = run.run_id
        assert storage.claim_concurrency_slot(pool, runs["dead"], "draft_model").is_claimed
        assert not storage.claim_concurrency_slot(pool, runs["alive"], "hidden_states").is_claimed  # waits

        assert release_dead_runs(instance, log=lambda m: None) == [runs["dead"]]
        status = {n: instance.get_run_by_id(r).status for n, r in runs.items()}
        assert status == {"dead": dg.DagsterRunStatus.FAILURE, "alive": dg.DagsterRunStatus.STARTED,
                          "elsewhere": dg.DagsterRunStatus.STARTED}
        # The step that was waiting gets the freed slot on its next claim.
        assert storage.claim_concurrency_slot(pool, runs["alive"], "hidden_states").is_claimed
        assert release_dead_runs(instance, log=lambda m: None) == []
