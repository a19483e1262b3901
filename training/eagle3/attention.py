"""Training-time-test attention without the [L, L*K] score matrix, and without [T, T] over a packed row.

At TTT step k a query at position t sees two kinds of keys (DESIGN.md, EAGLE-3 training semantics):
  * the step-0 keys s <= t of its own document (ordinary block-causal attention), and
  * its own keys from steps 1..k (one key per step: the "diagonal").
Concatenating all steps' keys behind one big mask costs O(L * L * K) memory per step. Instead the
step-0 part runs through scaled_dot_product_attention (flash kernels on CPU and GPU) and the
diagonal part is k dot products per query; the two are merged with their log-sum-exps:

    out = (exp(lse0) * o0 + sum_j exp(s_j) v_j) / (exp(lse0) + sum_j exp(s_j))

SDPA does not hand out its log-sum-exp, so `block_causal_lse` computes it in query chunks (no
[heads, L, L] tensor is kept) with a hand-written backward that is itself one SDPA call.

Packed rows. A training row packs many documents (cu_seqlens). Running the step-0 part over the
whole row behind a [T, T] block-causal mask costs O(T^2) although only sum_d L_d^2 scores are
allowed. `PackedDocs` describes a per-document layout instead: documents are sorted by length and
cut into a few groups of similar length; each group is gathered into a right-padded batch
[documents, heads, longest, d] that runs plain causal SDPA and the causal LSE, and the results are
gathered back to packed order. Right padding is exact under a causal mask: real queries never
reach the padded keys (they sit after every real key of the document), the padded query rows are
dropped, and their gradients are exact zeros. Cost: sum_d L_d^2 (plus bounded padding).

All tensors are [B, heads, L, d]. `allowed` is either a PackedDocs (the efficient layout), an
"allowed" boolean mask [L, L] shared by batch and heads, or None (one causal document).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Query rows per chunk of the log-sum-exp: bounds the transient score block to heads * 256 * L.
LSE_CHUNK = 256


def doc_layout(cu_seqlens: torch.Tensor, total: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Document index and in-document position of every packed token (positions restart at 0)."""
    cu = cu_seqlens.to(torch.long)
    if cu[0] != 0 or cu[-1] != total or bool((cu[1:] < cu[:-1]).any()):
        raise ValueError(f"cu_seqlens {cu.tolist()} does not describe a packed row of {total} tokens")
    lengths = cu[1:] - cu[:-1]
    doc = torch.repeat_interleave(torch.arange(len(lengths), device=cu.device), lengths)
    pos = torch.arange(total, device=cu.device) - cu[:-1][doc]
    return doc, pos


def block_causal_mask(doc: torch.Tensor) -> torch.Tensor | None:
    """allowed[t, s] = s <= t within the same document; None when one document (plain causal)."""
    if doc.numel() == 0 or bool((doc == doc[0]).all()):
        return None
    n = doc.numel()
    causal = torch.ones(n, n, dtype=torch.bool, device=doc.device).tril()
    return causal & (doc[:, None] == doc[None, :])


# Documents share a padded group while the group's longest is at most GROUP_RATIO times their own
# length or GROUP_SLACK tokens longer: padding stays bounded (slots <= 1.25 * tokens + 8 per
# document) and so does the number of groups (a handful of SDPA calls per step).
GROUP_RATIO = 1.25
GROUP_SLACK = 8


