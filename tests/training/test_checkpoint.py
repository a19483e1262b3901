"""Checkpoints: exact optimizer/RNG round trips, atomic pointer, pruning, integrity, S3."""

import json

import pytest
import torch

from training.checkpoint import (
    CKPT_DIR,
    checkpoint_prefix,
    flatten_optimizer_state,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
    unflatten_optimizer_state,
)
from training.storage import ObjectStore, StoreError


def _model_and_opt(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.LayerNorm(16), torch.nn.Linear(16, 4))
    opt = torch.optim.AdamW(
        [{"params": [model[0].weight, model[2].weight], "weight_decay": 0.1},
         {"params": [model[0].bias, model[1].weight, model[1].bias, model[2].bias], "weight_decay": 0.0}],
        lr=1e-2, betas=(0.9, 0.95),
    )
    return model, opt


def _step(model, opt, x):
    opt.zero_grad(set_to_none=True)
    model(x).square().mean().backward()
    opt.step()


def _save(store, run, step, model, opt, keep=2, state=None):
    return save_checkpoint(
        store, run, step=step, model_state=dict(model.named_parameters()), optimizer_state=opt.state_dict(),
        param_names=[n for n, _ in model.named_parameters()], rng={"torch_cpu.rank0": torch.get_rng_state()},
        state={"step": step, **(state or {})}, keep=keep,
    )


def test_optimizer_state_round_trip_continues_bitwise():
    model, opt = _model_and_opt()
    xs = torch.randn(6, 5, 8, generator=torch.Generator().manual_seed(1))
    for x in xs[:3]:
        _step(model, opt, x)
    tensors, index = flatten_optimizer_state(opt.state_dict())
    json.dumps(index)  # the non-tensor part must be plain JSON
    assert all(isinstance(t, torch.Tensor) for t in tensors.values())

    clone, clone_opt = _model_and_opt(seed=123)  # different init: everything must come from the state
    with torch.no_grad():
        for p, q in zip(clone.parameters(), model.parameters()):
            p.copy_(q)
    clone_opt.load_state_dict(unflatten_optimizer_state(tensors, json.loads(json.dumps(index))))
    for x in xs[3:]:
        _step(model, opt, x)
        _step(clone, clone_opt, x)
    for p, q in zip(clone.parameters(), model.parameters()):
        assert torch.equal(p, q)
    assert clone_opt.param_groups[0]["betas"] == (0.9, 0.95)


def test_save_load_pointer_and_pruning(store):  # local folder and loopback S3 (conftest)
    model, opt = _model_and_opt()
    assert load_checkpoint(store, "runs/a") is None
    for step in (1, 2, 3, 4):
        _step(model, opt, torch.randn(5, 8))
        _save(store, "runs/a", step, model, opt, keep=2, state={"epoch": 0})
    assert [s for s, _ in list_checkpoints(store, "runs/a")] == [3, 4]
    assert store.read_json(f"runs/a/{CKPT_DIR}/latest.json")["step"] == 4
    ck = load_checkpoint(store, "runs/a")
    assert ck.step == 4 and ck.state["epoch"] == 0
    for n, p in model.named_parameters():
        assert torch.equal(ck.model[n], p.detach())
    assert torch.equal(ck.rng["torch_cpu.rank0"], torch.get_rng_state())
    # Only safetensors and JSON on disk: no pickles.
    files = store.list(f"runs/a/{CKPT_DIR}", recursive=True)
    assert files and all(f.endswith((".safetensors", ".json")) for f in files)


def test_killed_writer_leaves_previous_checkpoint_readable(tmp_path):
    store = ObjectStore(str(tmp_path))
    model, opt = _model_and_opt()
    _save(store, "r", 5, model, opt)
    # A writer killed mid-way: files of step 10 exist under an attempt folder, no manifest, no pointer move.
    store.write_bytes(f"{checkpoint_prefix('r', 10)}/attempt-x/model.safetensors", b"partial")
    assert load_checkpoint(store, "r").step == 5
    # Killed after the manifest but before the pointer: the pointer still wins (a complete checkpoint).
    _save(store, "r", 7, model, opt)
    store.write_json(f"r/{CKPT_DIR}/latest.json", {"step": 5, "prefix": checkpoint_prefix("r", 5)})
    assert load_checkpoint(store, "r").step == 5
    # No pointer at all: the newest complete step folder.
    store.delete(f"r/{CKPT_DIR}/latest.json")
    assert load_checkpoint(store, "r").step == 7


def test_corrupt_checkpoint_is_detected(tmp_path):
    store = ObjectStore(str(tmp_path))
    model, opt = _model_and_opt()
    prefix = _save(store, "r", 1, model, opt)
    key = store.manifest(prefix).key("model.safetensors")
    data = bytearray(store.read_bytes(key))
    data[-1] ^= 0xFF
    store.write_bytes(key, bytes(data))
    with pytest.raises(StoreError, match="sha256"):
        load_checkpoint(store, "r")


def test_checkpoint_on_s3(s3_store):
    model, opt = _model_and_opt()
    for step in (1, 2, 3):
        _step(model, opt, torch.randn(5, 8))
        _save(s3_store, "runs/s3", step, model, opt, keep=1)
    assert [s for s, _ in list_checkpoints(s3_store, "runs/s3")] == [3]
    ck = load_checkpoint(s3_store, "runs/s3")
    assert ck.step == 3
    fresh, fresh_opt = _model_and_opt(seed=9)
    fresh_opt.load_state_dict(ck.optimizer)
    assert torch.equal(fresh_opt.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
