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

import os
import socket
from pathlib import Path
from urllib.parse import urlsplit

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
    if ours and current != wanted:
        config.write_text(wanted)
    elif not ours and url and "postgres" not in current:
        raise InstanceConfigError(
            f"{PG_ENV} is set but {config} was written by hand and has no postgres storage: add "
            f"`storage: postgres: postgres_url: {{env: {PG_ENV}}}` to it, or remove the file"
        )
    if url:
        check_postgres(url)
    set_pool_limit(home)
    return config


def set_pool_limit(home: Path) -> None:
    """Give the target pool its limit explicitly in the instance (SPECDRAFT_TARGET_SLOTS).

    dagster.yaml's `default_limit` only seeds pools; when it changes, Dagster 1.13.27 updates the
    seeded limit in the middle of a step's claim, and on PostgreSQL that update fails the run
    (InFailedSqlTransaction). An explicit limit is never re-seeded."""
    import dagster as dg

    with dg.DagsterInstance.from_config(str(home)) as instance:
        storage = instance.event_log_storage
        if storage.supports_global_concurrency_limits:
            info = storage.get_concurrency_info(target_pool())
            if info.slot_count != target_slots() or getattr(info, "from_default", False):
                storage.set_concurrency_slots(target_pool(), target_slots())


def preflight(home: Path) -> Path:
    """Everything `specdraft` checks before it launches a run: the instance's dagster.yaml and
    database, and the Ray cluster when SPECDRAFT_RAY_ADDRESS is set (a bad address fails here, at
    once, instead of in the first resample step)."""
    config = ensure_instance(home)
    if shard_parallelism() > 1 and "postgres" not in config.read_text():
        raise InstanceConfigError(
            f"SPECDRAFT_PARALLEL={shard_parallelism()} needs an instance that takes concurrent writers: set "
            f"{PG_ENV} (the SQLite instance in {home} locks under parallel runs)")
    address = os.environ.get("SPECDRAFT_RAY_ADDRESS", "").strip()
    if address:
        from training.ray_pool import RayPoolError, check_ray_address

        try:
            check_ray_address(address)
        except RayPoolError as exc:
            raise InstanceConfigError(str(exc)) from None
    return config


def runner_tags() -> dict[str, str]:
    """The RUNNER_TAG of a run this process executes."""
    return {RUNNER_TAG: f"{socket.gethostname()}:{os.getpid()}"}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    try:  # a zombie is dead, only not yet reaped by its parent
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def release_dead_runs(instance, log=print) -> list[str]:
    """Fail the runs whose executing process on this host is gone, and free the pool slots they hold.

    A run whose process is SIGKILLed (or OOM-killed) stays STARTED in the instance and keeps the
    target-pool slot its step claimed; with one slot per device, every later target-loading step
    would wait for it forever (Dagster's daemon frees slots only of runs that ended, and
    `specdraft run` has no daemon). Runs on other hosts are left to their own host. Slots still
    held by runs that did end are freed too. Returns the ids of the runs marked failed.
    """
    import dagster as dg

    host = socket.gethostname()
    released = []
    active = [dg.DagsterRunStatus.STARTING, dg.DagsterRunStatus.STARTED, dg.DagsterRunStatus.CANCELING]
    for record in instance.get_run_records(filters=dg.RunsFilter(statuses=active)):
        run = record.dagster_run
        runner_host, _, pid = run.tags.get(RUNNER_TAG, "").rpartition(":")
        if runner_host != host or not pid.isdigit() or _alive(int(pid)):
            continue
        instance.report_run_failed(run, f"its process ({host}:{pid}) is gone: killed before the run ended")
        log(f"run {run.run_id}: its process {host}:{pid} is gone; marked failed, pool slots freed")
        released.append(run.run_id)
    storage = instance.event_log_storage
    if storage.supports_global_concurrency_limits:
        for run_id in storage.get_concurrency_run_ids():
            run = instance.get_run_by_id(run_id)
            if run is None or run.is_finished:
                storage.free_concurrency_slots_for_run(run_id)
    return released
