"""Shared fixtures: a real S3 API server on loopback, stores on it and on disk, the demo target.

No network, no ../shared: everything here is built locally.
"""

from __future__ import annotations

import json
import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads: see training/__init__.py
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pytest

S3_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def set_fields(messages: list[dict]) -> list[dict]:
    """Messages read back from Arrow without their null optional fields (MESSAGE_TYPE's
    reasoning_content, tool_calls, ...), to compare with the dicts a test wrote."""
    return [{k: v for k, v in m.items() if v is not None} for m in messages]


def run_events(instance, run_id: str) -> list:
    """Every event log entry of a run, through the public records API."""
    return [r.event_log_entry for r in instance.get_records_for_run(run_id).records]


def free_port() -> int:
    """A loopback port free now (bound once to get a number, then released): for a server to start
    on, or, as nothing listens on it, an endpoint that refuses connections."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class JsonHandler(BaseHTTPRequestHandler):
    """Request handler base of the fake HTTP servers in tests (OpenAI-compatible ones): quiet, JSON in and out."""

    def log_message(self, *args):
        pass

    def read_json(self):
        return json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)))

    def send_json(self, status: int, obj, headers: dict | None = None) -> None:
        body = json.dumps(obj).encode()
        self.send_response(status)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class S3Server:
    """moto's standalone S3 server in a subprocess, stopped by its own PID."""

    def __init__(self) -> None:
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,  # default signal handlers, its own process group
        )
        deadline = time.time() + 30
        while time.time() < deadline:
            try:
                urllib.request.urlopen(self.endpoint, timeout=1)
                return
            except Exception:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"moto server exited with {self.proc.returncode}")
                time.sleep(0.2)
        raise RuntimeError("moto server did not start within 30 s")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


@pytest.fixture(scope="session")
def s3_server():
    server = S3Server()
    server.start()
    old = {k: os.environ.get(k) for k in [*S3_ENV, "AWS_ENDPOINT_URL"]}
    os.environ.update(S3_ENV, AWS_ENDPOINT_URL=server.endpoint)
    try:
        yield server
    finally:
        server.stop()
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture
def s3_bucket(s3_server) -> str:
    """A fresh bucket on the loopback server; returns its s3:// URL."""
    import s3fs

    name = f"test-{uuid.uuid4().hex[:12]}"
    s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_server.endpoint}, skip_instance_cache=True).mkdir(name)
    return f"s3://{name}"


@pytest.fixture
def s3_store(s3_bucket):
    from training.storage import ObjectStore

    return ObjectStore(f"{s3_bucket}/specdraft")


@pytest.fixture
def local_store(tmp_path):
    from training.storage import ObjectStore

    return ObjectStore((tmp_path / "store").as_uri())


@pytest.fixture(params=["local", "s3"])
def store(request):
    """The same suite against a local folder and against the loopback S3 server."""
    return request.getfixturevalue(f"{request.param}_store")


@pytest.fixture(scope="session")
def demo_target_dir() -> Path:
    """The demo target, trained once and cached in the project's data folder (as `make demo` does)."""
    from training.demo.target import ensure_demo_target

    return ensure_demo_target()


@pytest.fixture(scope="session")
def tiny_target(tmp_path_factory) -> Path:
    """A random-weight 8-layer Llama (H=64, distinct aux layers) that every graph test runs."""
    from training.targets.tiny import build_tiny_target

    return build_tiny_target(tmp_path_factory.mktemp("target") / "tiny", hidden_size=64, num_layers=8)


@pytest.fixture
def instance():
    """An ephemeral Dagster instance (in memory)."""
    import dagster as dg

    with dg.DagsterInstance.ephemeral() as inst:
        yield inst


E2E = Path(__file__).parent / "e2e"


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects by marker
def pytest_collection_modifyitems(items):
    """`slow`: everything under tests/e2e/ (whole-graph runs, CLI, kills, store faults, security, UI,
    trainer resume, draft quality) and any test that needs the demo target (`demo_target_dir` trains
    it for 3 minutes when it is not cached). A few modules mark themselves (test_ddp: two torchrun
    processes). `pytest -m "not slow"` is the fast loop."""
    for item in items:
        if item.path.is_relative_to(E2E) or "demo_target_dir" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)


def parse_module(path: Path):
    """ast.parse of a source file with the garbage collector paused: CPython 3.11.7's AST
    constructor fails ("recursion depth mismatch") when a collection runs a finalizer, such as
    SQLAlchemy's pool reset left by an earlier test, in the middle of it."""
    import ast
    import gc

    gc.collect()
    gc.disable()
    try:
        return ast.parse(Path(path).read_text())
    finally:
        gc.enable()
