"""Multi-node training through torchrun's c10d rendezvous: two `torchrun --nnodes 2` launches on
loopback (one gloo process per "node", ranks assigned by the rendezvous) follow the same loss
curve and end with the same weights as one process taking the same global batches, as the
2-process DDP test does on one node."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import free_port
from tests.training.test_ddp import TRAIN, assert_matches_one_process, fx  # noqa: F401  (fx: the module's run fixture)
from tests.training.test_trainer import job_spec
from training.checkpoint import load_checkpoint

pytestmark = pytest.mark.timeout(240)


def _node(job, port: int, env: dict, log) -> subprocess.Popen:
    """One "node": torchrun with one local process, meeting the other through c10d on 127.0.0.1:port."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
           "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "specdraft-test",
           "--max-restarts", "0", "-m", "training.train_main", str(job)]
    return subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def test_two_node_torchrun_c10d_matches_one_process(fx, tmp_path):  # noqa: F811
    job = tmp_path / "job.json"
    job.write_text(job_spec(fx, "runs/multinode", TRAIN).to_json())
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo", "MASTER_ADDR": "127.0.0.1"}
    logs = [open(tmp_path / f"node{i}.log", "w+") for i in range(2)]
    # The first launch hosts the c10d store on the endpoint; the second joins it.
    nodes = [_node(job, port, env, logs[0])]
    time.sleep(1.0)
    nodes.append(_node(job, port, env, logs[1]))
    try:
        rcs = [n.wait(timeout=200) for n in nodes]
    finally:
        for n in nodes:
            if n.poll() is None:
                os.killpg(n.pid, signal.SIGKILL)  # its own session: torchrun and its rank only
                n.wait()
    text = ""
    for f in logs:
        f.seek(0)
        text += f.read()
        f.close()
    assert rcs == [0, 0], text[-4000:]

    store = fx["store"]
    multi = [json.loads(x) for x in store.read_bytes("runs/multinode/metrics.jsonl").decode().splitlines()]
    assert load_checkpoint(store, "runs/multinode").state["world_size"] == 2

    assert_matches_one_process(fx, multi, "runs/multinode", "runs/one-multinode")
