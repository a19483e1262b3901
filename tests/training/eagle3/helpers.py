"""Tiny random-weight Llama target and packed hidden-state rows for the EAGLE-3 tests (no network)."""

from __future__ import annotations

import torch

from training.eagle3.attention import PackedDocs
from training.eagle3.model import DraftConfig, Eagle3Draft


def tiny_target(seed: int = 0, vocab: int = 256, layers: int = 6, rope_parameters: dict | None = None):
    """A 6-layer, H=64 LlamaForCausalLM with GQA (4 heads, 2 kv heads) and its config.json dict."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=512,
        rms_norm_eps=1e-5,
        rope_parameters=rope_parameters or {"rope_type": "default", "rope_theta": 50000.0},
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(cfg).eval()
    # HF's 0.02 init gives near-uniform logits; a larger head makes target argmaxes meaningful.
    with torch.no_grad():
        model.lm_head.weight.mul_(20)
    return model, cfg.to_dict()


@torch.no_grad()
def pack_features(model, docs: list[torch.Tensor], aux_layer_ids, loss_masks=None) -> dict:
    """Run the target per document and pack the hidden-state part fields (DESIGN.md)."""
    aux, last = [], []
    for ids in docs:
        hs = model(ids[None], output_hidden_states=True).hidden_states
        aux.append(torch.cat([hs[i][0] for i in aux_layer_ids], dim=-1))
        last.append(hs[-1][0])
    lengths = torch.tensor([0] + [d.numel() for d in docs])
    if loss_masks is None:
        loss_masks = [torch.ones(d.numel(), dtype=torch.uint8) for d in docs]
    return {
        "aux": torch.cat(aux),
        "last": torch.cat(last),
        "input_ids": torch.cat(docs).to(torch.int32),
        "loss_mask": torch.cat(loss_masks).to(torch.uint8),
        "cu_seqlens": torch.cumsum(lengths, 0).to(torch.int64),
    }


def random_docs(lengths, vocab: int = 256, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g) for n in lengths]


def vocab_maps(target_vocab: int, draft_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """d2t offsets and t2d mask for a sorted set of draft token ids."""
    draft_ids = torch.sort(draft_ids).values
    t2d = torch.zeros(target_vocab, dtype=torch.bool)
    t2d[draft_ids] = True
    d2t = draft_ids - torch.arange(draft_ids.numel())
    return d2t, t2d


def make_draft(target_config: dict, model, draft_vocab: int, seed: int = 0, aux_layer_ids=None, hidden_size=None):
    cfg = DraftConfig.from_target_config(target_config, draft_vocab, aux_layer_ids, hidden_size=hidden_size)
    torch.manual_seed(seed)
    return Eagle3Draft(cfg, model.get_input_embeddings().weight), cfg


def naive_ttt_attention(q, k0, v0, allowed, diag_k, diag_v, scale):
    """Reference for ttt_attention: every step's keys concatenated behind one explicit [n, n*(k+1)]
    mask. O(n^2 k) memory."""
    n = q.shape[-2]
    if isinstance(allowed, PackedDocs):
        allowed = allowed.mask()
    if allowed is None:
        allowed = torch.ones(n, n, dtype=torch.bool, device=q.device).tril()
    eye = torch.eye(n, dtype=torch.bool, device=q.device)
    mask = torch.cat([allowed] + [eye] * len(diag_k), dim=1)
    keys = torch.cat([k0, *diag_k], dim=-2).float()
    vals = torch.cat([v0, *diag_v], dim=-2).float()
    s = (q.float() @ keys.transpose(-1, -2)) * scale
    p = torch.softmax(s.masked_fill(~mask, float("-inf")), dim=-1)
    return (p @ vals).to(q.dtype)
