"""Held-out validation inside training: the split, per-epoch measurement, the best checkpoint,
and the error for non-finite input features (issue 12 item 4, issue 13 item 8)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.training.test_trainer import TOKENIZED_KEY, build_run_fixture, make_draft, offline_source
from training.checkpoint import load_best
from training.online import OnlineBatchSource
from training.sources import split_validation, validation_mask
from training.trainer import TrainConfig, train


@pytest.fixture(scope="module")
def fx(tmp_path_factory):
    torch.set_num_threads(1)
    return build_run_fixture(tmp_path_factory.mktemp("validation"))


def _rows(source) -> list[tuple]:
    return sorted(tuple(b["input_ids"][s:e].tolist())
                  for b in source.batches(10_000, epoch=0, seed=0)
                  for s, e in zip(b["cu_seqlens"][:-1].tolist(), b["cu_seqlens"][1:].tolist()))


@pytest.mark.parametrize("kind", ["offline", "online"])
def test_split_holds_out_a_fixed_disjoint_set(fx, kind):
    src = offline_source(fx) if kind == "offline" else OnlineBatchSource(
        fx["target"], [TOKENIZED_KEY], aux_layer_ids=(2, 3, 3), store=fx["store"])
    train_src, held = split_validation(src, 7, seed=1)
    assert held.num_sequences == 7 and train_src.num_sequences == src.num_sequences - 7
    assert train_src.num_tokens + held.num_tokens == src.num_tokens
    every, a, b = _rows(src), _rows(train_src), _rows(held)
    assert sorted(a + b) == every and not set(a) & set(b)
    # the same seed holds out the same rows; another seed others
    assert _rows(split_validation(src, 7, seed=1)[1]) == b
    assert _rows(split_validation(src, 7, seed=2)[1]) != b
    assert split_validation(src, 0) == (src, None)
    with pytest.raises(ValueError, match="leaves none"):
        split_validation(src, src.num_sequences)


@pytest.mark.parametrize("kind", ["offline", "online"])
def test_validation_mask_names_the_rows_the_split_holds_out(fx, kind):
    """A caller (bench_real_chat's evaluation on prompts no training row had) names the held-out rows
    by their position in the source: the mask must be the split's own rows, in source order."""
    src = offline_source(fx) if kind == "offline" else OnlineBatchSource(
        fx["target"], [TOKENIZED_KEY], aux_layer_ids=(2, 3, 3), store=fx["store"])
    held = validation_mask(src.num_sequences, 7, seed=1)
    assert held.sum() == 7
    named = sorted(tuple(ids.tolist()) for (ids, _), h in zip(fx["rows"], held) if h)
    assert named == _rows(split_validation(src, 7, seed=1)[1])
    assert not np.array_equal(held, validation_mask(src.num_sequences, 7, seed=2))


def test_validation_each_epoch_and_best_checkpoint_exported(fx):
    """A loss function whose held-out acceptance falls after the first epoch: export_checkpoint=best
    returns the first epoch's weights, =last the final ones."""
    from training.eagle3.loss import ttt_forward

    calls = {"validation": 0}

    def loss_fn(model, batch, head, t2d, **kw):
        out = ttt_forward(model, batch, head, t2d, **kw)
        if not torch.is_grad_enabled():  # measure_acceptance runs under no_grad
            n = calls["validation"]
            calls["validation"] += 1
            scale = 1.0 if n < 2 else 0.1  # the held-out set is 2 batches at 256 tokens
            out.cond_acc = [0.5 * scale] * len(out.cond_acc)
        return out

    cfg = dict(lr=3e-3, epochs=3, max_tokens_per_batch=256, warmup_steps=2, validation_rows=8, log_every=1000)
    lines = []
    draft, head = make_draft(fx)
    res = train(TrainConfig(**cfg), offline_source(fx), draft, head, fx["t2d"], fx["store"], "runs/best",
                log=lines.append, resume=False, loss_fn=loss_fn)
    assert [r["epoch"] for r in res.validation] == [0, 1, 2]
    for r in res.validation:  # the decoder-faithful replay, per draft length 1..ttt_length
        assert len(r["replayed_acceptance_length"]) == TrainConfig().ttt_length
        assert all(1.0 <= t <= d + 1 for d, t in enumerate(r["replayed_acceptance_length"], 1))
    assert any("replayed" in line for line in lines)
    assert res.validation[0]["simulated_acceptance_length"] > res.validation[-1]["simulated_acceptance_length"]
    first = res.validation[0]["step"]
    assert res.exported_step == first < res.steps
    weights, record = load_best(fx["store"], "runs/best")
    assert record["step"] == first
    for n, p in draft.named_parameters():
        if p.requires_grad:
            assert torch.equal(weights[n], p.detach()), n
    assert any(line.startswith("held-out after epoch 0") and "(best)" in line for line in lines)
    assert any("exporting the best held-out epoch" in line for line in lines)

    calls["validation"] = 0
    last, _ = make_draft(fx)
    res_last = train(TrainConfig(**cfg, export_checkpoint="last"), offline_source(fx), last, head, fx["t2d"],
                     fx["store"], "runs/last", log=lambda _: None, resume=False, loss_fn=loss_fn)
    assert res_last.exported_step == res_last.steps
    assert any(not torch.equal(weights[n], p.detach()) for n, p in last.named_parameters() if p.requires_grad)
    # held-out acc comes from rows the run never trained on, each epoch
    assert res_last.validation[0]["tokens"] == res.validation[0]["tokens"] > 0


class PoisonedSource:
    """The offline source with NaN written into one aux layer of one document of the first batch."""

    def __init__(self, base, document: int):
        self.base, self.document = base, document

    def __getattr__(self, name):
        return getattr(self.base, name)

    def batches(self, max_tokens, *, epoch, seed, rank=0, world_size=1, skip=0):
        for i, b in enumerate(self.base.batches(max_tokens, epoch=epoch, seed=seed, rank=rank,
                                                world_size=world_size, skip=skip)):
            if epoch == 0 and skip + i == 0:
                s = int(b["cu_seqlens"][self.document])
                b["aux"][s + 1, 64:128] = float("nan")  # aux slot 1 of one token
            yield b


def test_nonfinite_features_are_named_not_blamed_on_the_lr(fx):
    draft, head = make_draft(fx)
    src = PoisonedSource(offline_source(fx), document=1)
    cfg = TrainConfig(lr=3e-3, epochs=1, max_tokens_per_batch=256, warmup_steps=1, validation_rows=0)
    with pytest.raises(FloatingPointError) as err:
        train(cfg, src, draft, head, fx["t2d"], fx["store"], "runs/nan", log=lambda _: None, resume=False)
    msg = str(err.value)
    assert "input features are not finite" in msg and "aux (aux layer slot 1)" in msg
    assert "document(s) [1]" in msg and "micro-batch 0" in msg and "lower lr" not in msg
    # the row is named by its part and sequence index
    p, seqs = offline_source(fx).plan(256, 0, 0)[0]
    assert f"document 1 = {offline_source(fx).parts[p].key} sequence {int(seqs[1])}" in msg


def test_nonfinite_loss_with_finite_features_points_at_the_lr(fx):
    from training.eagle3.loss import ttt_forward

    def exploding(model, batch, head, t2d, **kw):
        out = ttt_forward(model, batch, head, t2d, **kw)
        out.loss = out.loss * float("inf")
        return out

    draft, head = make_draft(fx)
    cfg = TrainConfig(lr=3e-3, epochs=1, max_tokens_per_batch=256, warmup_steps=1, validation_rows=0)
    with pytest.raises(FloatingPointError, match="finite input features; resume from the last checkpoint with a lower lr"):
        train(cfg, offline_source(fx), draft, head, fx["t2d"], fx["store"], "runs/inf", log=lambda _: None,
              resume=False, loss_fn=exploding)


def test_nonfinite_inputs_reports_each_tensor():
    from training.trainer import nonfinite_inputs

    batch = {"aux": torch.zeros(6, 12), "last": torch.zeros(6, 4), "cu_seqlens": torch.tensor([0, 2, 6])}
    assert nonfinite_inputs(batch) == []
    batch["aux"][3, 0] = float("inf")
    batch["last"][0, 1] = float("nan")
    batch["last"][5, 2] = float("nan")
    found = nonfinite_inputs(batch)
    assert found == [
        {"tensor": "aux (aux layer slot 0)", "values": 1, "tokens": 1, "documents": [1], "first_position": 3},
        {"tensor": "last", "values": 2, "tokens": 2, "documents": [0, 1], "first_position": 0},
    ]
    assert np.isfinite(batch["aux"][:, 4:].numpy()).all()