class PackedDocs:
    """Per-document padded layout of the first n tokens of a packed row (see the module docstring).

    groups[g] = (first slot, documents, padded length): group g occupies slots
    [first, first + documents * padded length) of the padded layout, one row of `padded length`
    slots per document, real tokens first. gather [slots] is the packed token held by each slot
    (padding slots repeat a token of their own document, so every value is finite); scatter [n] is
    the slot of each packed token. Built on the host from cu_seqlens (one sync per row)."""

    def __init__(self, bounds: list[int], device=None):
        self.bounds = bounds  # document boundaries, bounds[-1] == n (empty documents allowed)
        self.n = n = bounds[-1]
        self.device = device
        starts, lengths = bounds[:-1], [b - a for a, b in zip(bounds[:-1], bounds[1:])]
        order = sorted((i for i, length in enumerate(lengths) if length), key=lambda i: -lengths[i])
        # One causal document spanning the whole row: plain causal attention, no gathers at all.
        self.single = len(order) == 1 and starts[order[0]] == 0
        members: list[list[int]] = []
        for i in order:  # descending lengths: a group's first member is its longest
            top = lengths[members[-1][0]] if members else 0
            if not members or (lengths[i] * GROUP_RATIO < top and top - lengths[i] > GROUP_SLACK):
                members.append([])
            members[-1].append(i)
        groups, slot, base, gather = [], 0, [0] * len(lengths), []
        starts_t, lengths_t = torch.tensor(starts, dtype=torch.long), torch.tensor(lengths, dtype=torch.long)
        for docs in members:
            width = lengths[docs[0]]
            groups.append((slot, len(docs), width))
            idx = torch.tensor(docs)
            st, ln = starts_t[idx, None], lengths_t[idx, None]
            gather.append((st + torch.arange(width)[None, :] % ln).reshape(-1))
            for r, i in enumerate(docs):
                base[i] = slot + r * width
            slot += len(docs) * width
        self.groups = tuple(groups)
        self.slots = slot
        tok = torch.arange(n)
        scatter = tok + torch.repeat_interleave(torch.tensor(base, dtype=torch.long) - starts_t, lengths_t)
        gather_t = torch.cat(gather) if gather else torch.zeros(0, dtype=torch.long)
        # Identity: slots are the packed tokens in order (equal lengths, one group, no padding).
        self.identity = slot == n and torch.equal(gather_t, tok)
        self.gather = gather_t.to(device)
        self.scatter = scatter.to(device)

    @classmethod
    def from_cu_seqlens(cls, cu_seqlens: torch.Tensor, total: int) -> "PackedDocs":
        bounds = [int(b) for b in cu_seqlens.tolist()]
        if not bounds or bounds[0] != 0 or bounds[-1] != total or any(b < a for a, b in zip(bounds, bounds[1:])):
            raise ValueError(f"cu_seqlens {bounds} does not describe a packed row of {total} tokens")
        return cls(bounds, cu_seqlens.device)

    def truncate(self, n: int) -> "PackedDocs":
        """Layout of the first n tokens (TTT step k keeps T-1-k rows: the last documents shrink)."""
        return self if n == self.n else PackedDocs([min(b, n) for b in self.bounds], self.device)

    def mask(self) -> torch.Tensor:
        """The equivalent dense block-causal "allowed" mask [n, n] (references and tests only)."""
        lengths = torch.tensor([b - a for a, b in zip(self.bounds[:-1], self.bounds[1:])], dtype=torch.long)
        doc = torch.repeat_interleave(torch.arange(lengths.numel()), lengths).to(self.device)
        causal = torch.ones(self.n, self.n, dtype=torch.bool, device=self.device).tril()
        return causal & (doc[:, None] == doc[None, :])

    def split(self, x: torch.Tensor) -> list[torch.Tensor]:
        """[B, h, n, c] packed -> per group [B * documents, h, padded length, c] (right-padded)."""
        B, h, _, c = x.shape
        xt = x.transpose(1, 2)  # token-major [B, n, h, c]: the model's q/k/v are laid out this way
        if not self.identity:
            xt = xt.index_select(1, self.gather)
        return [xt.narrow(1, s, D * L).reshape(B * D, L, h, c).transpose(1, 2) for s, D, L in self.groups]

    def merge(self, parts: list[torch.Tensor]) -> torch.Tensor:
        """Inverse of split, padded rows dropped: per group [B * documents, h, L, c] -> [B, h, n, c]."""
        h, c = parts[0].shape[1], parts[0].shape[-1]
        B = parts[0].shape[0] // self.groups[0][1]
        flat = [p.transpose(1, 2).reshape(B, D * L, h, c) for p, (_, D, L) in zip(parts, self.groups)]
        xt = flat[0] if len(flat) == 1 else torch.cat(flat, dim=1)
        if not self.identity:
            xt = xt.index_select(1, self.scatter)
        return xt.transpose(1, 2)


def _sdpa(q, k, v, allowed, scale):
    if allowed is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=scale)


