"""Exact resume: a training process SIGKILLed after a checkpoint, then resumed, ends with the very
same weights and optimizer state as an uninterrupted run (bitwise, CPU, same seed and threads)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from tests.training.test_trainer import build_run_fixture, job_spec
from training.checkpoint import CKPT_DIR, load_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# grad_accum 2 over 11 micro-batches per epoch: 5 steps per epoch and a dropped tail, so the
# kill lands mid-epoch and the resumed run must skip into it and cross epoch boundaries.
TRAIN = {"lr": 3e-3, "epochs": 4, "max_tokens_per_batch": 256, "grad_accum": 2, "warmup_steps": 3,
         "log_every": 2, "checkpoint_every": 3, "keep_checkpoints": 2, "seed": 7}


@pytest.fixture(scope="module")
def fx(tmp_path_factory):
    return build_run_fixture(tmp_path_factory.mktemp("resume"))


def _launch(spec_path):
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "training.train_main", str(spec_path)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)


def _write_spec(tmp_path, name, spec):
    path = tmp_path / f"{name}.json"
    path.write_text(spec.to_json())
    return path


def test_sigkill_then_resume_is_bitwise_identical(fx, tmp_path):
    store = fx["store"]
    # Uninterrupted reference, in its own process like the others.
    ref = _launch(_write_spec(tmp_path, "ref", job_spec(fx, "runs/ref", TRAIN)))
    # The run to kill: poll its checkpoint pointer and SIGKILL it once a mid-run checkpoint exists.
    spec = _write_spec(tmp_path, "victim", job_spec(fx, "runs/victim", TRAIN))
    victim = _launch(spec)
    pointer = f"runs/victim/{CKPT_DIR}/latest.json"
    deadline = time.time() + 120
    killed_after = None
    while time.time() < deadline and victim.poll() is None:
        if store.exists(pointer):
            try:
                step = store.read_json(pointer)["step"]
            except (ValueError, FileNotFoundError):
                step = 0
            if step >= 6:
                os.killpg(victim.pid, signal.SIGKILL)  # its own session: only the process we started
                killed_after = step
                break
        time.sleep(0.01)
    victim.wait(30)
    assert killed_after is not None and victim.returncode == -signal.SIGKILL, victim.stdout.read().decode()[-2000:]
    assert ref.wait(180) == 0, ref.stdout.read().decode()[-3000:]
    total = load_checkpoint(store, "runs/ref").step
    at_kill = load_checkpoint(store, "runs/victim")
    assert 6 <= at_kill.step < total and at_kill.state["batch_in_epoch"] > 0  # killed mid-epoch

    resumed = _launch(spec)
    out = resumed.communicate(timeout=180)[0].decode()
    assert resumed.returncode == 0, out[-3000:]
    assert f"resumed runs/victim from step {at_kill.step}/{total}" in out

    a, b = load_checkpoint(store, "runs/ref"), load_checkpoint(store, "runs/victim")
    assert a.step == b.step == total
    assert a.model.keys() == b.model.keys()
    for name in a.model:
        assert torch.equal(a.model[name], b.model[name]), name
    for pid, entry in a.optimizer["state"].items():
        for key, value in entry.items():
            other = b.optimizer["state"][pid][key]
            assert torch.equal(value, other) if torch.is_tensor(value) else value == other, (pid, key)
    # The logged curve too (every 2 steps and at each checkpoint): records up to the kill come
    # from the killed run's metrics.jsonl, the rest were recomputed after the resume.
    curve = lambda run: [(r["step"], r["loss"]) for r in map(json.loads, store.read_bytes(
        f"runs/{run}/metrics.jsonl").decode().splitlines())]
    assert curve("victim") == curve("ref") and curve("ref")[-1][0] == total
    assert a.state["tokens_seen"] == b.state["tokens_seen"]
