"""TTT attention: the LSE-merged form equals an explicit full mask over concatenated keys, values
and gradients; documents never see each other; positions restart per document."""

from __future__ import annotations

import pytest
import torch

import training.eagle3.attention as attention_mod
import training.eagle3.model as model_mod
from training.eagle3.attention import (
    PackedDocs,
    block_causal_lse,
    block_causal_mask,
    doc_layout,
    step0_attention,
    ttt_attention,
)
from tests.training.eagle3.helpers import make_draft, naive_ttt_attention, pack_features, random_docs, tiny_target


@pytest.fixture(scope="module")
def target():
    return tiny_target()


def test_doc_layout_and_mask():
    doc, pos = doc_layout(torch.tensor([0, 3, 5, 9]), 9)
    assert doc.tolist() == [0, 0, 0, 1, 1, 2, 2, 2, 2]
    assert pos.tolist() == [0, 1, 2, 0, 1, 0, 1, 2, 3]
    allowed = block_causal_mask(doc)
    assert allowed[4].tolist() == [False] * 3 + [True, True] + [False] * 4
    assert block_causal_mask(torch.zeros(5, dtype=torch.long)) is None  # one document: plain causal
    with pytest.raises(ValueError):
        doc_layout(torch.tensor([0, 4]), 9)


def test_lse_gradcheck():
    torch.manual_seed(0)
    doc = torch.tensor([0, 0, 0, 0, 1, 1, 1])
    q = torch.randn(1, 2, 7, 4, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, 2, 7, 4, dtype=torch.float64, requires_grad=True)
    for allowed in (block_causal_mask(doc), None):
        assert torch.autograd.gradcheck(lambda a, b: block_causal_lse(a, b, allowed, 0.5), (q, k))


@pytest.mark.parametrize("K", [1, 2, 3, 4])
@pytest.mark.parametrize("docs", [[37], [11, 20, 6]])
def test_merged_attention_equals_full_mask(K, docs):
    torch.manual_seed(K)
    n = sum(docs)
    doc, _ = doc_layout(torch.cumsum(torch.tensor([0, *docs]), 0), n)
    allowed = block_causal_mask(doc)

    def leaves():
        return [torch.randn(1, 4, n, 8, requires_grad=True) for _ in range(2 + 2 * K)]

    ins = leaves()
    ref_ins = [x.detach().clone().requires_grad_(True) for x in ins]
    w = torch.randn(1, 4, n, 8)
    outs = []
    for fn, (q, k0, v0, *rest) in ((ttt_attention, ins[1:]), (naive_ttt_attention, ref_ins[1:])):
        diag_k, diag_v = rest[: K - 1], rest[K - 1 : 2 * K - 2]
        o = fn(q, k0, v0, allowed, diag_k, diag_v, 8**-0.5)
        (o * w).sum().backward()
        outs.append(o)
    torch.testing.assert_close(outs[0], outs[1], atol=1e-5, rtol=1e-5)
    for a, b in zip(ins[1 : 2 * K + 1], ref_ins[1 : 2 * K + 1]):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("K", [1, 2, 3, 4])
def test_model_ttt_equals_naive_reference(target, monkeypatch, K):
    """Whole draft, GQA and RoPE included: efficient path vs the explicit concatenated mask."""
    model, tc = target
    draft, cfg = make_draft(tc, model, 256)
    batch = pack_features(model, random_docs([13, 21, 9]), cfg.aux_layer_ids)
    args = (batch["aux"], batch["input_ids"], batch["cu_seqlens"], K)

    def run():
        draft.zero_grad()
        outs = draft.ttt_hidden(*args)
        torch.manual_seed(7)
        sum((o * torch.randn_like(o)).sum() for o in outs).backward()
        return outs, {n: p.grad.clone() for n, p in draft.named_parameters() if p.grad is not None}

    fast, fast_grads = run()
    monkeypatch.setattr(model_mod, "ttt_attention", naive_ttt_attention)
    ref, ref_grads = run()
    assert len(fast) == K
    for a, b in zip(fast, ref):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert fast_grads.keys() == ref_grads.keys() and "fc.weight" in fast_grads
    for name in fast_grads:
        torch.testing.assert_close(fast_grads[name], ref_grads[name], atol=1e-5, rtol=1e-4, msg=name)


