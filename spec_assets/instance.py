"""The Dagster instance `specdraft` runs on: SQLite under DAGSTER_HOME by default, PostgreSQL when
SPECDRAFT_PG_URL is set, and the concurrency pools that keep target-loading steps off an
oversubscribed device.

The dagster.yaml written here never holds credentials: the PostgreSQL URL is referenced as
`{env: SPECDRAFT_PG_URL}` and read by dagster-postgres when the instance loads. Errors name the
server as `postgresql://user@host:port/db`, never with the password.

Environment:
  SPECDRAFT_PG_URL        postgresql://user:password@host:port/db  (unset: SQLite files in DAGSTER_HOME)
  SPECDRAFT_DEVICE_KIND   the device kind target-loading steps use, names their pool (default cpu)
  SPECDRAFT_TARGET_SLOTS  how many target-loading steps may run at once per pool (default 1:
                          one per device; on a node with 8 GPUs and one step per GPU, 8)
  SPECDRAFT_PARALLEL      shard runs `specdraft run` executes at once (default 1, in process)
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from urllib.parse import urlsplit

from training.liveness import pid_alive, this_process

PG_ENV = "SPECDRAFT_PG_URL"
MARKER = "# written by specdraft (spec_assets/instance.py); edit freely, then remove this line to keep it\n"
# What ensure_dagster_home (and the tests' new_dagster_home) wrote before this module existed:
# telemetry settings only, still ours to rewrite.
_LEGACY = {"telemetry:\n  enabled: false\nnux:\n  enabled: false\n", "telemetry:\n  enabled: false\n"}


# host:pid of the process executing a run, so a later `specdraft` can tell a run whose process died
# from one still going (release_dead_runs).
RUNNER_TAG = "specdraft/runner"


class InstanceConfigError(RuntimeError):
    """The instance cannot be used: unreachable database, foreign dagster.yaml, bad setting."""


def target_pool() -> str:
    """The concurrency pool of the steps that load the target (resample, hidden states, online
    training, evaluation): one pool per device kind, its slots the devices of that kind."""
    kind = os.environ.get("SPECDRAFT_DEVICE_KIND", "cpu").strip() or "cpu"
    return f"target-{kind}"


def _positive_int(name: str) -> int:
    """The positive integer in environment variable `name` (default 1), else InstanceConfigError."""
    raw = os.environ.get(name, "1")
    try:
        n = int(raw)
    except ValueError:
        n = 0
    if n < 1:
        raise InstanceConfigError(f"{name} must be a positive integer, got {raw!r}")
    return n


def target_slots() -> int:
    return _positive_int("SPECDRAFT_TARGET_SLOTS")


def shard_parallelism() -> int:
    return _positive_int("SPECDRAFT_PARALLEL")


def redact_url(url: str) -> str:
    """`postgresql://user@host:port/db`: the URL without its password (or anything after '?')."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or "?"
        port = parts.port
    except ValueError:
        return "<unparsable PostgreSQL URL>"
    user = f"{parts.username}@" if parts.username else ""
    return f"{parts.scheme}://{user}{host}{f':{port}' if port else ''}{parts.path}"


def _scrub(text: str, url: str) -> str:
    """`text` without the URL's password or the full URL, whatever a driver put in its message."""
    try:
        password = urlsplit(url).password
    except ValueError:
        password = None
    text = text.replace(url, redact_url(url))
    return text.replace(password, "***") if password else text


def instance_yaml(pg: bool) -> str:
    """dagster.yaml for specdraft: storage (PostgreSQL by env reference, or Dagster's SQLite
    default), op-granularity pools so a target step waits for a free slot of its device pool."""
    lines = [MARKER, "telemetry:\n  enabled: false\n", "nux:\n  enabled: false\n"]
    if pg:
        lines.append(f"storage:\n  postgres:\n    postgres_url:\n      env: {PG_ENV}\n")
    lines.append(f"concurrency:\n  pools:\n    granularity: op\n    default_limit: {target_slots()}\n")
    return "".join(lines)


def check_postgres(url: str, timeout_s: int = 5) -> None:
    """Fail at once, naming the server (no password) and the cause, when it cannot be reached."""
    import psycopg2  # dagster-postgres's driver (SQLAlchemy < 2.1 picks it for postgresql:// URLs)

    try:
        conn = psycopg2.connect(url.replace("+psycopg2://", "://", 1), connect_timeout=timeout_s)
    except psycopg2.Error as exc:
        cause = " ".join(str(exc).split())
        raise InstanceConfigError(
            f"PostgreSQL instance at {redact_url(url)} (from {PG_ENV}) is unreachable: {_scrub(cause, url)}"
        ) from None  # the chained driver error could carry the DSN
    conn.close()


def ensure_instance(home: Path) -> Path:
    """Write DAGSTER_HOME/dagster.yaml for the configured storage unless the user wrote their own,
    and check that a PostgreSQL server answers. Returns the dagster.yaml path."""
    url = os.environ.get(PG_ENV, "").strip()
    config = home / "dagster.yaml"
    wanted = instance_yaml(pg=bool(url))
    current = config.read_text() if config.exists() else None
    ours = current is None or current.startswith(MARKER) or current in _LEGACY
    if not ours and url and "postgres" not in current:
        raise InstanceConfigError(
            f"{PG_ENV} is set but {config} was written by hand and has no postgres storage: add "
            f"`storage: postgres: postgres_url: {{env: {PG_ENV}}}` to it, or remove the file"
        )
    rewrite = ours and current != wanted
    if rewrite:
        config.write_text(wanted)
    if url:
        check_postgres(url)
    if rewrite or not ours:  # ours unchanged: the limit was set when it was written
        try:
            set_pool_limit(home)
        except InstanceConfigError:
            if rewrite:
                config.unlink()  # the next `specdraft` writes it again and sets the limit then
            raise
    return config


