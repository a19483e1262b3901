"""Draft config from target configs, RoPE parity with the target, shapes, and the KV-cache step API
reproducing the training-time-test rows (training = inference semantics)."""

from __future__ import annotations

import pytest
import torch

from training.eagle3.model import DraftConfig, KVCache, default_aux_layer_ids
from tests.training.eagle3.helpers import make_draft, pack_features, random_docs, tiny_target


@pytest.fixture(scope="module")
def target():
    return tiny_target()


def test_config_from_target(target):
    _, tc = target
    cfg = DraftConfig.from_target_config(tc, draft_vocab_size=100)
    assert (cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (64, 4, 2, 16)
    assert cfg.aux_layer_ids == (1, 3, 5) == default_aux_layer_ids(6)  # (2, L//2, L-3) would repeat layer 3
    assert (cfg.rope_theta, cfg.rope_scaling) == (50000.0, None)
    assert (cfg.target_vocab_size, cfg.draft_vocab_size) == (256, 100)
    assert DraftConfig.from_target_config(tc, 10_000).draft_vocab_size == 256  # N >= V: identity
    assert DraftConfig.from_target_config(tc, 100, (1, 2, 4)).aux_layer_ids == (1, 2, 4)


def test_config_from_legacy_and_nested_target():
    legacy = {
        "hidden_size": 128,
        "num_attention_heads": 8,
        "intermediate_size": 256,
        "num_hidden_layers": 32,
        "vocab_size": 1000,
        "rope_theta": 1e6,
        "rope_scaling": {"type": "linear", "factor": 2.0},
        "max_position_embeddings": 4096,
    }
    cfg = DraftConfig.from_target_config({"text_config": legacy}, 500)
    assert cfg.head_dim == 16 and cfg.num_key_value_heads == 8
    assert cfg.aux_layer_ids == (2, 16, 29)
    assert cfg.rope_theta == 1e6 and cfg.rope_scaling == {"type": "linear", "factor": 2.0}
    assert cfg.rope_parameters() == {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6}


def test_rope_matches_target_llama3_scaling():
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    rope = {
        "rope_type": "llama3",
        "rope_theta": 500000.0,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,
    }
    model, tc = tiny_target(rope_parameters=rope, layers=4)
    draft, cfg = make_draft(tc, model, 256)
    assert cfg.rope_scaling["rope_type"] == "llama3" and cfg.rope_theta == 500000.0
    pos = torch.arange(0, 300, 7)
    cos, sin = draft.rope(pos)
    ref_cos, ref_sin = LlamaRotaryEmbedding(model.config)(torch.zeros(1, dtype=torch.float32), pos[None])
    torch.testing.assert_close(cos, ref_cos[0])
    torch.testing.assert_close(sin, ref_sin[0])


def test_shapes_and_parameter_names(target):
    model, tc = target
    draft, cfg = make_draft(tc, model, 96)
    batch = pack_features(model, random_docs([9, 14]), cfg.aux_layer_ids)
    outs = draft.ttt_hidden(batch["aux"].to(torch.bfloat16), batch["input_ids"], batch["cu_seqlens"], 3)
    assert [tuple(o.shape) for o in outs] == [(22, 64), (21, 64), (20, 64)]
    assert draft.logits(outs[0]).shape == (22, 96)
    shapes = {n: tuple(p.shape) for n, p in draft.named_parameters()}
    assert shapes["fc.weight"] == (64, 192)
    assert shapes["midlayer.self_attn.q_proj.weight"] == (64, 128)
    assert shapes["midlayer.self_attn.k_proj.weight"] == (32, 128)
    assert shapes["lm_head.weight"] == (96, 64)
    assert shapes["embed_tokens.weight"] == (256, 64)
    assert [n for n, p in draft.named_parameters() if not p.requires_grad] == ["embed_tokens.weight"]
    assert torch.equal(draft.embed_tokens.weight, model.get_input_embeddings().weight)
    assert "inv_freq" not in draft.state_dict()


def test_a_wider_draft_keeps_the_kv_layout_and_pads_the_target_embedding(target):
    """hidden_size above the target's: fc fuses 3 x H_t into H, the query heads scale with the width
    while head_dim and the KV heads stay the target's, and the frozen embedding is the target's
    padded with zeros. Widths the engines cannot serve are refused by name."""
    model, tc = target
    draft, cfg = make_draft(tc, model, 96, hidden_size=128)
    assert (cfg.hidden_size, cfg.target_hidden_size) == (128, 64)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (8, 2, 16)
    shapes = {n: tuple(p.shape) for n, p in draft.named_parameters()}
    assert shapes["fc.weight"] == (128, 192)
    assert shapes["midlayer.self_attn.q_proj.weight"] == (128, 256)
    assert shapes["midlayer.self_attn.k_proj.weight"] == (32, 256)  # the target's KV width
    assert shapes["lm_head.weight"] == (96, 128)
    embed = model.get_input_embeddings().weight
    assert torch.equal(draft.embed_tokens.weight[:, :64], embed)
    assert not draft.embed_tokens.weight[:, 64:].any() and not draft.embed_tokens.weight.requires_grad
    head = torch.randn(256, 64)
    t2d = torch.zeros(256, dtype=torch.bool)
    t2d[::2][:96] = True
    draft.init_head_from_target(head, t2d)
    assert torch.equal(draft.lm_head.weight[:, :64], head[t2d]) and not draft.lm_head.weight[:, 64:].any()
    for bad in (32, 80, 192):  # narrower; 5 query heads over 2 KV heads; 3 x H_t (ambiguous input)
        with pytest.raises(ValueError, match="hidden_size|3 x the target"):
            DraftConfig.from_target_config(tc, 96, hidden_size=bad)


@pytest.mark.parametrize("hidden_size", [None, 128])
def test_step_with_kv_cache_reproduces_ttt_rows(target, hidden_size):
    """Chain drafting with the cache, as vLLM runs it (draft k of a chain ending at t at position
    t+k), gives exactly the TTT rows the loss trains; for a draft wider than its target too."""
    model, tc = target
    draft, cfg = make_draft(tc, model, 256, hidden_size=hidden_size)
    batch = pack_features(model, random_docs([16]), cfg.aux_layer_ids)
    aux, ids, T, K = batch["aux"], batch["input_ids"].long(), 16, 4
    with torch.no_grad():
        ttt = draft.ttt_hidden(aux, ids, batch["cu_seqlens"], K)
    cache = KVCache()
    logits0, h0 = draft.step(aux[: T - 1], ids[1:T], torch.arange(T - 1), cache)
    torch.testing.assert_close(h0, ttt[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits0, draft.logits(ttt[0]).detach(), atol=1e-5, rtol=1e-5)
    for t in (0, 5, 10):
        chain = KVCache(cache.k, cache.v)
        chain.crop(t + 1)  # the target verified x_0..x_{t+1}; keep step-0 entries 0..t
        h = h0[t : t + 1]
        for k in range(1, K):
            if t + 1 + k >= T:
                break
            _, h = draft.step(h, ids[t + 1 + k : t + 2 + k], [t + k], chain)
            torch.testing.assert_close(h, ttt[k][t : t + 1], atol=1e-5, rtol=1e-5)
        assert len(chain) == t + 1 + min(K - 1, T - 2 - t)