def test_no_cross_document_attention(target):
    model, tc = target
    draft, cfg = make_draft(tc, model, 256)
    docs = random_docs([15, 12])
    batch = pack_features(model, docs, cfg.aux_layer_ids)
    other = pack_features(model, [docs[0], torch.randint(0, 256, (12,))], cfg.aux_layer_ids)
    other["aux"][15:] += 3.0  # and the second document's features, beyond what the tokens change
    K, end1 = 5, 15
    with torch.no_grad():
        a = draft.ttt_hidden(batch["aux"], batch["input_ids"], batch["cu_seqlens"], K)
        b = draft.ttt_hidden(other["aux"], other["input_ids"], other["cu_seqlens"], K)
    for k in range(K):
        rows = end1 - 1 - k  # rows of doc 1 whose inputs x_{t+1+k} are still in doc 1
        torch.testing.assert_close(a[k][:rows], b[k][:rows], atol=1e-6, rtol=0)
        assert not torch.allclose(a[k][end1:], b[k][end1:])  # doc 2 did change


def test_positions_restart_per_document(target):
    """A document packed behind another gives the same outputs as the document alone."""
    model, tc = target
    draft, cfg = make_draft(tc, model, 256)
    docs = random_docs([10, 17])
    packed = pack_features(model, docs, cfg.aux_layer_ids)
    alone = pack_features(model, docs[1:], cfg.aux_layer_ids)
    K, start = 4, 10
    with torch.no_grad():
        a = draft.ttt_hidden(packed["aux"], packed["input_ids"], packed["cu_seqlens"], K)
        b = draft.ttt_hidden(alone["aux"], alone["input_ids"], alone["cu_seqlens"], K)
    for k in range(K):
        rows = 17 - 1 - k
        torch.testing.assert_close(a[k][start : start + rows], b[k][:rows], atol=2e-6, rtol=1e-5)


# Per-document layout (PackedDocs): the step-0 attention of a packed row runs per document in
# padded groups; it must equal the dense block-causal reference exactly, for any mix of lengths.

UNEVEN = [1, 2, 50, 300]


@pytest.fixture(params=["short", "sdpa"])
def kernel(request, monkeypatch):
    """Run each per-document test through both group kernels: the explicit-score one that CPU uses
    for short documents, and SDPA + block_causal_lse (long documents, accelerators)."""
    if request.param == "sdpa":
        monkeypatch.setattr(attention_mod, "FUSED_MAX_LEN", 0)
    else:
        monkeypatch.setattr(attention_mod, "FUSED_CHUNK", 1)  # one document per chunk: chunk edges
    return request.param


def packed(docs):
    n = sum(docs)
    return PackedDocs.from_cu_seqlens(torch.cumsum(torch.tensor([0, *docs]), 0), n), n


def test_packed_docs_layout():
    layout, n = packed([50, 1, 300, 2, 0, 48])  # an empty document too
    doc, _ = doc_layout(torch.cumsum(torch.tensor([0, 50, 1, 300, 2, 0, 48]), 0), n)
    assert torch.equal(layout.mask(), block_causal_mask(doc))
    # Longest first; 50 and 48 share a group, 1 and 2 share one (within the slack), 300 is alone.
    assert [(D, L) for _, D, L in layout.groups] == [(1, 300), (2, 50), (2, 2)]
    assert layout.slots == 300 + 100 + 4 and not layout.identity and not layout.single
    x = torch.randn(1, 3, n, 5)
    parts = layout.split(x)
    assert [tuple(p.shape) for p in parts] == [(1, 3, 300, 5), (2, 3, 50, 5), (2, 3, 2, 5)]
    torch.testing.assert_close(parts[1][1, :, :48], x[0, :, 353:401], rtol=0, atol=0)  # doc of 48
    torch.testing.assert_close(parts[2][1, :, :1], x[0, :, 50:51], rtol=0, atol=0)  # doc of 1, behind the 2
    torch.testing.assert_close(layout.merge(parts), x, rtol=0, atol=0)  # padding dropped on the way back
    xb = torch.randn(2, 3, n, 5)  # batch > 1 folds into the document dimension
    torch.testing.assert_close(layout.merge(layout.split(xb)), xb, rtol=0, atol=0)
    # Truncation (TTT step k drops the last k tokens): whole trailing documents may vanish.
    short = layout.truncate(n - 49)
    assert short.n == n - 49 and [(D, L) for _, D, L in short.groups] == [(1, 300), (1, 50), (2, 1)]
    doc_s, _ = doc_layout(torch.tensor([0, 50, 51, 351, 352]), n - 49)
    assert torch.equal(short.mask(), block_causal_mask(doc_s))
    assert layout.truncate(n) is layout
    # Equal lengths in order: the layout is the packed row itself (no gathers); one document: plain causal.
    eq, _ = packed([25, 25, 25, 25])
    assert eq.identity and len(eq.groups) == 1
    one, _ = packed([0, 37])
    assert one.single
    with pytest.raises(ValueError):
        PackedDocs.from_cu_seqlens(torch.tensor([0, 5, 3, 9]), 9)