def dagster_cli(args: list[str], home: Path | str, what: str) -> str:
    """Run one of Dagster's public command lines on the instance in `home`; its stdout. The pool
    limit and the slots of a dead run have no public Python API in Dagster 1.13.27 (only the
    storage internals), but `dagster instance concurrency` and the GraphQL API the UI uses do."""
    import subprocess

    env = {**os.environ, "DAGSTER_HOME": str(home), "DAGSTER_DISABLE_TELEMETRY": "yes"}
    out = subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True)
    if out.returncode != 0:
        tail = " ".join((out.stderr or out.stdout).split())[-600:]
        url = os.environ.get(PG_ENV, "")
        raise InstanceConfigError(f"{what} failed on the instance in {home}: {_scrub(tail, url) if url else tail}")
    return out.stdout


_DAGSTER = ["-m", "dagster"]
_DAGSTER_GRAPHQL = ["-c", "import sys; from dagster_graphql.cli import main; sys.exit(main())"]  # `dagster-graphql`


def set_pool_limit(home: Path) -> None:
    """Give the target pool its limit explicitly in the instance (SPECDRAFT_TARGET_SLOTS), with
    `dagster instance concurrency set`.

    dagster.yaml's `default_limit` only seeds pools; when it changes, Dagster 1.13.27 updates the
    seeded limit in the middle of a step's claim, and on PostgreSQL that update fails the run
    (InFailedSqlTransaction). An explicit limit is never re-seeded. ensure_instance calls this
    whenever it writes dagster.yaml (whose default_limit is the same number), so the two agree."""
    dagster_cli([*_DAGSTER, "instance", "concurrency", "set", target_pool(), str(target_slots())], home,
                f"setting the {target_pool()} pool's limit")


def free_pool_slots(run_id: str, home: Path | str) -> None:
    """Free the pool slots (claimed and pending) of run `run_id`, through Dagster's GraphQL API
    (the UI's "free concurrency slots" action), run in process by the `dagster-graphql` command."""
    query = "mutation($runId: String!) { freeConcurrencySlotsForRun(runId: $runId) }"
    out = dagster_cli([*_DAGSTER_GRAPHQL, "--empty-workspace", "-t", query, "-v", json.dumps({"runId": run_id})],
                      home, f"freeing the pool slots of run {run_id}")
    answer = json.loads(out.strip().splitlines()[-1])
    if answer.get("data", {}).get("freeConcurrencySlotsForRun") is not True:
        raise InstanceConfigError(f"freeing the pool slots of run {run_id} failed: {answer.get('errors')}")


def instance_home() -> Path:
    """The home of the instance `specdraft` opened (cli.ensure_dagster_home set DAGSTER_HOME)."""
    home = os.environ.get("DAGSTER_HOME", "").strip()
    if not home:
        raise InstanceConfigError("DAGSTER_HOME is not set: the Dagster commands specdraft runs need the instance's folder")
    return Path(home)


def require_concurrent_writers(home: Path) -> None:
    """Refuse parallel shard runs on an instance that is not on PostgreSQL (SQLite locks)."""
    config = home / "dagster.yaml"
    if not config.exists() or "postgres" not in config.read_text():
        raise InstanceConfigError(
            f"SPECDRAFT_PARALLEL={shard_parallelism()} needs an instance that takes concurrent writers: set "
            f"{PG_ENV} (the SQLite instance in {home} locks under parallel runs)")


def preflight(home: Path, ray_address: str = "") -> Path:
    """Everything `specdraft` checks before it launches a run: the instance's dagster.yaml and
    database, and the Ray cluster at `ray_address` when set (the ray_cluster resource's: a bad
    address fails here, at once, instead of in the first resample step)."""
    config = ensure_instance(home)
    if shard_parallelism() > 1:
        require_concurrent_writers(home)
    if ray_address:
        from training.ray_pool import RayPoolError, check_ray_address

        try:
            check_ray_address(ray_address)
        except RayPoolError as exc:
            raise InstanceConfigError(str(exc)) from None
    return config


def runner_tags() -> dict[str, str]:
    """The RUNNER_TAG of a run this process executes."""
    host, pid = this_process()
    return {RUNNER_TAG: f"{host}:{pid}"}


def release_dead_runs(instance, log=print) -> list[str]:
    """Fail the runs whose executing process on this host is gone, and free the pool slots they hold.

    A run whose process is SIGKILLed (or OOM-killed) stays STARTED in the instance and keeps the
    target-pool slot its step claimed; with one slot per device, every later target-loading step
    would wait for it forever (Dagster's daemon frees slots only of runs that ended, and
    `specdraft run` has no daemon). Runs on other hosts are left to their own host. The slots are
    freed first, so a `specdraft` killed in between finds the run still STARTED and frees it again.
    Returns the ids of the runs marked failed.
    """
    import dagster as dg

    host = this_process()[0]
    released = []
    active = [dg.DagsterRunStatus.STARTING, dg.DagsterRunStatus.STARTED, dg.DagsterRunStatus.CANCELING]
    for record in instance.get_run_records(filters=dg.RunsFilter(statuses=active)):
        run = record.dagster_run
        runner_host, _, pid = run.tags.get(RUNNER_TAG, "").rpartition(":")
        if runner_host != host or not pid.isdigit() or pid_alive(int(pid)):
            continue
        free_pool_slots(run.run_id, instance_home())
        instance.report_run_failed(run, f"its process ({host}:{pid}) is gone: killed before the run ended")
        log(f"run {run.run_id}: its process {host}:{pid} is gone; marked failed, pool slots freed")
        released.append(run.run_id)
    return released
