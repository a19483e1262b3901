"""The instance configuration `specdraft` writes (no server needed): PostgreSQL by env reference,
never the URL or its password; a hand-written dagster.yaml left alone; pools in the config; bad
settings refused before anything runs. The server itself: tests/e2e/test_postgres.py."""

from __future__ import annotations

import pytest
import yaml

from spec_assets.instance import (
    InstanceConfigError,
    ensure_instance,
    instance_yaml,
    preflight,
    redact_url,
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
    monkeypatch.setenv("SPECDRAFT_RAY_ADDRESS", "not-an-address")
    with pytest.raises(InstanceConfigError, match="needs host:port"):
        preflight(tmp_path)
