"""EAGLE-3 draft: one Llama decoder layer over [embedding(x_{t+1}) ; fc(aux_t)], as vLLM serves it.

Parameter names equal the serving export's tensor names (DESIGN.md, "Draft serving export"):
fc, midlayer.{input_layernorm, hidden_norm, self_attn.{q,k,v,o}_proj, post_attention_layernorm,
mlp.{gate,up,down}_proj}, norm, lm_head, plus the frozen embed_tokens copied from the target.

The layer computes exactly what vLLM's LlamaForCausalLMEagle3 computes:
    residual = h                                   (h = fc(aux) at step 0, else the previous output)
    x = cat(input_layernorm(embed), hidden_norm(h))            [n, 2H]
    r = o_proj(attn(x)) + residual;  out = mlp(post_attention_layernorm(r)) + r
    logits = lm_head(norm(out)) (draft vocab);  out (pre-norm) is the hidden fed to the next step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from training.eagle3.attention import PackedDocs, block_causal_mask, doc_layout, ttt_attention
from training.aux_layers import check_servable, default_aux_layer_ids, hf_ids_from_export
from training.targets.config import TargetFacts, rope_from_config, text_config  # noqa: F401  (one parser)

_ACT = {"silu": F.silu, "gelu": F.gelu, "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh")}


@dataclass
class DraftConfig:
    hidden_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None
    max_position_embeddings: int
    target_vocab_size: int
    draft_vocab_size: int
    aux_layer_ids: tuple[int, ...]
    hidden_act: str = "silu"
    # The target's width H_t: fc fuses 3 x H_t aux states into the draft's hidden_size. None: the
    # same as hidden_size (the EAGLE-3 convention; both engines read `target_hidden_size`).
    target_hidden_size: int | None = None

    def __post_init__(self):
        self.aux_layer_ids = tuple(int(i) for i in self.aux_layer_ids)
        self.target_hidden_size = int(self.target_hidden_size or self.hidden_size)
        if self.hidden_size == 3 * self.target_hidden_size:
            # SGLang (llama_eagle3.py) applies fc when the input is not the draft's width, as `step` does
            raise ValueError(f"a draft of exactly 3 x the target's width ({self.hidden_size}) cannot tell the "
                             "fused aux states from its own hidden state; pick another hidden_size")
        if len(self.aux_layer_ids) != 3:
            raise ValueError(f"EAGLE-3 fuses exactly 3 aux layers, got {self.aux_layer_ids}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError("num_attention_heads must be a multiple of num_key_value_heads")
        if self.hidden_act not in _ACT:
            raise ValueError(f"unsupported hidden_act {self.hidden_act!r}")

    @classmethod
    def from_target_config(
        cls, target_config: dict, draft_vocab_size: int, aux_layer_ids: tuple[int, ...] | None = None,
        intermediate_size: int | None = None, hidden_size: int | None = None,
    ) -> "DraftConfig":
        """The draft for a target, from its HF config dict (read through TargetFacts, the one parser,
        so multimodal `text_config` targets work). Raises AuxLayerError for aux ids vLLM and SGLang
        cannot feed back (training/aux_layers.py). hidden_act stays silu: the draft is a Llama layer,
        and vLLM's and SGLang's LlamaMLP accept only silu, whatever the target's activation.
        intermediate_size: the draft's MLP width, default the target's (the EAGLE-3 convention);
        both engines build the draft's MLP from its own config.json, so any width serves.
        hidden_size: the draft's residual width, default the target's. A wider draft keeps the
        target's head_dim and KV heads (its KV cache pages match the target's, as vLLM's allocator
        wants) and takes proportionally more query heads; it carries its own embedding, the
        target's zero-padded (engines share the target's only when the widths match)."""
        f = TargetFacts.from_config(target_config)
        ids = tuple(aux_layer_ids) if aux_layer_ids else default_aux_layer_ids(f.num_layers)
        width = int(hidden_size or f.hidden_size)
        heads = f.num_attention_heads * width // f.hidden_size
        if width < f.hidden_size or heads * f.hidden_size != f.num_attention_heads * width or heads % f.num_key_value_heads:
            raise ValueError(
                f"draft hidden_size {width} must be at least the target's {f.hidden_size} and give a whole "
                f"number of query heads per KV head ({f.num_attention_heads} heads x {width}/{f.hidden_size} "
                f"over {f.num_key_value_heads} KV heads)")
        return cls(
            hidden_size=width,
            num_attention_heads=heads,
            num_key_value_heads=f.num_key_value_heads,
            head_dim=f.head_dim,
            intermediate_size=int(intermediate_size or f.intermediate_size),
            rms_norm_eps=f.rms_norm_eps,
            rope_theta=f.rope_theta,
            rope_scaling=f.rope_scaling,
            max_position_embeddings=f.max_position_embeddings,
            target_vocab_size=f.vocab_size,
            draft_vocab_size=min(int(draft_vocab_size), f.vocab_size),
            aux_layer_ids=check_servable(ids, f.num_layers, where="draft config"),
            target_hidden_size=f.hidden_size,
        )

    @classmethod
    def from_export_config(cls, config: dict) -> "DraftConfig":
        """Inverse of export.export_config: read a serving config.json back."""
        theta, scaling = rope_from_config(config)
        return cls(
            hidden_size=config["hidden_size"],
            num_attention_heads=config["num_attention_heads"],
            num_key_value_heads=config["num_key_value_heads"],
            head_dim=config["head_dim"],
            intermediate_size=config["intermediate_size"],
            rms_norm_eps=config["rms_norm_eps"],
            rope_theta=theta,
            rope_scaling=scaling,
            max_position_embeddings=config["max_position_embeddings"],
            target_vocab_size=config["vocab_size"],
            draft_vocab_size=config["draft_vocab_size"],
            aux_layer_ids=hf_ids_from_export(config),
            hidden_act=config.get("hidden_act", "silu"),
            target_hidden_size=config.get("target_hidden_size"),
        )

    def rope_parameters(self) -> dict:
        """transformers-5 form: {"rope_type": ..., "rope_theta": ..., scaling keys}."""
        params = dict(self.rope_scaling or {})
        params["rope_type"] = params.pop("rope_type", None) or params.pop("type", "default")
        params.pop("type", None)  # legacy spelling of rope_type
        params["rope_theta"] = self.rope_theta
        return params


def rope_inv_freq(cfg: DraftConfig) -> tuple[torch.Tensor, float]:
    """Inverse frequencies and cos/sin scale for the target's RoPE variant. Scaled variants (llama3,
    yarn, linear, ...) reuse transformers' own formulas so they match the target bit for bit.
    "dynamic" is evaluated once at its base length, i.e. as the target within its original context."""
    params = cfg.rope_parameters()
    if params["rope_type"] == "default":
        d = cfg.head_dim
        return 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float32) / d)), 1.0
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    hf = LlamaConfig(
        hidden_size=cfg.hidden_size,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads,
        head_dim=cfg.head_dim,
        max_position_embeddings=cfg.max_position_embeddings,
        rope_parameters=params,
    )
    inv_freq, scale = ROPE_INIT_FUNCTIONS[params["rope_type"]](hf, None)
    return inv_freq.float(), float(scale)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        # Normalize in fp32 whatever the activation dtype, as HF and vLLM do.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class Attention(nn.Module):
    """Projections only; which keys a query sees is decided by the caller (TTT or KV cache)."""

    def __init__(self, cfg: DraftConfig):
        super().__init__()
        h, d = cfg.hidden_size, cfg.head_dim
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, d
        self.q_proj = nn.Linear(2 * h, cfg.num_attention_heads * d, bias=False)  # input: [embed ; hidden]
        self.k_proj = nn.Linear(2 * h, cfg.num_key_value_heads * d, bias=False)
        self.v_proj = nn.Linear(2 * h, cfg.num_key_value_heads * d, bias=False)
        self.o_proj = nn.Linear(cfg.num_attention_heads * d, h, bias=False)

    def qkv(self, x, cos, sin):
        """x [n, 2H] -> q [1, heads, n, d], k/v [1, kv_heads, n, d], RoPE applied to q and k."""
        n = x.shape[0]
        q = self.q_proj(x).view(n, self.n_heads, self.head_dim).transpose(0, 1).unsqueeze(0)
        k = self.k_proj(x).view(n, self.n_kv, self.head_dim).transpose(0, 1).unsqueeze(0)
        v = self.v_proj(x).view(n, self.n_kv, self.head_dim).transpose(0, 1).unsqueeze(0)
        cos, sin = cos.to(q.dtype), sin.to(q.dtype)
        return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin, v

    def expand_kv(self, x):
        """[1, kv_heads, n, d] -> [1, heads, n, d]: query head i reads kv head i // group (HF repeat_kv)."""
        g = self.n_heads // self.n_kv
        return x if g == 1 else x.repeat_interleave(g, dim=1)

    def out(self, a):
        """[1, heads, n, d] -> [n, H]"""
        return self.o_proj(a.squeeze(0).transpose(0, 1).reshape(a.shape[-2], -1))


