"""`dagster-webserver` for tests: a real server on a free loopback port, in its own process group,
stopped by its PID, and its GraphQL API (what the UI asks) over HTTP."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from tests.conftest import free_port

ROOT = Path(__file__).resolve().parents[1]
LOADED = ("{ workspaceOrError { ... on Workspace { locationEntries { name "
          "locationOrLoadError { __typename ... on PythonError { message } } } } } }")


class Webserver:
    def __init__(self, url: str):
        self.url = url

    def graphql(self, query: str, variables: dict | None = None, timeout: float = 120) -> dict:
        """The `data` of a GraphQL answer; an answer with errors raises, quoting them."""
        body = json.dumps({"query": query, "variables": variables or {}}).encode()
        request = urllib.request.Request(f"{self.url}/graphql", data=body, headers={"Content-Type": "application/json"})
        answer = json.loads(urllib.request.urlopen(request, timeout=timeout).read())
        if answer.get("errors"):
            raise AssertionError(f"GraphQL errors: {answer['errors']}")
        return answer["data"]


@contextlib.contextmanager
def dagster_webserver(target_args: list[str], env: dict, log_path: Path, timeout: float = 240):
    """dagster-webserver over `target_args` (e.g. ["-w", "workspace.yaml"] or ["-f", file]) with `env`
    added to this process's environment; yields a Webserver once its code location has loaded."""
    port = free_port()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [str(Path(sys.executable).parent / "dagster-webserver"), *target_args, "-h", "127.0.0.1", "-p", str(port)],
            cwd=ROOT, env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
    server = Webserver(f"http://127.0.0.1:{port}")
    try:
        _wait_until_loaded(server, proc, log_path, timeout)
        yield server
    finally:
        _stop(proc)


def _wait_until_loaded(server: Webserver, proc: subprocess.Popen, log_path: Path, timeout: float) -> None:
    """/server_info answers, then the code location has loaded (or its load error is reported)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"dagster-webserver exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
        try:
            urllib.request.urlopen(f"{server.url}/server_info", timeout=5).read()
            entries = server.graphql(LOADED, timeout=30)["workspaceOrError"]["locationEntries"]
            loaded = [e["locationOrLoadError"] for e in entries if e["locationOrLoadError"]]
            if loaded and loaded[0]["__typename"] == "PythonError":
                raise RuntimeError(f"code location failed to load: {loaded[0]['message']}")
            if loaded:
                return
        except (OSError, KeyError, TypeError, ValueError, AssertionError):
            pass
        time.sleep(1)
    raise TimeoutError(f"dagster-webserver not ready in {timeout}s:\n{log_path.read_text()[-3000:]}")


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM to the server's process group (it and its code server), SIGKILL if it lingers."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # the code server child, if it outlived the server
    except ProcessLookupError:
        pass
