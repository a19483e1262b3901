"""Training-time-test attention without the [L, L*K] score matrix.

At TTT step k a query at position t sees two kinds of keys (DESIGN.md, EAGLE-3 training semantics):
  * the step-0 keys s <= t of its own document (ordinary block-causal attention), and
  * its own keys from steps 1..k (one key per step: the "diagonal").
Concatenating all steps' keys behind one big mask costs O(L * L * K) memory per step. Instead the
step-0 part runs through scaled_dot_product_attention (flash kernels on CPU and GPU) and the
diagonal part is k dot products per query; the two are merged with their log-sum-exps:

    out = (exp(lse0) * o0 + sum_j exp(s_j) v_j) / (exp(lse0) + sum_j exp(s_j))

SDPA does not hand out its log-sum-exp, so `block_causal_lse` computes it in query chunks (no
[heads, L, L] tensor is kept) with a hand-written backward that is itself one SDPA call.
All tensors are [B, heads, L, d]; masks are "allowed" booleans [L, L] shared by batch and heads.
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


def ttt_attention(
    q: torch.Tensor,
    k0: torch.Tensor,
    v0: torch.Tensor,
    allowed: torch.Tensor | None,
    diag_k: list[torch.Tensor],
    diag_v: list[torch.Tensor],
    scale: float,
) -> torch.Tensor:
    """Attention of step-k queries q [B, h, n, d] over step-0 keys k0/v0 [B, h, n, d] (block-causal,
    `allowed` [n, n] or None for one causal document) and the diagonal keys of steps 1..k (lists of
    [B, h, n, d]; query t sees only row t of each). Step 0 passes empty lists."""
    o0 = _sdpa(q, k0, v0, allowed, scale)
    if not diag_k:
        return o0
    lse0 = block_causal_lse(q, k0, allowed, scale)  # [B, h, n] fp32
    qf = q.float()
    diag = [(qf * kj.float()).sum(-1) * scale for kj in diag_k]  # each [B, h, n]
    # Softmax over {step-0 block, step 1, ..., step k}; the step-0 block enters with its lse.
    w = torch.softmax(torch.stack([lse0, *diag]), dim=0)  # [k+1, B, h, n], O(k * n) not O(n^2)
    out = w[0].unsqueeze(-1) * o0.float()
    for j, vj in enumerate(diag_v, start=1):
        out = out + w[j].unsqueeze(-1) * vj.float()
    return out.to(q.dtype)


def naive_ttt_attention(q, k0, v0, allowed, diag_k, diag_v, scale):
    """Reference: every step's keys concatenated behind one explicit [n, n*(k+1)] mask.
    O(n^2 k) memory; for tests only."""
    n = q.shape[-2]
    if allowed is None:
        allowed = torch.ones(n, n, dtype=torch.bool, device=q.device).tril()
    eye = torch.eye(n, dtype=torch.bool, device=q.device)
    mask = torch.cat([allowed] + [eye] * len(diag_k), dim=1)
    keys = torch.cat([k0, *diag_k], dim=-2).float()
    vals = torch.cat([v0, *diag_v], dim=-2).float()
    s = (q.float() @ keys.transpose(-1, -2)) * scale
    p = torch.softmax(s.masked_fill(~mask, float("-inf")), dim=-1)
    return (p @ vals).to(q.dtype)