class MLP(nn.Module):
    def __init__(self, cfg: DraftConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)
        self.act = _ACT[cfg.hidden_act]

    def forward(self, x):
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class MidLayer(nn.Module):
    def __init__(self, cfg: DraftConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)  # on the token embedding
        self.hidden_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)  # on the fused/previous hidden
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def qkv(self, hidden, embeds, cos, sin):
        """Returns q, k, v and the residual (the un-normed hidden, as vLLM keeps it)."""
        x = torch.cat([self.input_layernorm(embeds), self.hidden_norm(hidden)], dim=-1)
        q, k, v = self.self_attn.qkv(x, cos, sin)
        return q, k, v, hidden

    def finish(self, attn, residual):
        """Attention output [1, heads, n, d] -> the layer's pre-norm output [n, H]."""
        r = self.self_attn.out(attn) + residual
        return self.mlp(self.post_attention_layernorm(r)) + r


@dataclass
class KVCache:
    """Keys (RoPE applied) and values of one sequence for `Eagle3Draft.step`: [1, kv_heads, N, d].
    Entries are in feed order; after a verification rejects drafts, `crop` back to the kept prefix."""

    k: torch.Tensor | None = None
    v: torch.Tensor | None = None

    def __len__(self) -> int:
        return 0 if self.k is None else self.k.shape[-2]

    def crop(self, n: int) -> None:
        if self.k is not None:
            self.k, self.v = self.k[..., :n, :], self.v[..., :n, :]

    def append(self, k, v) -> tuple[torch.Tensor, torch.Tensor]:
        self.k = k if self.k is None else torch.cat([self.k, k], dim=-2)
        self.v = v if self.v is None else torch.cat([self.v, v], dim=-2)
        return self.k, self.v


