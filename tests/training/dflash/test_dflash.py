"""DFlash draft: the training forward equals inference drafting, the objective's anchors and slots,
and the export's config.json as vLLM's DFlashQwen3ForCausalLM reads it."""

import json

import pytest
import torch

from training.aux_layers import AuxLayerError, default_dflash_layer_ids, family_layer_ids
from training.dflash.export import export_dflash, is_dflash_export, load_dflash
from training.dflash.loss import anchor_candidates, dflash_forward
from training.dflash.model import DFlashConfig, DFlashDraft, mask_token_for
from training.eagle3.attention import doc_layout

TARGET = {"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 8, "num_attention_heads": 4,
          "num_key_value_heads": 2, "head_dim": 16, "intermediate_size": 128, "vocab_size": 300,
          "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": 512}
V, H = 300, 64


def _draft(layers: int = 2, block: int = 5, draft_vocab: int = 200):
    torch.manual_seed(0)
    cfg = DFlashConfig.from_target_config(TARGET, draft_vocab, mask_token_id=V - 1, num_layers=layers, block_size=block)
    return DFlashDraft(cfg, torch.randn(V, H))


def _batch(T=60, cu=(0, 25, 60), n_aux=5, seed=1):
    g = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(0, V, (T,), generator=g), "aux": torch.randn(T, n_aux * H, generator=g),
            "last": torch.randn(T, H, generator=g), "loss_mask": (torch.rand(T, generator=g) > 0.3).to(torch.uint8),
            "cu_seqlens": torch.tensor(cu)}


def _t2d(n=200):
    t2d = torch.zeros(V, dtype=torch.bool)
    t2d[:n] = True
    return t2d


def test_layer_ids_per_family():
    assert default_dflash_layer_ids(8) == (1, 2, 4, 5, 7)
    assert default_dflash_layer_ids(36) == (1, 9, 18, 26, 35)
    assert family_layer_ids("eagle3", (), 8) == (2, 4, 5)
    assert family_layer_ids("dflash", (), 8) == (1, 2, 4, 5, 7)
    with pytest.raises(AuxLayerError):
        family_layer_ids("dflash", (3, 3), 8)
    with pytest.raises(AuxLayerError):
        family_layer_ids("eagle3", (1, 2, 4, 5, 7), 8)  # EAGLE-3 fuses exactly three
    with pytest.raises(ValueError, match="draft_family"):
        family_layer_ids("medusa", (), 8)


def test_training_forward_equals_inference_draft():
    """A block at anchor a in the packed row drafts what `draft` drafts from a's document prefix."""
    d = _draft().eval()
    b = _batch()
    doc, pos = doc_layout(b["cu_seqlens"], 60)
    with torch.no_grad():
        for a in (26, 40, 58):  # second document: starts at 25
            kv = d.extend_context(None, b["aux"][25:a], 0)
            want = d.draft(kv, int(b["input_ids"][a]), 4)
            allowed = (doc[None, :] == doc[a]) & (torch.arange(60) < a)[None, :]
            h = d.blocks(d.context_kv(b["aux"], pos), b["input_ids"][[a]], pos[[a]], allowed, 5)
            torch.testing.assert_close(d.logits(h[0, 1:]), want, rtol=1e-5, atol=1e-5)
        # extending the context piece by piece = all at once
        kv2 = d.extend_context(d.extend_context(None, b["aux"][25:30], 0), b["aux"][30:40], 5)
        torch.testing.assert_close(d.draft(kv2, 7, 3), d.draft(d.extend_context(None, b["aux"][25:40], 0), 7, 3))


def test_block_is_non_causal():
    """The pending slot's output changes with the later slots' tokens: every slot sees the whole block."""
    d = _draft(layers=1).eval()
    kv = d.extend_context(None, torch.randn(6, 5 * H), 0)
    with torch.no_grad():
        h1 = d.blocks(kv, torch.tensor([3]), torch.tensor([6]), torch.ones(1, 6, dtype=torch.bool), 3)
        d.cfg.mask_token_id = 5
        h2 = d.blocks(kv, torch.tensor([3]), torch.tensor([6]), torch.ones(1, 6, dtype=torch.bool), 3)
    assert not torch.allclose(h1[0, 0], h2[0, 0])


def test_anchor_candidates_need_context_and_a_learned_next_token():
    doc, _ = doc_layout(torch.tensor([0, 4, 8]), 8)
    mask = torch.tensor([0, 1, 1, 1, 0, 0, 1, 1], dtype=torch.bool)
    # a=0 and a=4 start documents (no context); a=3's next token is in the next document; a=4..5 need mask[a+1]
    assert anchor_candidates(doc, mask).tolist() == [1, 2, 5, 6]


def test_loss_trains_and_counts():
    d = _draft()
    b = _batch()
    out = dflash_forward(d, b, torch.randn(V, H), _t2d(), ttt_length=4)
    out.loss.backward()
    assert torch.isfinite(out.loss) and d.fc.weight.grad is not None and d.embed_tokens.weight.grad is None
    assert len(out.acc) == 4 and out.n_valid[0] >= out.n_valid[3] > 0
    assert out.run_lengths.shape == (59,)
    with pytest.raises(ValueError, match="block"):
        dflash_forward(d, b, torch.randn(V, H), _t2d(), ttt_length=6)


def test_mask_token_is_the_highest_rarest_id():
    assert mask_token_for(torch.tensor([5, 0, 3, 0, 9])) == 3
    assert mask_token_for(torch.tensor([2, 1, 1])) == 2


def test_export_config_and_roundtrip(tmp_path):
    d = _draft(layers=2)
    t2d = _t2d()
    d2t = t2d.nonzero().squeeze(1) - torch.arange(200)
    out = export_dflash(d, d2t, t2d, TARGET, tmp_path / "export", dtype=torch.float32)
    cfg = json.loads((out / "config.json").read_text())
    assert is_dflash_export(out)
    assert cfg["architectures"] == ["DFlashDraftModel"] and cfg["model_type"] == "qwen3"
    assert cfg["dflash_config"] == {"target_layer_ids": [0, 1, 3, 4, 6], "mask_token_id": V - 1, "causal": False}
    assert cfg["num_hidden_layers"] == 2 and cfg["draft_vocab_size"] == 200
    back, d2t2, t2d2, _ = load_dflash(out, d.embed_tokens.weight)
    assert back.cfg == d.cfg and torch.equal(d2t2, d2t) and torch.equal(t2d2, t2d)
    for (n, p), (n2, p2) in zip(d.state_dict().items(), back.state_dict().items()):
        assert n == n2 and torch.equal(p, p2)


def test_job_refuses_what_a_dflash_draft_cannot_be():
    from training.job import TrainJob

    base = dict(store_root="file:///x", run_prefix="r", target={"path": "t"}, vocab_map="v", hidden_states=["h"])
    assert TrainJob(**base, draft_family="dflash", dflash_layers=2).dflash_layers == 2
    for bad in ({"draft_family": "medusa"}, {"draft_family": "dflash", "dflash_layers": 0},
                {"draft_family": "dflash", "draft_hidden_size": 256},
                {"draft_family": "dflash", "export_embed_tokens": True}):
        with pytest.raises(ValueError):
            TrainJob(**base, **bad)
