"""Trainer: config, lr schedule, offline and online training on a tiny random target, metrics,
checkpoint bookkeeping and the train_main entry point (in-process).

`build_run_fixture` and `job_spec` are shared with test_resume.py and test_ddp.py.
"""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from training.checkpoint import CKPT_DIR, load_checkpoint
from training.schedule import lr_at, warmup_steps_for
from training.storage import ObjectStore
from training.trainer import OnlineBatchSource, TrainConfig, acceptance_length, train

TOKENIZED_KEY = "tokenized_shards/s0/fp0/attempt-0/tokenized.parquet"
VOCAB_PREFIX = "vocab_map/_/fp0"
HIDDEN_PREFIX = "hidden_states/s0/fp0"
DRAFT_VOCAB = 128


# -- shared fixture --------------------------------------------------------------------------------
def build_run_fixture(root: Path, *, n_rows: int = 48, seed: int = 0) -> dict:
    """A tiny random Llama target (6 layers, H=64), tokenized rows, a vocab map and an offline
    hidden-state artifact (several parts), all in a local store under `root`."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from safetensors.torch import save

    from training.hidden_states import write_hidden_states
    from training.targets import load_target
    from training.targets.tiny import build_tiny_target

    # initializer_range 0.2: peakier target distributions than HF's 0.02, so there is a signal to learn.
    tdir = build_tiny_target(root / "target", num_layers=6, hidden_size=64, seed=seed, initializer_range=0.2)
    vocab = json.loads((tdir / "config.json").read_text())["vocab_size"]
    store = ObjectStore((root / "store").as_uri())
    g = np.random.default_rng(seed)
    rows = []
    for _ in range(n_rows):
        n = int(g.integers(16, 64))
        ids = g.integers(5, vocab, size=n).astype(np.int32)
        mask = np.zeros(n, dtype=np.uint8)
        mask[n // 4:] = 1  # a "prompt" quarter the draft does not learn
        rows.append((ids, mask))
    table = pa.table({
        "id": [f"r{i}" for i in range(n_rows)],
        "input_ids": pa.array([r[0].tolist() for r in rows], pa.list_(pa.int32())),
        "loss_mask": pa.array([r[1].tolist() for r in rows], pa.list_(pa.uint8())),
        "n_tokens": pa.array([len(r[0]) for r in rows], pa.int32()),
        "truncated": [False] * n_rows,
    })
    buf = io.BytesIO()
    pq.write_table(table, buf)
    store.write_bytes(TOKENIZED_KEY, buf.getvalue())

    counts = torch.zeros(vocab, dtype=torch.int64)
    for ids, mask in rows:
        counts.index_add_(0, torch.from_numpy(ids[mask.astype(bool)].astype(np.int64)),
                          torch.ones(int(mask.sum()), dtype=torch.int64))
    order = sorted(range(vocab), key=lambda i: (-int(counts[i]), i))[:DRAFT_VOCAB]
    draft_ids = torch.tensor(sorted(order))
    t2d = torch.zeros(vocab, dtype=torch.bool)
    t2d[draft_ids] = True
    d2t = draft_ids - torch.arange(DRAFT_VOCAB)
    with store.artifact(VOCAB_PREFIX, "fp0") as w:
        w.write_bytes("vocab_map.safetensors", save({"d2t": d2t, "t2d": t2d, "counts": counts}))

    target = load_target(str(tdir), backend="hf", device="cpu", dtype="float32")
    with store.artifact(HIDDEN_PREFIX, "fp0") as w:
        write_hidden_states(target, [(r[0].tolist(), r[1].tolist()) for r in rows], w,
                            max_tokens_per_batch=512, part_bytes=300_000)
    return {"root": root, "target_dir": tdir, "store": store, "target": target, "rows": rows,
            "d2t": d2t, "t2d": t2d, "vocab": vocab}


def job_spec(fx: dict, run_prefix: str, train_cfg: dict, *, online: bool = False, export_dir=None):
    from training.job import TrainJob
    from training.targets.spec import TargetSpec

    return TrainJob(
        store_root=fx["store"].root, run_prefix=run_prefix, vocab_map=VOCAB_PREFIX,
        target=TargetSpec(str(fx["target_dir"]), backend="hf", dtype="float32"),
        train=TrainConfig.from_dict(train_cfg),
        tokenized=[TOKENIZED_KEY] if online else [], hidden_states=[] if online else [HIDDEN_PREFIX],
        export_dir=str(export_dir) if export_dir else None,
        threads=1,  # bitwise comparisons need the same reduction order in every process
    )


def make_draft(fx: dict, seed: int = 0):
    from training.eagle3.model import DraftConfig, Eagle3Draft
    from training.targets.weights import load_head_weights

    from training.recipe import draft_width

    cfg_t = json.loads((fx["target_dir"] / "config.json").read_text())
    embed, head = load_head_weights(str(fx["target_dir"]))
    torch.manual_seed(seed)
    hidden, inter = draft_width(cfg_t["hidden_size"], cfg_t["intermediate_size"])  # as train_main builds it
    draft = Eagle3Draft(DraftConfig.from_target_config(cfg_t, int(fx["t2d"].sum()), None, inter, hidden), embed)
    return draft, head.float()


def offline_source(fx: dict):
    from training.hidden_states import HiddenStateDataset

    return HiddenStateDataset(fx["store"], [fx["store"].manifest(HIDDEN_PREFIX)])


# -- tests -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def fx(tmp_path_factory):
    torch.set_num_threads(1)
    return build_run_fixture(tmp_path_factory.mktemp("trainer"))


def test_config_json_round_trip():
    cfg = TrainConfig(lr=1e-3, betas=(0.8, 0.9), warmup_steps=5, max_steps=7)
    d = json.loads(json.dumps(cfg.to_dict()))
    assert TrainConfig.from_dict(d) == cfg
    with pytest.raises(ValueError, match="unknown TrainConfig fields"):
        TrainConfig.from_dict({"lr": 1e-3, "learning_rate": 1})
    with pytest.raises(ValueError, match="grad_accum"):
        TrainConfig(grad_accum=0)


def test_lr_warmup_then_cosine():
    base, warm, total = 1e-3, 10, 50
    lrs = [lr_at(s, base_lr=base, warmup=warm, total=total, min_lr_ratio=0.1) for s in range(total)]
    assert lrs[0] == pytest.approx(base / warm)  # the first update already moves
    assert all(b > a for a, b in zip(lrs[:warm], lrs[1:warm]))  # linear ramp
    assert lrs[warm - 1] == pytest.approx(base) and lrs[warm] == pytest.approx(base)
    assert all(b <= a for a, b in zip(lrs[warm:], lrs[warm + 1:]))  # cosine decay
    mid = warm + (total - 1 - warm) // 2
    assert lrs[mid] == pytest.approx(0.1 * base + 0.5 * 0.9 * base * (1 + math.cos(math.pi * 0.5)), rel=0.05)
    assert lrs[-1] == pytest.approx(0.1 * base)
    assert warmup_steps_for(200, None, 0.05) == 10 and warmup_steps_for(200, 3, 0.05) == 3


def test_acceptance_length_matches_loss_module():
    from training.eagle3.loss import TTTOutput

    cond = [0.9, 0.8, 0.5, 0.0]
    out = TTTOutput(torch.zeros(()), [0.0] * 4, [0.0] * 4, cond, [1] * 4)
    assert acceptance_length(cond) == pytest.approx(out.simulated_acceptance_length())


def test_offline_training_learns_and_reports(fx):
    draft, head = make_draft(fx)
    before = {n: p.detach().clone() for n, p in draft.named_parameters()}
    lines = []
    cfg = TrainConfig(lr=3e-3, epochs=4, max_tokens_per_batch=256, warmup_steps=4, log_every=1,
                      checkpoint_every=5, keep_checkpoints=2)
    res = train(cfg, offline_source(fx), draft, head, fx["t2d"], fx["store"], "runs/offline", log=lines.append)

    recs = res.metrics
    total = res.steps
    assert total == len(recs) and total >= 20
    # the run honoured the schedule: lr per step is lr_at, warmup included
    warm = 4
    assert [r["lr"] for r in recs] == pytest.approx(
        [lr_at(s, base_lr=3e-3, warmup=warm, total=total, min_lr_ratio=0.1) for s in range(total)])
    assert recs[0]["lr"] < recs[warm - 1]["lr"]
    # it learns: loss down, first-step agreement up (averages over the first and last quarter)
    q = total // 4
    first, last = recs[:q], recs[-q:]
    assert np.mean([r["loss"] for r in last]) < np.mean([r["loss"] for r in first])
    assert np.mean([r["acc"][0] for r in last]) > np.mean([r["acc"][0] for r in first])
    # result and progress reporting
    assert res.final_loss == recs[-1]["loss"] and len(res.acc) == 7 and len(res.cond_acc) == 7
    assert res.simulated_acceptance_length >= 1.0 and res.tokens_seen > 0 and res.wall_seconds > 0
    assert res.tokens_seen == sum(r["tokens"] for r in recs)
    assert any(line.startswith(f"step {total}/{total}") and "tok/s" in line and "eta" in line for line in lines)
    assert all(not torch.equal(before[n], p) for n, p in draft.named_parameters() if p.requires_grad)
    assert torch.equal(before["embed_tokens.weight"], draft.embed_tokens.weight)  # frozen
    # metrics.jsonl beside the checkpoints, one line per logged step; checkpoints pruned to 2
    stored = [json.loads(x) for x in fx["store"].read_bytes("runs/offline/metrics.jsonl").decode().splitlines()]
    assert [r["step"] for r in stored] == list(range(1, total + 1))
    steps = sorted(int(k.rsplit("-", 1)[1]) for k in fx["store"].list(f"runs/offline/{CKPT_DIR}") if "step-" in k)
    assert len(steps) == 2 and steps[-1] == total
    ck = load_checkpoint(fx["store"], "runs/offline")
    # the checkpoint holds the resolved config: what was set explicitly, the recipe's values for the rest
    assert ck.step == total and ck.state["config"] == res.config
    assert all(res.config[k] == v for k, v in cfg.to_dict().items() if v is not None)
    assert res.recipe_fields == ["warmup_ratio", "validation_rows"] and res.config["validation_rows"] == 4  # 48 rows: even a small corpus holds some out
    assert set(ck.model) == {n for n, p in draft.named_parameters() if p.requires_grad}

    # A finished run resumes as a no-op with the same weights; a changed config is refused.
    again, _ = make_draft(fx, seed=5)
    res2 = train(cfg, offline_source(fx), again, head, fx["t2d"], fx["store"], "runs/offline", log=lines.append)
    assert res2.steps == total and res2.resumed_from == total and res2.final_loss == res.final_loss
    for (n, p), q2 in zip(draft.named_parameters(), again.parameters()):
        assert torch.equal(p, q2), n
    with pytest.raises(ValueError, match="lr"):
        train(TrainConfig.from_dict({**cfg.to_dict(), "lr": 1e-3}), offline_source(fx), again,
              head, fx["t2d"], fx["store"], "runs/offline", log=lines.append)
    # resume=False starts over and forgets the old checkpoints
    fresh, _ = make_draft(fx)
    short = TrainConfig.from_dict({**cfg.to_dict(), "max_steps": 2})
    res3 = train(short, offline_source(fx), fresh, head, fx["t2d"], fx["store"], "runs/offline",
                 log=lines.append, resume=False)
    assert res3.steps == 2 and res3.resumed_from is None
    assert load_checkpoint(fx["store"], "runs/offline").step == 2


def test_online_source_batches(fx):
    src = OnlineBatchSource(fx["target"], [TOKENIZED_KEY], aux_layer_ids=(2, 3, 3), store=fx["store"])
    # an artifact prefix reads every Parquet file its manifest lists
    with fx["store"].artifact("tokenized_shards/s1/fp1", "fp1") as w:
        w.write_bytes("tokenized.parquet", fx["store"].read_bytes(TOKENIZED_KEY))
    by_prefix = OnlineBatchSource(fx["target"], ["tokenized_shards/s1/fp1"], aux_layer_ids=(2, 3, 3), store=fx["store"])
    assert [x.tolist() for x in by_prefix.input_ids] == [x.tolist() for x in src.input_ids]
    n = src.num_batches(256, epoch=1, seed=3)
    every = list(src.batches(256, epoch=1, seed=3))
    assert len(every) == n and n >= 4
    # skip yields exactly the tail, deterministically; ranks take equal contiguous runs
    assert [b["input_ids"].tolist() for b in src.batches(256, epoch=1, seed=3, skip=2)] == \
        [b["input_ids"].tolist() for b in every[2:]]
    r0 = list(src.batches(256, epoch=1, seed=3, rank=0, world_size=2))
    r1 = list(src.batches(256, epoch=1, seed=3, rank=1, world_size=2))
    assert len(r0) == len(r1) == n // 2
    assert [b["input_ids"].tolist() for b in r0 + r1] == [b["input_ids"].tolist() for b in every[: 2 * (n // 2)]]
    # another epoch is another order
    assert [b["input_ids"].tolist() for b in src.batches(256, epoch=2, seed=3)] != [b["input_ids"].tolist() for b in every]
    # a batch is the target's own features over its packed rows, in the offline format
    b = every[0]
    T = int(b["cu_seqlens"][-1])
    assert b["aux"].shape == (T, 3 * 64) and b["last"].shape == (T, 64) and b["aux"].dtype == torch.float32
    assert b["input_ids"].dtype == torch.int64 and b["loss_mask"].dtype == torch.uint8
    seqs = [b["input_ids"][s:e].tolist() for s, e in zip(b["cu_seqlens"][:-1], b["cu_seqlens"][1:])]
    ref = fx["target"].features(seqs, (2, 3, 3))
    assert torch.equal(b["aux"], ref["aux"]) and torch.equal(b["last"], ref["last"])
    # offline batches have the same keys and dtypes
    off = next(offline_source(fx).batches(256, epoch=0, seed=0))
    assert {k: v.dtype for k, v in off.items()} == {k: v.dtype for k, v in b.items()}


def test_train_main_online_in_process(fx, tmp_path):
    from training.export import load_draft
    from training.train_main import run

    spec = job_spec(fx, "runs/online", {"lr": 3e-3, "max_steps": 6, "max_tokens_per_batch": 256,
                                        "log_every": 2, "checkpoint_every": 3, "warmup_steps": 2},
                    online=True, export_dir=tmp_path / "export")
    lines = []
    res = run(spec, log=lines.append)
    # log every 2 steps, and at every checkpoint (3, 6): steps 2, 3, 4, 6
    assert res.steps == 6 and math.isfinite(res.final_loss)
    assert [int(x.split()[1].split("/")[0]) for x in lines if x.startswith("step ")] == [2, 3, 4, 6]
    summary = fx["store"].read_json("runs/online/result.json")
    assert summary["steps"] == 6 and summary["final_loss"] == res.final_loss
    from training.targets.weights import load_head_weights

    # the export leaves the frozen embedding out by default (engines share the target's)
    embed = load_head_weights(str(fx["target_dir"]))[0]
    draft, d2t, t2d, config = load_draft(tmp_path / "export", embed_weight=embed)
    assert torch.equal(d2t, fx["d2t"]) and torch.equal(t2d, fx["t2d"])
    assert config["draft_vocab_size"] == DRAFT_VOCAB
    # bf16 export of the trained weights
    assert torch.allclose(draft.fc.weight, res.draft.fc.weight, rtol=1e-2, atol=1e-3)


def test_train_main_exports_embed_tokens_only_on_request(fx, tmp_path):
    """TrainJob.export_embed_tokens (draft_model's `export_embed_tokens`) reaches the export of a
    draft as wide as its target (a wider one always carries its own: test_a_wider_draft_...)."""
    import json

    from safetensors import safe_open

    from training.train_main import run

    cfg = {"lr": 3e-3, "max_steps": 1, "max_tokens_per_batch": 256, "warmup_steps": 0}
    for include in (False, True):
        job = job_spec(fx, f"runs/embed-{include}", cfg, export_dir=tmp_path / f"export-{include}")
        job.export_embed_tokens = include
        job.draft_hidden_size = json.loads((fx["target_dir"] / "config.json").read_text())["hidden_size"]
        run(job, log=lambda _: None)
        with safe_open(str(tmp_path / f"export-{include}" / "model.safetensors"), "pt") as f:
            assert ("embed_tokens.weight" in f.keys()) is include


def test_head_init_starts_lm_head_at_the_target_rows(fx, tmp_path):
    """TrainJob.head_init (draft_model's `head_init`): "target" starts the draft's lm_head at the
    target's head rows of the draft vocab, "random" at noise; a bad value is refused."""
    from training.eagle3.model import Eagle3Draft
    from training.job import TrainJob
    from training.targets.weights import load_head_weights
    from training.train_main import run

    cfg = {"lr": 1e-9, "max_steps": 1, "max_tokens_per_batch": 256, "warmup_steps": 0}  # ~no update
    embed, head = load_head_weights(str(fx["target_dir"]))
    rows = head.float()[fx["t2d"].bool()]
    for init in ("target", "random"):
        job = job_spec(fx, f"runs/head-{init}", cfg)
        job.head_init = init
        draft = run(job, log=lambda _: None).draft
        head_rows = draft.lm_head.weight.detach()[:, : rows.shape[1]]  # a wider draft pads with zeros
        assert torch.allclose(head_rows, rows, atol=1e-6) is (init == "target"), init
    with pytest.raises(ValueError, match="head_init"):
        TrainJob.from_dict({**job.to_dict(), "head_init": "zeros"})
    with pytest.raises(ValueError, match="t2d selects"):
        Eagle3Draft(draft.cfg, embed).init_head_from_target(head, torch.ones(head.shape[0], dtype=torch.bool))


def test_a_wider_draft_mlp_exports_its_width_and_reloads(fx, tmp_path):
    """TrainJob.draft_intermediate_size (draft_model's `draft_intermediate_size`) widens the draft's
    MLP; the export's config.json carries the width the engines build the MLP from."""
    import json

    from training.export import load_draft
    from training.job import TrainJob
    from training.targets.weights import load_head_weights
    from training.train_main import run

    width = 3 * json.loads((fx["target_dir"] / "config.json").read_text())["intermediate_size"]
    cfg = {"lr": 3e-3, "max_steps": 2, "max_tokens_per_batch": 256, "warmup_steps": 0}
    job = job_spec(fx, "runs/wide", cfg, export_dir=tmp_path / "export")
    job.draft_intermediate_size = width
    res = run(job, log=lambda _: None)
    assert res.draft.midlayer.mlp.up_proj.weight.shape == (width, res.draft.cfg.hidden_size)
    assert json.loads((tmp_path / "export" / "config.json").read_text())["intermediate_size"] == width
    draft, *_ = load_draft(tmp_path / "export", embed_weight=load_head_weights(str(fx["target_dir"]))[0])
    assert draft.midlayer.mlp.down_proj.weight.shape == (res.draft.cfg.hidden_size, width)
    with pytest.raises(ValueError, match="draft_intermediate_size"):
        TrainJob.from_dict({**job.to_dict(), "draft_intermediate_size": 0})


def test_a_wider_draft_trains_exports_and_reloads_self_contained(fx, tmp_path):
    """TrainJob.draft_hidden_size (draft_model's `draft_hidden_size`) widens the draft's residual
    stream; the export carries target_hidden_size and the draft's own embedding, so it reloads
    without the target's."""
    import json

    from training.export import load_draft
    from training.job import TrainJob
    from training.train_main import run

    target = json.loads((fx["target_dir"] / "config.json").read_text())
    target_h, target_i = target["hidden_size"], target["intermediate_size"]
    cfg = {"lr": 3e-3, "max_steps": 2, "max_tokens_per_batch": 256, "warmup_steps": 0}
    job = job_spec(fx, "runs/wide-h", cfg, export_dir=tmp_path / "export")
    job.draft_hidden_size = 2 * target_h
    res = run(job, log=lambda _: None)
    assert res.draft.fc.weight.shape == (2 * target_h, 3 * target_h)
    assert res.draft.cfg.intermediate_size == 2 * target_i  # the MLP scales with the width
    config = json.loads((tmp_path / "export" / "config.json").read_text())
    assert (config["hidden_size"], config["target_hidden_size"]) == (2 * target_h, target_h)
    draft, *_ = load_draft(tmp_path / "export")
    torch.testing.assert_close(draft.fc.weight, res.draft.fc.weight.to(torch.bfloat16).float())
    with pytest.raises(ValueError, match="draft_hidden_size"):
        TrainJob.from_dict({**job.to_dict(), "draft_hidden_size": 0})


def test_bf16_precision_trains_in_bf16_on_cpu_and_resumes_checkpoints_without_the_field(fx):
    """precision="bf16" autocasts the CPU matmuls over fp32 master weights (auto stays fp32 on CPU);
    it is part of the trajectory a resume checks, and a checkpoint written before the field
    existed reads as its default."""
    import dataclasses

    from training.trainer import _check_resumable

    with pytest.raises(ValueError, match="precision"):
        TrainConfig(precision="fp16")
    assert TrainConfig().bf16_on("cuda") and not TrainConfig().bf16_on("cpu")
    assert TrainConfig(precision="bf16").bf16_on("cpu") and not TrainConfig(precision="fp32").bf16_on("cuda")
    runs = {}
    for precision in ("auto", "bf16"):
        draft, head = make_draft(fx)
        lines = []
        cfg = TrainConfig(lr=3e-3, epochs=1, max_tokens_per_batch=256, warmup_steps=2, log_every=1,
                          validation_rows=4, precision=precision)
        runs[precision] = train(cfg, offline_source(fx), draft, head, fx["t2d"], fx["store"], f"runs/{precision}",
                                log=lines.append)
        assert lines[0].startswith(f"training {runs[precision].steps} steps ({'bf16' if precision == 'bf16' else 'fp32'})")
        assert all(p.dtype == torch.float32 for p in draft.parameters())  # master weights stay fp32
    fp32, bf16 = runs["auto"], runs["bf16"]
    assert fp32.steps == bf16.steps
    losses = [(a["loss"], b["loss"]) for a, b in zip(fp32.metrics, bf16.metrics)]
    assert losses[0][0] != losses[0][1]  # bf16 matmuls: not the fp32 numbers ...
    assert all(math.isfinite(b) and b == pytest.approx(a, rel=0.05) for a, b in losses)  # ... but close to them
    assert bf16.metrics[-1]["loss"] < bf16.metrics[0]["loss"]
    assert bf16.validation and bf16.validation[-1]["simulated_acceptance_length"] >= 1.0

    ck = load_checkpoint(fx["store"], "runs/auto")
    names = ck.param_names
    args = (1, ck.state["total_steps"], ck.state["epoch_steps"], names)
    legacy = {k: v for k, v in ck.state["config"].items() if k != "precision"}
    _check_resumable(dataclasses.replace(ck, state={**ck.state, "config": legacy}),
                     TrainConfig.from_dict(ck.state["config"]), *args)
    with pytest.raises(ValueError, match="precision: 'auto' -> 'bf16'"):
        _check_resumable(ck, TrainConfig.from_dict({**ck.state["config"], "precision": "bf16"}), *args)
