"""The Dagster instance on a real PostgreSQL server (started here on loopback, stopped by PID):
`specdraft run` on 4 shards, 2 shard runs at a time with the multiprocess executor, the target
pool keeping target-loading steps one at a time; runs, materializations and lineage read back
through the instance; an unreachable server fails the run at once without its password."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import dagster as dg
import pytest

from tests.conftest import free_port, run_events
from tests.pg_server import PASSWORD, PostgresServer, why_unavailable
from tests.spec_assets.conftest import graph_env, pool_occupancy
from tests.spec_assets.small_run import SMALL

ROOT = Path(__file__).resolve().parents[2]
SHARDS = [f"demo-0000{i}" for i in range(4)]
TARGET_STEPS = {"resampled_corpus"}

# Several `specdraft` and `dagster` commands, each a fresh process (minutes on 2 busy cores).
pytestmark = pytest.mark.timeout(480)
_why = why_unavailable()
if _why:
    print(f"SKIP tests/e2e/test_postgres.py: {_why}", file=sys.stderr)
needs_pg = pytest.mark.skipif(_why is not None, reason=_why or "")


@pytest.fixture(scope="module")
def pg():
    server = PostgresServer().start()
    try:
        yield server
    finally:
        server.stop()


def specdraft(args: list[str], env: dict, timeout: int = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "spec_assets.cli", *args], cwd=ROOT, env={**os.environ, **env},
                          capture_output=True, text=True, timeout=timeout)


def step_windows(instance, run_id: str) -> dict[str, tuple[float, float]]:
    """step key -> (start, end) timestamps from the run's event log."""
    out: dict[str, list[float]] = {}
    for e in run_events(instance, run_id):
        ev = e.dagster_event
        if ev is None or ev.step_key is None:
            continue
        if ev.event_type == dg.DagsterEventType.STEP_START:
            out.setdefault(ev.step_key, [e.timestamp, e.timestamp])[0] = e.timestamp
        elif ev.event_type in (dg.DagsterEventType.STEP_SUCCESS, dg.DagsterEventType.STEP_FAILURE):
            out.setdefault(ev.step_key, [e.timestamp, e.timestamp])[1] = e.timestamp
    return {k: (v[0], v[1]) for k, v in out.items()}


@needs_pg
def test_specdraft_run_on_postgres_four_shards_in_parallel_with_pools(pg, tiny_target, tmp_path):
    env = {**graph_env(tmp_path, tiny_target, n_shards=4), "SPECDRAFT_PG_URL": pg.url,
           "SPECDRAFT_PARALLEL": "2", "SPECDRAFT_TARGET_SLOTS": "1"}
    out = specdraft(["run", "--select", "*resampled_corpus", "--config-json", json.dumps(SMALL)], env)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    assert "4 shard runs, 2 at a time" in out.stdout, out.stdout[-4000:] + out.stderr[-4000:]
    home = Path(env["DAGSTER_HOME"])
    config = (home / "dagster.yaml").read_text()
    assert "postgres_url" in config and "SPECDRAFT_PG_URL" in config
    # The password lives in the environment only: not in the instance file, not in any output.
    assert PASSWORD not in config and PASSWORD not in out.stdout + out.stderr
    assert not list(home.glob("**/*.db")), "an SQLite database was created next to the PostgreSQL instance"

    os.environ.update(env)  # the instance reads SPECDRAFT_PG_URL through dagster.yaml
    try:
        with dg.DagsterInstance.from_config(str(home)) as instance:
            runs = instance.get_runs()
            # The runs live in the PostgreSQL database itself (Dagster's `runs` table).
            import psycopg2

            db = psycopg2.connect(pg.url)
            try:
                with db.cursor() as cursor:
                    cursor.execute("select count(*) from runs")
                    assert cursor.fetchone()[0] == len(runs) == len(SHARDS)
            finally:
                db.close()
            assert sorted(r.tags["dagster/partition"] for r in runs) == SHARDS
            assert all(r.status == dg.DagsterRunStatus.SUCCESS for r in runs)
            # One materialization per asset partition, each carrying its data version and its input's.
            for shard in SHARDS:
                for asset in ("source_corpus", "resampled_corpus"):
                    recs = instance.fetch_materializations(
                        dg.AssetRecordsFilter(asset_key=dg.AssetKey(asset), asset_partitions=[shard]), limit=5).records
                    assert len(recs) == 1, (asset, shard)
                    tags = recs[0].asset_materialization.tags
                    assert recs[0].asset_materialization.metadata["fingerprint"].value == tags["dagster/data_version"]
                assert "dagster/input_data_version/source_corpus" in tags

            windows = {r.run_id: step_windows(instance, r.run_id) for r in runs}
            spans = sorted((min(s for s, _ in w.values()), max(e for _, e in w.values())) for w in windows.values())
            # Shards ran in parallel: some run started before another one ended.
            assert any(spans[i + 1][0] < spans[i][1] for i in range(len(spans) - 1)), spans
            # ...but never two target-loading steps at once (pool limit 1).
            target = sorted(w[k] for w in windows.values() for k in w if k in TARGET_STEPS)
            assert len(target) == 4
            assert all(target[i + 1][0] >= target[i][1] - 0.05 for i in range(len(target) - 1)), target
            assert pool_occupancy(home, "target-cpu") == (0, 1)  # every slot handed back
    finally:
        for key in env:
            os.environ.pop(key, None)
    # Lineage as the UI reads it from the instance: every asset partition is fresh against its
    # inputs' data versions, so nothing would be launched again.
    again = specdraft(["run", "--select", "*resampled_corpus", "--config-json", json.dumps(SMALL),
                       "--only-stale-or-missing", "--dry-run"], {k: v for k, v in env.items() if k != "SPECDRAFT_PARALLEL"})
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "8 asset partitions current, 0 runs to launch" in again.stdout, again.stdout[-3000:]
    # A new slot count on the same instance (cache hits, but every target step claims a slot).
    more = specdraft(["run", "--select", "*resampled_corpus", "--config-json", json.dumps(SMALL)],
                     {**env, "SPECDRAFT_TARGET_SLOTS": "2"})
    assert more.returncode == 0, more.stdout[-3000:] + more.stderr[-3000:]
    os.environ.update(env)  # the instance reads SPECDRAFT_PG_URL through dagster.yaml
    try:
        assert pool_occupancy(home, "target-cpu") == (0, 2)
    finally:
        for key in env:
            os.environ.pop(key, None)


@needs_pg
def test_unreachable_postgres_fails_at_once_without_the_password(tiny_target, tmp_path):
    port = free_port()  # nothing listens there
    env = {**graph_env(tmp_path, tiny_target, n_shards=1),
           "SPECDRAFT_PG_URL": f"postgresql://specdraft:{PASSWORD}@127.0.0.1:{port}/dagster"}
    t0 = time.time()
    out = specdraft(["run", "--select", "source_corpus"], env, timeout=60)
    assert out.returncode != 0
    assert time.time() - t0 < 30
    assert f"postgresql://specdraft@127.0.0.1:{port}/dagster" in out.stderr
    assert "Connection refused" in out.stderr or "connection" in out.stderr.lower(), out.stderr
    assert PASSWORD not in out.stdout + out.stderr