@pytest.mark.parametrize("docs", [[1, 2, 9, 20], [20, 2, 1, 9], [24], [6, 6, 6], [7, 0, 9]])
def test_packed_lse_and_attention_gradcheck(docs, kernel):
    """Step-0 output and log-sum-exp through the padded per-document layout (several groups, one
    document, identity layout, an empty document): equal to the dense-mask path, and fp64 gradcheck
    against finite differences (short documents: gradcheck is O(inputs^2))."""
    layout, n = packed(docs)
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, n, 4, dtype=torch.float64, requires_grad=True) for _ in range(3))

    def f(a, b, c):
        return step0_attention(a, b, c, layout, 0.5, need_lse=True)

    for got, want in zip(f(q, k, v), step0_attention(q, k, v, layout.mask(), 0.5, need_lse=True)):
        torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-10)
    assert torch.autograd.gradcheck(f, (q, k, v))


@pytest.mark.parametrize("K", [1, 2, 3, 4])
@pytest.mark.parametrize(
    "docs,batch",
    [(UNEVEN, 1), ([300, 2, 50, 1], 1), ([300], 1), ([11, 20, 6], 1), ([25, 25, 25, 25], 1), (UNEVEN, 2)],
)
def test_packed_attention_equals_full_mask(K, docs, batch, kernel):
    """Per-document layout vs the explicit concatenated-keys reference: outputs and all gradients
    (very unequal lengths in either order, one long document, the identity layout, batch > 1)."""
    torch.manual_seed(K)
    layout, n = packed(docs)
    ins = [torch.randn(batch, 4, n, 8, requires_grad=True) for _ in range(1 + 2 * K)]
    ref_ins = [x.detach().clone().requires_grad_(True) for x in ins]
    w = torch.randn(batch, 4, n, 8)
    outs = []
    for fn, allowed, (q, k0, v0, *rest) in (
        (ttt_attention, layout, ins),
        (naive_ttt_attention, layout.mask(), ref_ins),
    ):
        o = fn(q, k0, v0, allowed, rest[: K - 1], rest[K - 1 :], 8**-0.5)
        (o * w).sum().backward()
        outs.append(o)
    torch.testing.assert_close(outs[0], outs[1], atol=1e-5, rtol=1e-5)
    for a, b in zip(ins, ref_ins):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("docs", [UNEVEN, [300]])
def test_model_packed_layout_equals_naive_and_dense(target, monkeypatch, docs):
    """Whole draft over uneven documents and over one long document, K=4: the per-document layout
    equals the explicit full-mask reference and the former dense [T, T] layout, outputs and grads."""
    model, tc = target
    draft, cfg = make_draft(tc, model, 256)
    batch = pack_features(model, random_docs(docs), cfg.aux_layer_ids)
    args = (batch["aux"], batch["input_ids"], batch["cu_seqlens"], 4)

    def run(layout):
        draft.ttt_layout = layout
        draft.zero_grad()
        outs = draft.ttt_hidden(*args)
        torch.manual_seed(7)
        sum((o * torch.randn_like(o)).sum() for o in outs).backward()
        return outs, {n: p.grad.clone() for n, p in draft.named_parameters() if p.grad is not None}

    fast, fast_grads = run("per_doc")
    dense, dense_grads = run("dense")
    monkeypatch.setattr(model_mod, "ttt_attention", naive_ttt_attention)
    ref, ref_grads = run("per_doc")
    assert len(fast) == 4 and fast_grads.keys() == ref_grads.keys() == dense_grads.keys()
    for other, other_grads in ((ref, ref_grads), (dense, dense_grads)):
        for a, b in zip(fast, other):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
        for name in fast_grads:
            torch.testing.assert_close(fast_grads[name], other_grads[name], atol=1e-5, rtol=1e-4, msg=name)
    draft.ttt_layout = "nonsense"
    with pytest.raises(ValueError):
        draft.ttt_hidden(*args)
