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

import numpy as np
import pytest
import torch

from tests.conftest import free_port
from tests.training.test_ddp import TRAIN, Interleaved, fx  # noqa: F401  (fx: the module's run fixture)
from tests.training.test_trainer import job_spec, make_draft, offline_source
from training.checkpoint import load_checkpoint
from training.trainer import TrainConfig, train

pytestmark = pytest.mark.timeout(240)


def _node(job, port: int, env: dict, log) -> subprocess.Popen:
    """One "node": torchrun with one local process, meeting the other through c10d on 127.0.0.1:port."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
           "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "specdraft-test",
           "--max-restarts", "0", "-m", "training.train_main", str(job)]
    return subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def test_two_node_torchrun_c10d_matches_one_process(fx, tmp_path):  # noqa: F811
    job = tmp_path / "job.json"
    job.write_text(json.dumps(job_spec(fx, "runs/multinode", TRAIN)))
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

    torch.set_num_threads(1)
    draft, head = make_draft(fx, seed=TRAIN["seed"])
    cfg = TrainConfig.from_dict({**TRAIN, "grad_accum": 2})
    one = train(cfg, Interleaved(offline_source(fx), 2), draft, head, fx["t2d"], store, "runs/one-multinode",
                log=lambda _: None)
    ref = one.metrics
    assert [r["step"] for r in multi] == [r["step"] for r in ref] and len(ref) == one.steps >= 8
    assert [r["tokens"] for r in multi] == [r["tokens"] for r in ref]  # the same global batches
    np.testing.assert_allclose([r["loss"] for r in multi], [r["loss"] for r in ref], rtol=1e-4)
    np.testing.assert_allclose([r["acc"] for r in multi], [r["acc"] for r in ref], atol=0.02)
    final = load_checkpoint(store, "runs/multinode").model
    for name, p in draft.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(final[name], p.detach(), rtol=1e-3, atol=1e-4)
