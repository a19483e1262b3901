"""TTT loss: alignment and masking against a brute-force restatement of the rules, vocab-map use,
gradient flow, acceptance arithmetic, and a tiny overfit."""

from __future__ import annotations

import pytest
import torch

from training.eagle3.loss import TTTOutput, target_distribution, ttt_forward
from tests.training.eagle3.helpers import make_draft, pack_features, random_docs, tiny_target, vocab_maps

V = 256


@pytest.fixture(scope="module")
def target():
    return tiny_target()


@pytest.fixture(scope="module")
def setup(target):
    model, tc = target
    g = torch.Generator().manual_seed(3)
    docs = random_docs([14, 23, 11])
    masks = [(torch.rand(len(d), generator=g) < 0.7).to(torch.uint8) for d in docs]
    draft, cfg = make_draft(tc, model, 160)
    batch = pack_features(model, docs, cfg.aux_layer_ids, masks)
    full_logits = batch["last"] @ model.lm_head.weight.T
    # A draft vocab holding the argmax of about two thirds of the positions.
    top = full_logits.argmax(-1).unique()
    keep = top[torch.randperm(len(top), generator=g)[: 2 * len(top) // 3]]
    rest = torch.tensor([i for i in range(V) if i not in set(top.tolist())])
    d2t, t2d = vocab_maps(V, torch.cat([keep, rest[: 160 - len(keep)]]))
    return model, draft, batch, full_logits, d2t, t2d


def brute_force(draft, batch, full_logits, d2t, K):
    """Per step: valid rows, mean soft CE, correct rows, straight from the written rules."""
    T = batch["input_ids"].numel()
    cu = batch["cu_seqlens"].tolist()
    doc = [next(i for i in range(len(cu) - 1) if cu[i] <= t < cu[i + 1]) for t in range(T)]
    draft_to_target = torch.arange(d2t.numel()) + d2t  # draft id -> target id
    with torch.no_grad():
        outs = draft.ttt_hidden(batch["aux"], batch["input_ids"], batch["cu_seqlens"], K)
    res = []
    for k, h in enumerate(outs):
        logp = torch.log_softmax(draft.logits(h), -1).detach()
        valid, ces, correct = [], [], []
        for t in range(T - 1 - k):
            u, w = t + 1 + k, t + 2 + k  # target position, predicted token
            ok = (
                w < T
                and doc[w] == doc[t]
                and bool(batch["loss_mask"][w])
                and int(full_logits[u].argmax()) in set(draft_to_target.tolist())
            )
            if not ok:
                continue
            p = torch.softmax(full_logits[u, draft_to_target], -1)
            valid.append(t)
            ces.append(float(-(p * logp[t]).sum().detach()))
            correct.append(int(draft_to_target[logp[t].argmax()]) == int(full_logits[u].argmax()))
        res.append((valid, sum(ces) / max(len(ces), 1), correct))
    return res


def test_target_distribution_uses_draft_vocab_order(setup):
    model, _, batch, full_logits, d2t, t2d = setup
    p, top, in_draft = target_distribution(batch["last"], model.lm_head.weight, t2d)
    ids = torch.arange(d2t.numel()) + d2t
    torch.testing.assert_close(p, torch.softmax(full_logits[:, ids], -1))
    assert torch.equal(in_draft, t2d[full_logits.argmax(-1)])
    assert torch.equal(ids[top][in_draft], full_logits.argmax(-1)[in_draft])


def test_masking_alignment_and_statistics(setup):
    model, draft, batch, full_logits, d2t, t2d = setup
    K = 4
    out = ttt_forward(draft, batch, model.lm_head.weight, t2d, ttt_length=K, step_weight=0.5)
    ref = brute_force(draft, batch, full_logits, d2t, K)
    assert out.n_valid == [len(v) for v, _, _ in ref]
    assert 0 < out.n_valid[0] < batch["input_ids"].numel() - 1  # both kinds of rows are present
    assert out.step_losses == pytest.approx([ce for _, ce, _ in ref], rel=1e-5)
    assert out.acc == pytest.approx([sum(c) / max(len(c), 1) for _, _, c in ref], abs=1e-6)
    total = sum(0.5**k * ce for k, (_, ce, _) in enumerate(ref))
    assert out.loss.item() == pytest.approx(total, rel=1e-5)
    # Conditional acceptance: rows right at every earlier step.
    right = [dict(zip(v, c)) for v, _, c in ref]
    alive = set(range(batch["input_ids"].numel()))
    for k in range(K):
        den = [t for t in right[k] if t in alive]
        num = [t for t in den if right[k][t]]
        assert out.n_cond[k] == len(den)
        assert out.cond_acc[k] == pytest.approx(len(num) / max(len(den), 1), abs=1e-6)
        alive = set(num)


def test_loss_mask_zero_and_argmax_outside_draft_vocab(setup):
    model, draft, batch, full_logits, d2t, t2d = setup
    silent = dict(batch, loss_mask=torch.zeros_like(batch["loss_mask"]))
    out = ttt_forward(draft, silent, model.lm_head.weight, t2d, ttt_length=3)
    assert out.n_valid == [0, 0, 0] and out.loss.item() == 0.0
    out.loss.backward()  # still a graph: zero gradients, no NaN
    assert all(torch.count_nonzero(p.grad) == 0 for p in draft.parameters() if p.requires_grad)
    draft.zero_grad(set_to_none=True)
    # A draft vocab without any of the target's argmax tokens: nothing can be agreed with.
    argmaxes = set(full_logits.argmax(-1).tolist())
    d2t_none, t2d_none = vocab_maps(V, torch.tensor([i for i in range(V) if i not in argmaxes][:160]))
    out = ttt_forward(draft, batch, model.lm_head.weight, t2d_none, ttt_length=3)
    assert out.n_valid == [0, 0, 0]


def test_gradients_reach_trainable_parts_not_embedding(setup):
    model, draft, batch, _, _, t2d = setup
    draft.zero_grad(set_to_none=True)
    ttt_forward(draft, batch, model.lm_head.weight, t2d, ttt_length=3).loss.backward()
    for name, p in draft.named_parameters():
        if name == "embed_tokens.weight":
            assert p.grad is None and not p.requires_grad
        else:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
    draft.zero_grad(set_to_none=True)


def test_short_row_pads_statistics(setup):
    model, draft, _, _, _, t2d = setup
    batch = pack_features(model, random_docs([3]), draft.cfg.aux_layer_ids)
    out = ttt_forward(draft, batch, model.lm_head.weight, t2d, ttt_length=7)
    assert len(out.acc) == len(out.n_valid) == 7 and out.n_valid[2:] == [0] * 5


def test_simulated_acceptance_length():
    out = TTTOutput(torch.tensor(0.0), [0.0] * 3, [0.8, 0.4, 0.1], [0.8, 0.5, 0.25], [10, 10, 10])
    assert out.simulated_acceptance_length() == pytest.approx(1 + 0.8 + 0.4 + 0.1)
    assert TTTOutput(torch.tensor(0.0), [], [], [], []).simulated_acceptance_length() == 1.0


def test_overfit_fixed_batch(target):
    model, tc = target
    docs = random_docs([24, 20], seed=5)
    draft, cfg = make_draft(tc, model, V, seed=1)
    batch = pack_features(model, docs, cfg.aux_layer_ids)
    t2d = torch.ones(V, dtype=torch.bool)
    opt = torch.optim.AdamW([p for p in draft.parameters() if p.requires_grad], lr=3e-3, weight_decay=0.0)
    first = ttt_forward(draft, batch, model.lm_head.weight, t2d, ttt_length=3)
    for _ in range(60):
        out = ttt_forward(draft, batch, model.lm_head.weight, t2d, ttt_length=3)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    last = ttt_forward(draft, batch, model.lm_head.weight, t2d, ttt_length=3)
    assert last.loss.item() < 0.6 * first.loss.item()
    assert last.acc[0] > first.acc[0] + 0.3
    assert last.simulated_acceptance_length() > first.simulated_acceptance_length()