class _BlockCausalLSE(torch.autograd.Function):
    """lse[b, h, t] = logsumexp_s(scale * q_t . k_s) over allowed s, differentiable in q and k.

    d lse_t / d q_t = scale * sum_s p_ts k_s      (attention output with values = keys)
    d lse_t / d k_s = scale * sum_t p_ts q_t      (the value-gradient of that same attention)
    so the backward is one SDPA forward + backward with v = k: no [L, L] tensor survives it.
    """

    @staticmethod
    def forward(ctx, q, k, allowed, scale):
        n = q.shape[-2]
        acc = torch.promote_types(q.dtype, torch.float32)  # fp32 at least (fp64 for gradcheck)
        lse = torch.empty(q.shape[:-1], dtype=acc, device=q.device)
        kt = k.to(acc).transpose(-1, -2)
        with torch.autocast(q.device.type, enabled=False):  # scores in fp32 even under bf16 autocast
            for i in range(0, n, LSE_CHUNK):
                j = min(i + LSE_CHUNK, n)
                s = (q[..., i:j, :].to(acc) @ kt[..., :j]) * scale  # keys past row j-1 are never allowed
                if allowed is None:
                    rows = torch.arange(i, j, device=q.device)[:, None]
                    s.masked_fill_(torch.arange(j, device=q.device)[None, :] > rows, float("-inf"))
                else:
                    s.masked_fill_(~allowed[i:j, :j], float("-inf"))
                lse[..., i:j] = torch.logsumexp(s, dim=-1)
        ctx.save_for_backward(q, k, allowed)
        ctx.scale = scale
        return lse

    @staticmethod
    def backward(ctx, g):
        q, k, allowed = ctx.saved_tensors
        gs = (g * ctx.scale).to(q.dtype).unsqueeze(-1)  # [B, h, L, 1]
        with torch.enable_grad():
            kv = k.detach().clone().requires_grad_(True)  # keys again, this time as values
            pk = _sdpa(q.detach(), k.detach(), kv, allowed, ctx.scale)  # sum_s p_ts k_s
            (dk,) = torch.autograd.grad(pk, kv, gs * q.detach())  # sum_t p_ts g_t q_t
        dq = gs * pk.detach()
        return dq, dk, None, None


def block_causal_lse(q, k, allowed, scale):
    return _BlockCausalLSE.apply(q, k, allowed, scale)


