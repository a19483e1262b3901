"""Data parallel: `torchrun --nproc_per_node 2 -m training.train_main` (gloo, CPU) follows the same
loss curve as one process taking the same global batches (grad_accum 2 over the ranks' batches,
interleaved)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tests.training.test_trainer import build_run_fixture, job_spec, make_draft, offline_source
from training.checkpoint import load_checkpoint
from training.trainer import TrainConfig, train

pytestmark = pytest.mark.slow  # two torchrun processes (gloo) plus the one-process reference

# No held-out rows: the one-process reference reads an Interleaved view that cannot hold rows out,
# and the comparison is of the training trajectories (validation has its own tests).
TRAIN = {"lr": 3e-3, "epochs": 2, "max_tokens_per_batch": 256, "warmup_steps": 2, "log_every": 1,
         "checkpoint_every": 4, "seed": 3, "validation_rows": 0}


class Interleaved:
    """One process reading what `world` ranks read, step by step: rank 0's i-th batch, rank 1's
    i-th, ... so grad_accum=world reproduces the distributed global batches."""

    def __init__(self, source, world: int):
        self.source, self.world = source, world
        self.num_tokens, self.num_sequences = source.num_tokens, source.num_sequences  # what the recipe sizes

    def num_batches(self, max_tokens, world_size=1, *, epoch=0, seed=0):
        assert world_size == 1
        return self.source.num_batches(max_tokens, self.world, epoch=epoch, seed=seed) * self.world

    def batches(self, max_tokens, *, epoch, seed, rank=0, world_size=1, skip=0):
        its = [self.source.batches(max_tokens, epoch=epoch, seed=seed, rank=r, world_size=self.world)
               for r in range(self.world)]
        for i, group in enumerate(zip(*its)):
            for j, batch in enumerate(group):
                if i * self.world + j >= skip:
                    yield batch


@pytest.fixture(scope="module")
def fx(tmp_path_factory):
    return build_run_fixture(tmp_path_factory.mktemp("ddp"))


def test_two_process_ddp_matches_one_process(fx, monkeypatch):
    from training.train_main import launch

    # launch() runs `python -m torch.distributed.run --standalone --nproc_per_node 2 -m training.train_main job.json`
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")  # sandboxes may not resolve their own hostname
    lines = []
    summary = launch(job_spec(fx, "runs/ddp", TRAIN), nproc=2, log=lines.append)
    store = fx["store"]
    ddp = [json.loads(x) for x in store.read_bytes("runs/ddp/metrics.jsonl").decode().splitlines()]
    assert load_checkpoint(store, "runs/ddp").state["world_size"] == 2
    assert summary["steps"] == len(ddp) and summary["final_loss"] == ddp[-1]["loss"]
    # rank 0 alone logs: each step's line once
    assert sum(line.startswith("step 1/") for line in lines) == 1, "\n".join(lines[-40:])

    assert_matches_one_process(fx, ddp, "runs/ddp", "runs/one")


def assert_matches_one_process(fx: dict, metrics: list[dict], run_prefix: str, one_prefix: str) -> None:
    """A 2-rank run (its `metrics` and final checkpoint under `run_prefix`) equals one process with
    grad_accum 2 over the same interleaved batches: same steps and tokens, same losses, same weights."""
    torch.set_num_threads(1)
    draft, head = make_draft(fx, seed=TRAIN["seed"])
    draft.init_head_from_target(head, fx["t2d"])  # as train_main starts it (TrainJob.head_init default)
    cfg = TrainConfig.from_dict({**TRAIN, "grad_accum": 2})
    one = train(cfg, Interleaved(offline_source(fx), 2), draft, head, fx["t2d"], fx["store"], one_prefix,
                log=lambda _: None)
    ref = one.metrics
    assert [r["step"] for r in metrics] == [r["step"] for r in ref] and len(ref) == one.steps >= 8
    assert [r["tokens"] for r in metrics] == [r["tokens"] for r in ref]  # the same global batches
    np.testing.assert_allclose([r["loss"] for r in metrics], [r["loss"] for r in ref], rtol=1e-4)
    np.testing.assert_allclose([r["acc"] for r in metrics], [r["acc"] for r in ref], atol=0.02)
    final = load_checkpoint(fx["store"], run_prefix).model
    for name, p in draft.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(final[name], p.detach(), rtol=1e-3, atol=1e-4)
