"""DFlash block draft: Qwen3-style decoder layers that fill a block of mask tokens in one forward,
reading the target's hidden states as extra keys and values, as vLLM's DFlashQwen3ForCausalLM serves it.

Parameter names equal the serving export's tensor names (DESIGN.md, "DFlash serving export"):
fc, hidden_norm, layers.{i}.{input_layernorm, self_attn.{q,k,v,o}_proj, self_attn.{q,k}_norm,
post_attention_layernorm, mlp.{gate,up,down}_proj}, norm, lm_head, plus the frozen embed_tokens
copied from the target (vLLM shares the target's, so the export leaves it out).

One draft forward, after the target verified up to position p (vLLM's DFlashProposer):
    context c_s = hidden_norm(fc(cat(aux_s)))  for every verified position s <= p (the target's
                  residual stream after each of `aux_layer_ids`), one vector per position, shared by all layers
    block       = [x_{p+1}, MASK, ..., MASK] at positions p+1 .. p+1+k (x_{p+1} the target's own token)
    per layer   x = input_layernorm(h); q, k, v = proj(x) with per-head q_norm/k_norm and RoPE;
                the context adds keys k_norm(k_proj(c_s)) (RoPE at s) and values v_proj(c_s);
                every block token sees all context and all of its block (non-causal);
                h = h + o_proj(attn);  h = h + mlp(post_attention_layernorm(h))
    logits      = lm_head(norm(h)) at block slots 1..k: slot j drafts x_{p+1+j} (draft vocab).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from training.aux_layers import check_dflash_servable, default_dflash_layer_ids
from training.eagle3.attention import doc_layout
from training.eagle3.model import MLP, DraftConfig, Eagle3Draft, RMSNorm, rope_inv_freq, rotate_half
from training.targets.config import TargetFacts, rope_from_config


def mask_token_for(counts) -> int:
    """The mask token: the highest target id among the least frequent in the draft's training tokens
    (vocab_map's counts). vLLM feeds its embedding to every masked slot, so a real token drafted from
    the pending slot must not share it; the rarest id (an unused one where the vocab has them) is
    the one a decoder is least likely to emit."""
    c = torch.as_tensor(counts).reshape(-1)
    if c.numel() == 0:
        raise ValueError("mask_token_for needs the vocab's token counts")
    return int((c == c.min()).nonzero().max())


ANCHOR_CHUNK = 256  # anchors per forward chunk without gradients (bounds the attention scores)


@dataclass
class DFlashConfig:
    hidden_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int
    num_layers: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None
    max_position_embeddings: int
    target_vocab_size: int
    draft_vocab_size: int
    aux_layer_ids: tuple[int, ...]  # HF hidden_states ids fused into the context (training/aux_layers.py)
    mask_token_id: int  # the token id whose (target) embedding fills the block's masked slots
    block_size: int = 8  # trained block: the pending token + block_size - 1 drafts
    hidden_act: str = "silu"

    def __post_init__(self):
        self.aux_layer_ids = tuple(int(i) for i in self.aux_layer_ids)
        if not self.aux_layer_ids:
            raise ValueError("a DFlash draft fuses at least one target layer")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError("num_attention_heads must be a multiple of num_key_value_heads")
        if self.block_size < 2:
            raise ValueError(f"block_size {self.block_size} drafts nothing (it counts the pending token)")
        if not 0 <= self.mask_token_id < self.target_vocab_size:
            raise ValueError(f"mask_token_id {self.mask_token_id} outside the vocab 0..{self.target_vocab_size - 1}")

    @property
    def target_hidden_size(self) -> int:  # the draft is the target's width (vLLM then shares its embedding)
        return self.hidden_size

    rope_parameters = DraftConfig.rope_parameters  # one definition of the flat RoPE form

    @classmethod
    def from_target_config(cls, target_config: dict, draft_vocab_size: int, mask_token_id: int, *,
                           layer_ids=None, num_layers: int = 1, intermediate_size: int | None = None,
                           block_size: int = 8) -> "DFlashConfig":
        """The draft for a target, from its HF config dict (read through TargetFacts, the one parser)."""
        f = TargetFacts.from_config(target_config)
        ids = tuple(layer_ids) if layer_ids else default_dflash_layer_ids(f.num_layers)
        return cls(
            hidden_size=f.hidden_size, num_attention_heads=f.num_attention_heads,
            num_key_value_heads=f.num_key_value_heads, head_dim=f.head_dim,
            intermediate_size=int(intermediate_size or f.intermediate_size), num_layers=int(num_layers),
            rms_norm_eps=f.rms_norm_eps, rope_theta=f.rope_theta, rope_scaling=f.rope_scaling,
            max_position_embeddings=f.max_position_embeddings, target_vocab_size=f.vocab_size,
            draft_vocab_size=min(int(draft_vocab_size), f.vocab_size),
            aux_layer_ids=check_dflash_servable(ids, f.num_layers, where="DFlash draft config"),
            mask_token_id=int(mask_token_id), block_size=int(block_size),
        )

    @classmethod
    def from_export_config(cls, config: dict) -> "DFlashConfig":
        """Inverse of training.dflash.export.export_config."""
        theta, scaling = rope_from_config(config)
        d = config["dflash_config"]
        return cls(
            hidden_size=config["hidden_size"], num_attention_heads=config["num_attention_heads"],
            num_key_value_heads=config["num_key_value_heads"], head_dim=config["head_dim"],
            intermediate_size=config["intermediate_size"], num_layers=config["num_hidden_layers"],
            rms_norm_eps=config["rms_norm_eps"], rope_theta=theta, rope_scaling=scaling,
            max_position_embeddings=config["max_position_embeddings"], target_vocab_size=config["vocab_size"],
            draft_vocab_size=config.get("draft_vocab_size") or config["vocab_size"],
            aux_layer_ids=tuple(int(i) + 1 for i in d["target_layer_ids"]),  # "output of layer i" = HF i+1
            mask_token_id=d["mask_token_id"], block_size=config.get("block_size", 8),
            hidden_act=config.get("hidden_act", "silu"),
        )


class DFlashAttention(nn.Module):
    def __init__(self, cfg: DFlashConfig):
        super().__init__()
        h, d = cfg.hidden_size, cfg.head_dim
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, d
        self.q_proj = nn.Linear(h, self.n_heads * d, bias=False)
        self.k_proj = nn.Linear(h, self.n_kv * d, bias=False)
        self.v_proj = nn.Linear(h, self.n_kv * d, bias=False)
        self.o_proj = nn.Linear(self.n_heads * d, h, bias=False)
        self.q_norm = RMSNorm(d, cfg.rms_norm_eps)  # per head, before RoPE (Qwen3)
        self.k_norm = RMSNorm(d, cfg.rms_norm_eps)

    def _heads(self, x, proj, norm, n, cos, sin):
        """x [N, H] -> [n, N, d]: projected, per-head normed (norm may be None: values), rotated."""
        y = proj(x).view(x.shape[0], n, self.head_dim)
        if norm is None:
            return y.transpose(0, 1)
        y = norm(y).transpose(0, 1)
        return y * cos.to(y.dtype) + rotate_half(y) * sin.to(y.dtype)

    def kv(self, x, cos, sin):
        """Keys [kv, N, d] (RoPE at the rows' positions) and values of rows x [N, H]."""
        return self._heads(x, self.k_proj, self.k_norm, self.n_kv, cos, sin), self._heads(x, self.v_proj, None, self.n_kv, cos, sin)

    def q(self, x, cos, sin):
        return self._heads(x, self.q_proj, self.q_norm, self.n_heads, cos, sin)

    def expand(self, x):
        """[kv, ..., d] -> [heads, ..., d]: query head i reads kv head i // group (HF repeat_kv)."""
        g = self.n_heads // self.n_kv
        return x if g == 1 else x.repeat_interleave(g, dim=0)


class DFlashLayer(nn.Module):
    def __init__(self, cfg: DFlashConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = DFlashAttention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, h, rope_q, ctx_kv, ctx_allowed, block: int):
        """h [A*B, H]: A blocks of B slots. rope_q: (cos, sin) of the slots; ctx_kv: (k, v) [kv, T, d]
        of the context; ctx_allowed [A, T]: which context rows each block sees. Returns the new h."""
        attn = self.self_attn
        x = self.input_layernorm(h)
        q = attn.q(x, *rope_q)                                   # [heads, A*B, d]
        k_b, v_b = (attn.expand(t) for t in attn.kv(x, *rope_q))  # the block's own keys
        k_c, v_c = (attn.expand(t) for t in ctx_kv)
        out = block_attention(q, k_c, v_c, k_b, v_b, ctx_allowed, block, 1.0 / math.sqrt(attn.head_dim))
        h = h + attn.o_proj(out.transpose(0, 1).reshape(h.shape[0], -1))
        return h + self.mlp(self.post_attention_layernorm(h))


def block_attention(q, k_c, v_c, k_b, v_b, ctx_allowed, block: int, scale: float):
    """Softmax over [allowed context ; the query's own block] for every query, without building the
    [A*B, T + A*B] matrix: context scores [h, A*B, T] and in-block scores [h, A, B, B] share one softmax.
    q, k_b, v_b [h, A*B, d]; k_c, v_c [h, T, d]; ctx_allowed [A, T] bool. Returns [h, A*B, d]."""
    h, n, d = q.shape
    a = n // block
    s_c = (q @ k_c.transpose(-1, -2)) * scale
    s_c = s_c.masked_fill(~ctx_allowed.repeat_interleave(block, dim=0), float("-inf"))
    qb, kb, vb = (t.reshape(h, a, block, d) for t in (q, k_b, v_b))
    s_b = ((qb @ kb.transpose(-1, -2)) * scale).reshape(h, n, block)
    p = torch.softmax(torch.cat([s_c, s_b], dim=-1).float(), dim=-1).to(q.dtype)
    p_c, p_b = p[..., : k_c.shape[1]], p[..., k_c.shape[1]:]
    return p_c @ v_c + (p_b.reshape(h, a, block, block) @ vb).reshape(h, n, d)


class DFlashDraft(nn.Module):
    def __init__(self, cfg: DFlashConfig, embed_weight: torch.Tensor):
        """embed_weight: the target's input embedding [V, H] (copied and frozen)."""
        super().__init__()
        if tuple(embed_weight.shape) != (cfg.target_vocab_size, cfg.hidden_size):
            raise ValueError(f"embedding {tuple(embed_weight.shape)} does not match the config")
        self.cfg = cfg
        h = cfg.hidden_size
        self.embed_tokens = nn.Embedding(cfg.target_vocab_size, h, _weight=embed_weight.detach().float(), _freeze=True)
        self.fc = nn.Linear(len(cfg.aux_layer_ids) * h, h, bias=False)  # fuses the target layers
        self.hidden_norm = RMSNorm(h, cfg.rms_norm_eps)
        self.layers = nn.ModuleList(DFlashLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(h, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(h, cfg.draft_vocab_size, bias=False)
        inv_freq, self.rope_scale = rope_inv_freq(cfg)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.02)

    # One definition each, shared with Eagle3Draft (they read cfg, lm_head, inv_freq, rope_scale).
    init_head_from_target = Eagle3Draft.init_head_from_target
    rope = Eagle3Draft.rope

    def context_kv(self, aux: torch.Tensor, positions: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The target's fused layers [T, n*H] at positions [T] -> every layer's context keys (RoPE'd)
        and values [kv, T, d], from one normed context row per position (vLLM's precompute)."""
        ctx = self.hidden_norm(self.fc(aux.to(self.fc.weight.dtype)))
        rope = self.rope(positions)
        return [layer.self_attn.kv(ctx, *rope) for layer in self.layers]

    def blocks(self, ctx_kv, first_ids, first_pos, ctx_allowed, block: int) -> torch.Tensor:
        """A blocks [first_ids[a], MASK x (block-1)] at positions first_pos[a].. over the context
        (context_kv's output, T rows); block a sees the context rows ctx_allowed[a] [A, T]. Returns
        the final pre-norm hidden of every slot [A, block, H]."""
        a, dev = first_ids.numel(), first_ids.device
        ids = torch.full((a, block), self.cfg.mask_token_id, dtype=torch.long, device=dev)
        ids[:, 0] = first_ids
        rope_q = self.rope((first_pos[:, None] + torch.arange(block, device=dev)).reshape(-1))
        h = self.embed_tokens(ids.reshape(-1)).to(self.fc.weight.dtype)
        for layer, kv in zip(self.layers, ctx_kv):
            h = layer(h, rope_q, kv, ctx_allowed, block)
        return h.view(a, block, -1)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.norm(hidden))

    def forward(self, aux, input_ids, cu_seqlens, anchors, targets):
        """Training forward over one packed row: a block at every anchor (training.dflash.loss),
        context = the anchor's document before it. targets[j-1] = (target probabilities [A, Vd],
        valid [A]) of slot j. Returns [(CE summed over slot j's valid anchors, draft argmax [A])] per
        slot; inside forward so DDP sees it. Without gradients the anchors go in chunks."""
        T = input_ids.numel()
        doc, pos = doc_layout(cu_seqlens, T)
        ctx_kv = self.context_kv(aux, pos)
        sums = [torch.zeros((), device=aux.device) for _ in targets]
        tops = [[] for _ in targets]
        step = max(anchors.numel(), 1) if torch.is_grad_enabled() else ANCHOR_CHUNK
        for lo in range(0, anchors.numel(), step):
            a = anchors[lo : lo + step]
            allowed = (doc[None, :] == doc[a][:, None]) & (torch.arange(T, device=a.device)[None, :] < a[:, None])
            h = self.blocks(ctx_kv, input_ids[a], pos[a], allowed, len(targets) + 1)
            for j, (p, valid) in enumerate(targets):
                logits = self.logits(h[:, j + 1]).float()
                ce = -(p[lo : lo + step] * F.log_softmax(logits, dim=-1)).sum(-1)
                sums[j] = sums[j] + torch.where(valid[lo : lo + step], ce, 0.0).sum()
                tops[j].append(logits.argmax(-1))
        empty = torch.zeros(0, dtype=torch.long, device=aux.device)
        return [(s, torch.cat(t) if t else empty) for s, t in zip(sums, tops)]

    @torch.no_grad()
    def extend_context(self, ctx_kv, aux: torch.Tensor, start: int):
        """Inference: the context of positions 0..start-1 (None when empty) plus the target's fused
        layers aux [n, n*H] at positions start..start+n-1, as vLLM inserts verified positions."""
        dev = self.fc.weight.device
        new = self.context_kv(aux.to(dev), torch.arange(start, start + aux.shape[0], device=dev))
        if ctx_kv is None:
            return new
        return [(torch.cat([k0, k1], dim=1), torch.cat([v0, v1], dim=1)) for (k0, v0), (k1, v1) in zip(ctx_kv, new)]

    @torch.no_grad()
    def draft(self, ctx_kv, token: int, k: int) -> torch.Tensor:
        """One draft forward: the context of positions 0..p (extend_context), the pending token
        x_{p+1} and k masks. Returns draft-vocab logits [k, Vd] for x_{p+2} .. x_{p+1+k}."""
        n = ctx_kv[0][0].shape[1]
        dev = self.fc.weight.device
        allowed = torch.ones(1, n, dtype=torch.bool, device=dev)
        h = self.blocks(ctx_kv, torch.tensor([token], device=dev), torch.tensor([n], device=dev), allowed, k + 1)
        return self.logits(h[0, 1:])