class _ShortCausalAttention(torch.autograd.Function):
    """Causal attention of a batch of short sequences [G, h, L, d] and its log-sum-exp, in one pass.

    Explicit fp32 scores, G-chunked so the transient [g, h, L, L] block stays under FUSED_CHUNK
    elements; nothing of size L^2 is saved (backward recomputes P = exp(s - lse)). The output and
    log-sum-exp gradients share one backward: with D_t = dO_t . O_t and g_t = d loss / d lse_t,
        dS_ts = P_ts (dO_t . v_s - D_t + g_t),  dq = scale dS k,  dk = scale dS^T q,  dv = P^T dO.
    Versus SDPA plus `block_causal_lse` (attention forward, score pass, attention backward, and an
    attention forward+backward for the lse) this is 2 + 5 batched matmuls and two exp passes.
    """

    @staticmethod
    def _scores(q, k, bias, scale, acc):
        """scale * q k^T + causal bias (-inf above the diagonal) [g, h, L, L] in one baddbmm."""
        g, h, L, d = q.shape
        qa = q.to(acc).reshape(g * h, L, d)
        ka = k.to(acc).reshape(g * h, L, d)
        return torch.baddbmm(bias, qa, ka.transpose(-1, -2), alpha=scale).view(g, h, L, L)

    @staticmethod
    def forward(ctx, q, k, v, scale):
        G, h, L, _ = q.shape
        acc = torch.promote_types(q.dtype, torch.float32)  # fp32 at least (fp64 for gradcheck)
        out = torch.empty(*q.shape[:-1], v.shape[-1], dtype=acc, device=q.device)
        lse = torch.empty(q.shape[:-1], dtype=acc, device=q.device)
        bias = torch.full((L, L), float("-inf"), dtype=acc, device=q.device).triu(1)
        rows = max(1, FUSED_CHUNK // (h * L * L))
        with torch.autocast(q.device.type, enabled=False):
            for i in range(0, G, rows):
                j = min(i + rows, G)
                s = _ShortCausalAttention._scores(q[i:j], k[i:j], bias, scale, acc)
                m = s.amax(dim=-1, keepdim=True)  # the diagonal is always allowed: finite
                p = s.sub_(m).exp_()
                total = p.sum(dim=-1, keepdim=True)
                lse[i:j] = (m + total.log()).squeeze(-1)
                torch.matmul(p, v[i:j].to(acc), out=out[i:j])
                out[i:j] /= total  # normalize the [L, d] output, not the [L, L] weights
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.scale = scale
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse = ctx.saved_tensors
        G, h, L, _ = q.shape
        acc, scale = lse.dtype, ctx.scale
        dq = torch.empty(q.shape, dtype=acc, device=q.device)
        dk = torch.empty(k.shape, dtype=acc, device=q.device)
        dv = torch.empty(v.shape, dtype=acc, device=q.device)
        bias = torch.full((L, L), float("-inf"), dtype=acc, device=q.device).triu(1)
        rows = max(1, FUSED_CHUNK // (h * L * L))
        with torch.autocast(q.device.type, enabled=False):
            for i in range(0, G, rows):
                j = min(i + rows, G)
                p = _ShortCausalAttention._scores(q[i:j], k[i:j], bias, scale, acc)
                p.sub_(lse[i:j, ..., None]).exp_()  # P, as in forward
                do = dout[i:j].to(acc)
                torch.matmul(p.transpose(-1, -2), do, out=dv[i:j])
                ds = do @ v[i:j].to(acc).transpose(-1, -2)
                shift = (do * out[i:j].to(acc)).sum(-1, keepdim=True) - dlse[i:j, ..., None].to(acc)
                ds.sub_(shift).mul_(p)  # dS / scale
                torch.matmul(ds, k[i:j].to(acc) * scale, out=dq[i:j])
                torch.matmul(ds.transpose(-1, -2), q[i:j].to(acc) * scale, out=dk[i:j])
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None


# Padded groups whose documents are at most this long run _ShortCausalAttention on CPU: measured
# against SDPA + block_causal_lse (fwd+bwd with the lse gradient, 4 heads of 32, ~4000 tokens per
# call) it is 1.4-2.4x faster at L=100 and 1.05-1.35x at L=512, and even at L=1024. Longer groups
# (one long document stays on the flash kernel's O(L) memory), and every group on accelerators,
# whose flash kernels do well at any length, run SDPA + block_causal_lse.
FUSED_MAX_LEN = 512
FUSED_CHUNK = 1 << 22  # score elements per chunk of _ShortCausalAttention (16 MiB in fp32)


def short_causal_attention(q, k, v, scale):
    """(output [G, h, L, d] in q's dtype, lse [G, h, L] fp32) of causal attention, see above."""
    return _ShortCausalAttention.apply(q, k, v, scale)


def _causal(q, k, v, scale, need_lse):
    """One right-padded group [G, h, L, d]: causal output and (if need_lse) its log-sum-exp."""
    if q.device.type == "cpu" and q.shape[-2] <= FUSED_MAX_LEN:
        o, lse = short_causal_attention(q, k, v, scale)
        return o, (lse if need_lse else None)
    return _sdpa(q, k, v, None, scale), (block_causal_lse(q, k, None, scale) if need_lse else None)


def step0_attention(q, k0, v0, allowed, scale, need_lse: bool):
    """Block-causal attention of q over the step-0 keys, and (if need_lse) its log-sum-exp [B, h, n]
    fp32. `allowed`: PackedDocs (per-document layout), a dense [n, n] mask, or None (one document)."""
    if isinstance(allowed, PackedDocs):
        if allowed.single:
            return _causal(q, k0, v0, scale, need_lse)
        groups = [_causal(a, b, c, scale, need_lse) for a, b, c in zip(*map(allowed.split, (q, k0, v0)))]
        o0 = allowed.merge([o for o, _ in groups])
        return o0, (allowed.merge([lse.unsqueeze(-1) for _, lse in groups]).squeeze(-1) if need_lse else None)
    o0 = _sdpa(q, k0, v0, allowed, scale)
    return o0, (block_causal_lse(q, k0, allowed, scale) if need_lse else None)


def ttt_attention(
    q: torch.Tensor,
    k0: torch.Tensor,
    v0: torch.Tensor,
    allowed: "PackedDocs | torch.Tensor | None",
    diag_k: list[torch.Tensor],
    diag_v: list[torch.Tensor],
    scale: float,
) -> torch.Tensor:
    """Attention of step-k queries q [B, h, n, d] over step-0 keys k0/v0 [B, h, n, d] (block-causal:
    `allowed` a PackedDocs of the n rows, a dense [n, n] mask, or None for one causal document) and
    the diagonal keys of steps 1..k (lists of [B, h, n, d]; query t sees only row t of each).
    Step 0 passes empty lists."""
    o0, lse0 = step0_attention(q, k0, v0, allowed, scale, need_lse=bool(diag_k))
    if not diag_k:
        return o0
    qf = q.float()
    diag = [(qf * kj.float()).sum(-1) * scale for kj in diag_k]  # each [B, h, n]
    # Softmax over {step-0 block, step 1, ..., step k}; the step-0 block enters with its lse.
    w = torch.softmax(torch.stack([lse0, *diag]), dim=0)  # [k+1, B, h, n], O(k * n) not O(n^2)
    out = w[0].unsqueeze(-1) * o0.float()
    for j, vj in enumerate(diag_v, start=1):
        out = out + w[j].unsqueeze(-1) * vj.float()
    return out.to(q.dtype)
