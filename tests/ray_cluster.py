"""A real two-node Ray cluster on loopback for tests and benchmarks: `ray start --head --block`
and `ray start --address --block`, one CPU each, separate temp dirs and free ports, each in its
own session so a node is stopped (or killed mid-shard) through its own process group, never by
name (`ray stop` kills every Ray process on the machine).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tests.conftest import free_port

ROOT = Path(__file__).resolve().parents[1]
RAY = Path(sys.executable).parent / "ray"
# Notice a dead node in about 2 s instead of Ray's default 30 s (GCS health checks).
FAST_FAILURE = {"RAY_health_check_initial_delay_ms": "1000", "RAY_health_check_period_ms": "500",
                "RAY_health_check_timeout_ms": "500", "RAY_health_check_failure_threshold": "3"}


def why_unavailable() -> str | None:
    try:
        import ray  # noqa: F401
    except ImportError as exc:
        return f"ray is not installed: {exc}"
    if not RAY.exists():
        return f"no `ray` command next to {sys.executable}"
    return None


class RayNode:
    def __init__(self, proc: subprocess.Popen, temp_dir: Path, log: Path):
        self.proc, self.temp_dir, self.log = proc, temp_dir, log

    def alive(self) -> bool:
        return self.proc.poll() is None

    def descendants(self) -> list[int]:
        """Every live process below `ray start`: the raylet, agents, and the workers the raylet
        forked (some in process groups of their own)."""
        children: dict[int, list[int]] = {}
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
        out, todo = [], [self.proc.pid]
        while todo:
            pid = todo.pop()
            for child in children.get(pid, []):
                out.append(child)
                todo.append(child)
        return out

    def kill(self) -> None:
        """SIGKILL the node: `ray start --block`, its process group and every process below it."""
        if self.proc.poll() is None:
            below = self.descendants()
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            for pid in below:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            self.proc.wait(10)

    def stop(self) -> None:
        """SIGTERM to the group (`ray start --block` stops its own processes), then SIGKILL."""
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(5)  # then SIGKILL below: a test cluster has nothing to save
            except subprocess.TimeoutExpired:
                pass
        self.kill()


class RayCluster:
    """Head + one worker node on 127.0.0.1, each with `num_cpus` CPUs."""

    def __init__(self, num_cpus: int = 1):
        self.num_cpus = num_cpus
        self.root = Path(tempfile.mkdtemp(prefix="rt-", dir="/tmp"))  # short: Ray's socket paths have a length limit
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.nodes: list[RayNode] = []

    def _start(self, name: str, extra: list[str]) -> RayNode:
        temp = self.root / name
        temp.mkdir()
        log = self.root / f"{name}.log"
        ports = ["--node-manager-port", str(free_port()), "--object-manager-port", str(free_port()),
                 "--dashboard-agent-listen-port", str(free_port()), "--dashboard-agent-grpc-port", str(free_port()),
                 "--metrics-export-port", str(free_port()), "--runtime-env-agent-port", str(free_port())]
        cmd = [str(RAY), "start", "--block", "--num-cpus", str(self.num_cpus), "--num-gpus", "0",
               "--node-ip-address", "127.0.0.1", "--object-store-memory", str(80 * 1024 * 1024),
               "--temp-dir", str(temp), "--disable-usage-stats", *ports, *extra]
        env = {**os.environ, **FAST_FAILURE, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
               "RAY_USAGE_STATS_ENABLED": "0"}
        proc = subprocess.Popen(cmd, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True)
        node = RayNode(proc, temp, log)
        self.nodes.append(node)
        return node

    def start(self, timeout_s: float = 90) -> "RayCluster":
        self.head = self._start("head", ["--head", "--port", str(self.port), "--include-dashboard", "false",
                                         "--ray-client-server-port", str(free_port())])
        self._wait_nodes(1, timeout_s)
        self.worker = self._start("worker", ["--address", self.address])
        self._wait_nodes(2, timeout_s)
        return self

    def alive_nodes(self) -> int:
        out = subprocess.run([sys.executable, "-c", _COUNT, self.address], capture_output=True, text=True, timeout=60)
        return int(out.stdout.strip() or 0) if out.returncode == 0 else 0

    def _wait_nodes(self, n: int, timeout_s: float) -> None:
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            for node in self.nodes:
                if not node.alive():
                    raise RuntimeError(f"ray node exited: {node.log.read_text()[-3000:]}")
            if self.alive_nodes() >= n:
                return
            time.sleep(0.5)
        raise RuntimeError(f"ray cluster did not reach {n} nodes in {timeout_s} s:\n"
                           + "\n".join(node.log.read_text()[-2000:] for node in self.nodes))

    def actor_pids(self, name: str) -> list[int]:
        """PIDs of the actor processes of class `name` on our live nodes (found below each node's
        `ray start` process, never by name across the machine)."""
        out = []
        for node in self.nodes:
            if not node.alive():
                continue
            for pid in node.descendants():
                try:
                    cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode()
                except OSError:
                    continue
                if cmd.startswith(f"ray::{name}"):
                    out.append(pid)
        return out

    def stop(self) -> None:
        for node in reversed(self.nodes):
            node.stop()
        shutil.rmtree(self.root, ignore_errors=True)


# Count alive nodes from a short-lived driver (the GCS's node table, without joining as a driver).
_COUNT = """
import sys
from ray._raylet import GcsClient
nodes = GcsClient(address=sys.argv[1]).get_all_node_info(timeout=5)
print(sum(1 for n in nodes.values() if n.state == 0))
"""
