"""Held-out metrics: the chain-drafting replay against real greedy decoding."""

from __future__ import annotations

import pytest
import torch

from training.metrics import MetricsWindow, replay_chain


def test_replay_walks_like_a_decoder():
    # One document of 12 tokens; the span [3, 11) is generated. x_3 comes from the prefill, then the
    # pending position p drafts with row p - 1 and moves on by accepted + 1.
    mask = torch.tensor([0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 0])
    run = torch.zeros(11, dtype=torch.long)
    run[2], run[4], run[5], run[6], run[8] = 2, 1, 0, 4, 0
    cu = torch.tensor([0, 12])
    assert replay_chain(run, mask, cu, depth=3) == [2, 0, 3]  # p = 3 -> 6 -> 7 -> 11
    assert replay_chain(run, mask, cu, depth=1) == [1, 1, 1, 0]  # p = 3 -> 5 -> 7 -> 9 -> 10


def test_replay_keeps_documents_and_spans_apart():
    # Two documents packed in one row; the second has two generated spans (two assistant turns).
    mask = torch.tensor([0, 1, 1, 1, 0, 0, 1, 1, 0, 1, 1, 1])
    run = torch.full((11,), 5, dtype=torch.long)
    cu = torch.tensor([0, 4, 12])
    # doc 0: span [1, 4) -> p = 1 uses row 0 and jumps past the span; doc 1: spans [6, 8), [9, 12)
    assert replay_chain(run, mask, cu, depth=7) == [5, 5, 5]
    # A span starting at its document's first token has no row before it in that document.
    mask0 = torch.tensor([0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1])
    assert replay_chain(run, mask0, torch.tensor([0, 4, 12]), depth=2) == [2, 0, 2, 2]  # p = 4: row 3 is doc 0's


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from training.targets import load_target
    from training.targets.tiny import build_tiny_target

    d = build_tiny_target(tmp_path_factory.mktemp("metrics") / "t", num_layers=4, seed=3)
    return load_target(str(d), dtype="float32", device="cpu")


def test_replay_equals_greedy_speculative_decoding(tiny, tmp_path):
    """Train a draft on the target's own greedy continuations, decode the same prompts with chain
    drafting, and replay the draft over the decoded text: every verification accepts the same count
    (the last one aside, which decoding cuts at max_new_tokens)."""
    from tests.training.evaluation.helpers import make_draft
    from training.eagle3.loss import ttt_forward
    from training.evaluation.speculative import DecodeConfig, Eagle3Proposer, TargetRunner, generate
    from training.hidden_states import HiddenStateDataset, write_hidden_states
    from training.storage import ObjectStore

    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(5, 200, (6,), generator=g).tolist() for _ in range(6)]
    draft, d2t, t2d = make_draft(tiny)
    runner = TargetRunner(tiny.model, draft.cfg.aux_layer_ids)
    cfg = DecodeConfig(k=3, temperature=0.0, max_new_tokens=40)
    texts = [generate(runner, p, cfg).tokens for p in prompts]  # the target's greedy continuations
    store = ObjectStore(str(tmp_path / "store"))
    rows = [(p + t, [0] * len(p) + [1] * len(t)) for p, t in zip(prompts, texts)]
    with store.artifact("features", "fp") as w:
        write_hidden_states(tiny, rows, w, max_tokens_per_batch=4096)
    batch = next(HiddenStateDataset(store, [store.manifest("features")]).batches(4096, epoch=0, seed=0))
    head = tiny.model.get_output_embeddings().weight.detach().float()
    opt = torch.optim.AdamW([p for p in draft.parameters() if p.requires_grad], lr=1e-2)
    draft.train()
    for _ in range(60):
        opt.zero_grad()
        ttt_forward(draft, batch, head, t2d, ttt_length=3).loss.backward()
        opt.step()
    draft.eval()

    proposer = Eagle3Proposer(draft, d2t)
    decoded = []
    for p, text in zip(prompts, texts):
        stats = generate(runner, p, cfg, proposer)
        assert stats.tokens == text  # greedy speculative decoding is the target's greedy decoding
        decoded.append(stats.accepted)
    with store.artifact("decoded", "fp") as w:  # the decoded text, each row in its own batch
        write_hidden_states(tiny, rows, w, max_tokens_per_batch=1)
    with torch.no_grad():
        replayed = [replay_chain(ttt_forward(draft, b, head, t2d, ttt_length=3).run_lengths, b["loss_mask"],
                                 b["cu_seqlens"], depth=3)
                    for b in HiddenStateDataset(store, [store.manifest("decoded")]).batches(1, epoch=0, seed=0)]
    by_text = {tuple(p + t): d for p, t, d in zip(prompts, texts, decoded)}
    assert sum(map(sum, decoded)) > 10  # the draft accepts something: the comparison means something
    for b, r in zip(HiddenStateDataset(store, [store.manifest("decoded")]).batches(1, epoch=0, seed=0), replayed):
        d = by_text[tuple(b["input_ids"].tolist())]
        assert r[:-1] == d[:len(r) - 1], (r, d)


def test_window_reports_replayed_tau_only_with_batches():
    class Out:  # the TTTOutput fields MetricsWindow reads
        loss = torch.tensor(1.0)
        step_losses, acc, cond_acc, n_valid, n_cond = [1.0, 1.0], [0.5, 0.5], [0.5, 0.5], [4, 4], [4, 2]
        run_lengths = torch.tensor([0, 2, 0, 1, 0])

    batch = {"loss_mask": torch.tensor([0, 1, 1, 1, 1, 1]), "cu_seqlens": torch.tensor([0, 6])}
    w = MetricsWindow(2)
    w.add(Out(), 6)
    assert "replayed_acceptance_length" not in w.summary(world=1)
    w.add(Out(), 6, batch)
    # depth 1: p = 1 (row 0: 0) -> 2 (row 1: 2, cut to 1) -> 4 (row 3: 1) -> 6; depth 2: p = 1 -> 2 -> 5, the end
    assert w.summary(world=1)["replayed_acceptance_length"] == pytest.approx([5 / 3, 4 / 2])