class Eagle3Draft(nn.Module):
    ttt_layout = "per_doc"  # step-0 TTT attention layout: "per_doc" or "dense" (see ttt_hidden)

    def __init__(self, cfg: DraftConfig, embed_weight: torch.Tensor):
        """embed_weight: the target's input embedding [V, H_t], or a wider draft's own [V, H]."""
        super().__init__()
        h, ht = cfg.hidden_size, cfg.target_hidden_size
        if tuple(embed_weight.shape) not in ((cfg.target_vocab_size, ht), (cfg.target_vocab_size, h)):
            raise ValueError(f"embedding {tuple(embed_weight.shape)} does not match the config")
        self.cfg = cfg
        # The target's own embedding, copied and frozen: the draft must read tokens as the target does.
        # A wider draft pads it with zeros (input_layernorm's gain can use the spare dimensions).
        weight = F.pad(embed_weight.detach().to(torch.float32), (0, h - embed_weight.shape[1]))
        self.embed_tokens = nn.Embedding(cfg.target_vocab_size, h, _weight=weight, _freeze=True)
        self.fc = nn.Linear(3 * ht, h, bias=False)  # fuses the three aux layers
        self.midlayer = MidLayer(cfg)
        self.norm = RMSNorm(h, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(h, cfg.draft_vocab_size, bias=False)
        inv_freq, self.rope_scale = rope_inv_freq(cfg)
        self.register_buffer("inv_freq", inv_freq, persistent=False)  # not a checkpoint tensor
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.02)  # HF's initializer_range

    @torch.no_grad()
    def init_head_from_target(self, target_head: torch.Tensor, t2d: torch.Tensor) -> None:
        """Start lm_head at the target's own head rows of the draft vocab ([Vd, H] of target_head
        [V, H], in draft order = ascending target id), as vLLM speculators does: step 0 then begins
        by reading its output the way the target reads its last hidden state, instead of from noise.
        The norm gain stays at ones (the target's final norm may be offset, e.g. Gemma's 1 + w)."""
        t2d = t2d.to(torch.bool)
        if t2d.numel() != self.cfg.target_vocab_size or int(t2d.sum()) != self.cfg.draft_vocab_size:
            raise ValueError(f"t2d selects {int(t2d.sum())} of {t2d.numel()} ids; the draft has "
                             f"{self.cfg.draft_vocab_size} of {self.cfg.target_vocab_size}")
        rows = target_head.to(self.lm_head.weight.device, torch.float32)[t2d.to(target_head.device)]
        self.lm_head.weight.zero_()[:, : rows.shape[1]].copy_(rows)  # a wider draft: zeros beyond H_t

    def rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [n, head_dim] in fp32 for absolute positions [n]."""
        freqs = positions.float()[:, None] * self.inv_freq[None, :]
        emb = torch.cat([freqs, freqs], dim=-1)
        return emb.cos() * self.rope_scale, emb.sin() * self.rope_scale

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Draft-vocab logits from the layer's pre-norm output."""
        return self.lm_head(self.norm(hidden))

    def ttt_hidden(self, aux, input_ids, cu_seqlens, steps: int) -> list[torch.Tensor]:
        """Training-time test over one packed row. Returns the layer output of steps 0..steps-1;
        step k has T-1-k rows, row t being position t's chain after k+1 draft tokens:
          input  = (fc(aux_t) if k == 0 else step k-1's output at t, embedding of x_{t+1+k}),
          RoPE position = in-document position of t plus k (where vLLM puts the k-th draft token),
          keys   = step-0 keys s <= t of t's document, plus t's own keys of steps 1..k.
        Rows whose inputs run past their document are computed but meaningless (the loss masks them).
        Step-0 attention runs per document (padded groups of similar length, `ttt_layout` "per_doc"),
        so a row of many short documents costs sum_d L_d^2, not T^2; "dense" is the former
        whole-row [T, T] mask, kept as a reference for tests and benchmarks.
        """
        T = input_ids.shape[0]
        doc, pos = doc_layout(cu_seqlens, T)
        ids = input_ids.to(torch.long)
        attn = self.midlayer.self_attn
        scale = 1.0 / math.sqrt(attn.head_dim)
        if self.ttt_layout not in ("per_doc", "dense"):
            raise ValueError(f"ttt_layout must be 'per_doc' or 'dense', not {self.ttt_layout!r}")
        rows = PackedDocs.from_cu_seqlens(cu_seqlens, T).truncate(T - 1)  # per-document layout
        dense = block_causal_mask(doc[: T - 1]) if self.ttt_layout == "dense" else None
        h = self.fc(aux[: T - 1].to(self.fc.weight.dtype))
        k0 = v0 = None
        diag_k, diag_v, outs = [], [], []
        for k in range(steps):
            n = T - 1 - k
            if n <= 0:
                break
            cos, sin = self.rope(pos[:n] + k)
            q, kk, vv, res = self.midlayer.qkv(h[:n], self.embed_tokens(ids[1 + k : 1 + k + n]), cos, sin)
            kk, vv = attn.expand_kv(kk), attn.expand_kv(vv)
            if k == 0:
                k0, v0 = kk, vv
            else:
                diag_k.append(kk)
                diag_v.append(vv)
            a = ttt_attention(
                q,
                k0[..., :n, :],
                v0[..., :n, :],
                rows.truncate(n) if dense is None else dense[:n, :n],  # step k: last k tokens dropped
                [x[..., :n, :] for x in diag_k],
                [x[..., :n, :] for x in diag_v],
                scale,
            )
            h = self.midlayer.finish(a, res)
            outs.append(h)
        return outs

    def _head_loss(self, hidden, target_p, valid):
        logits = self.logits(hidden).float()
        ce = -(target_p * F.log_softmax(logits, dim=-1)).sum(-1)
        return torch.where(valid, ce, 0.0).sum(), logits.argmax(-1)

    def forward(self, aux, input_ids, cu_seqlens, targets: list[tuple[torch.Tensor, torch.Tensor]]):
        """TTT forward + per-step soft cross-entropy, inside forward so DDP/FSDP wrappers see it.
        targets[k] = (target probabilities [T-1-k, draft_vocab] fp32, valid [T-1-k] bool), aligned
        with ttt_hidden's rows. Returns [(sum of CE over valid rows, draft argmax [T-1-k])] per step.
        The head runs under activation checkpointing: the [n, draft_vocab] logits, the largest
        activation of every step, are recomputed in backward instead of kept for all K steps."""
        out = []
        for h, (p, valid) in zip(self.ttt_hidden(aux, input_ids, cu_seqlens, len(targets)), targets):
            if torch.is_grad_enabled() and h.requires_grad:
                out.append(checkpoint(self._head_loss, h, p, valid, use_reentrant=False))
            else:
                out.append(self._head_loss(h, p, valid))
        return out

    @torch.no_grad()
    def step(self, hidden, input_ids, positions, cache: KVCache | None = None):
        """Inference for n new positions of one sequence (the evaluator's chain drafting).

        hidden [n, 3 H_t] = the target's concatenated aux states (fc is applied), or [n, H] = this
        draft's previous pre-norm output (told apart by width, as SGLang does); input_ids [n] = the
        token after each position (x_{t+1}); positions [n] absolute, as vLLM numbers them (the k-th
        draft token of a chain ending at t sits at t+k). New queries see every cached entry and the
        new ones up to themselves; the cache is extended in place. Returns (draft-vocab logits [n, Vd], output hidden [n, H]);
        map draft ids to target ids with `id + d2t[id]`.
        """
        attn = self.midlayer.self_attn
        if hidden.shape[-1] != self.cfg.hidden_size:  # the target's aux states, fused by fc
            hidden = self.fc(hidden.to(self.fc.weight.dtype))
        positions = torch.as_tensor(positions, device=hidden.device)
        cos, sin = self.rope(positions)
        q, k, v, res = self.midlayer.qkv(hidden, self.embed_tokens(input_ids.to(torch.long)), cos, sin)
        n, past = q.shape[-2], 0 if cache is None else len(cache)
        if cache is not None:
            k, v = cache.append(k, v)
        mask = torch.ones(n, past + n, dtype=torch.bool, device=q.device).tril(diagonal=past)
        a = F.scaled_dot_product_attention(
            q, attn.expand_kv(k), attn.expand_kv(v), attn_mask=mask, scale=1.0 / math.sqrt(attn.head_dim)
        )
        out = self.midlayer.finish(a, res)
        return self.logits(out), out
