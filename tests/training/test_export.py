"""Serving export: DESIGN.md's tensor list and config keys, a pure-PyTorch restatement of vLLM's
Eagle-3 loader (every tensor consumed, none missing) and forward, atomic writes, and the
export -> load_draft roundtrip."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from training.eagle3.model import KVCache
from training.export import export_draft, load_draft
from tests.training.eagle3.helpers import make_draft, pack_features, random_docs, tiny_target, vocab_maps

VD = 120  # draft vocab


@pytest.fixture(autouse=True)
def single_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def trained():
    model, tc = tiny_target()
    draft, cfg = make_draft(tc, model, VD)
    with torch.no_grad():  # norms away from 1 so a swapped norm would show
        for name, p in draft.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    d2t, t2d = vocab_maps(256, torch.randperm(256, generator=torch.Generator().manual_seed(0))[:VD])
    return model, tc, draft, cfg, d2t, t2d


def design_tensors(H, nh, nkv, d, inter, V, Vd) -> dict[str, tuple[tuple[int, ...], torch.dtype | None]]:
    """DESIGN.md 'Draft serving export' tensor list; None dtype = the export's float dtype."""
    return {
        "fc.weight": ((H, 3 * H), None),
        "midlayer.input_layernorm.weight": ((H,), None),
        "midlayer.hidden_norm.weight": ((H,), None),
        "midlayer.self_attn.q_proj.weight": ((nh * d, 2 * H), None),
        "midlayer.self_attn.k_proj.weight": ((nkv * d, 2 * H), None),
        "midlayer.self_attn.v_proj.weight": ((nkv * d, 2 * H), None),
        "midlayer.self_attn.o_proj.weight": ((H, nh * d), None),
        "midlayer.post_attention_layernorm.weight": ((H,), None),
        "midlayer.mlp.gate_proj.weight": ((inter, H), None),
        "midlayer.mlp.up_proj.weight": ((inter, H), None),
        "midlayer.mlp.down_proj.weight": ((H, inter), None),
        "norm.weight": ((H,), None),
        "lm_head.weight": ((Vd, H), None),
        "d2t": ((Vd,), torch.int64),
        "t2d": ((V,), torch.bool),
        "embed_tokens.weight": ((V, H), None),  # optional
    }


def read_export(path):
    from safetensors import safe_open

    with safe_open(str(path / "model.safetensors"), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    return json.loads((path / "config.json").read_text()), tensors


@pytest.mark.parametrize("include_embed", [True, False])
def test_export_conformance(trained, tmp_path, include_embed):
    model, tc, draft, cfg, d2t, t2d = trained
    out = export_draft(draft, d2t, t2d, tc, tmp_path / "draft", include_embed=include_embed)
    config, tensors = read_export(out)

    spec = design_tensors(64, 4, 2, 16, 128, 256, VD)
    if not include_embed:
        spec.pop("embed_tokens.weight")
    assert set(tensors) == set(spec)
    for name, (shape, dtype) in spec.items():
        assert tuple(tensors[name].shape) == shape, name
        assert tensors[name].dtype == (dtype or torch.bfloat16), name
    ids = torch.arange(VD) + tensors["d2t"]
    assert torch.equal(ids, tensors["t2d"].nonzero().squeeze(1)) and torch.equal(tensors["t2d"], t2d)

    assert config["architectures"] == ["LlamaForCausalLMEagle3"] and config["model_type"] == "llama"
    # aux ids in each engine's own convention (tests/training/test_aux_layers.py restates both loaders)
    assert config["eagle_aux_hidden_state_layer_ids"] == list(cfg.aux_layer_ids)  # vLLM: HF ids
    eagle = {"eagle_aux_hidden_state_layer_ids": [i - 1 for i in cfg.aux_layer_ids], "use_aux_hidden_state": True}
    assert config["eagle_config"] == eagle  # SGLang: id i = HF hidden_states[i + 1]
    assert config["rope_theta"] == tc["rope_parameters"]["rope_theta"] and config["rope_scaling"] is None
    assert config["rope_parameters"] == tc["rope_parameters"]
    expected = {
        "hidden_size": 64, "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2,
        "head_dim": 16, "intermediate_size": 128, "hidden_act": "silu", "rms_norm_eps": 1e-5,
        "max_position_embeddings": 512, "vocab_size": 256, "draft_vocab_size": VD,
        "target_hidden_size": 64, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    }  # fmt: skip
    assert {k: config[k] for k in expected} == expected
    assert [p.name for p in tmp_path.iterdir()] == ["draft"]  # no temporary left behind


def test_embed_tokens_is_an_option_off_by_default(trained, tmp_path):
    """Default: no embed_tokens.weight (vLLM and SGLang both take the target's); on request it is
    there, and the file grows by exactly its V*H bf16 values."""
    model, tc, draft, cfg, d2t, t2d = trained
    bare = export_draft(draft, d2t, t2d, tc, tmp_path / "bare")
    full = export_draft(draft, d2t, t2d, tc, tmp_path / "full", include_embed=True)
    assert "embed_tokens.weight" not in read_export(bare)[1]
    embed = read_export(full)[1]["embed_tokens.weight"]
    assert torch.equal(embed, model.get_input_embeddings().weight.detach().bfloat16())
    grown = (full / "model.safetensors").stat().st_size - (bare / "model.safetensors").stat().st_size
    V, H = 256, 64
    assert 2 * V * H <= grown < 2 * V * H + 128  # the tensor plus its header entry
    assert read_export(bare)[0] == read_export(full)[0]  # same config.json either way


def test_transformers_reads_the_config(trained, tmp_path):
    """vLLM and SGLang parse config.json through transformers' AutoConfig."""
    from transformers import AutoConfig

    model, tc, draft, cfg, d2t, t2d = trained
    hf = AutoConfig.from_pretrained(export_draft(draft, d2t, t2d, tc, tmp_path / "d"))
    assert hf.architectures == ["LlamaForCausalLMEagle3"] and hf.num_hidden_layers == 1
    assert hf.rope_parameters["rope_theta"] == model.config.rope_parameters["rope_theta"]
    assert hf.draft_vocab_size == VD and hf.eagle_aux_hidden_state_layer_ids == list(cfg.aux_layer_ids)
    assert hf.eagle_config["eagle_aux_hidden_state_layer_ids"] == [i - 1 for i in cfg.aux_layer_ids]


# ---- vLLM's Eagle3LlamaForCausalLM, restated in plain PyTorch (llama_eagle3.py) -----------------


def vllm_params(c: dict) -> dict[str, tuple[int, ...]]:
    H, nh, nkv, d = c["hidden_size"], c["num_attention_heads"], c["num_key_value_heads"], c["head_dim"]
    inter = c["intermediate_size"]
    return {
        "model.embed_tokens.weight": (c["vocab_size"], H),
        "model.layers.0.self_attn.qkv_proj.weight": ((nh + 2 * nkv) * d, 2 * H),
        "model.layers.0.self_attn.o_proj.weight": (H, nh * d),
        "model.layers.0.mlp.gate_up_proj.weight": (2 * inter, H),
        "model.layers.0.mlp.down_proj.weight": (H, inter),
        "model.layers.0.input_layernorm.weight": (H,),
        "model.layers.0.hidden_norm.weight": (H,),
        "model.layers.0.post_attention_layernorm.weight": (H,),
        "model.fc.weight": (H, 3 * c["target_hidden_size"]),
        "model.norm.weight": (H,),
        "lm_head.weight": (c["draft_vocab_size"], H),
        "draft_id_to_target_id": (c["draft_vocab_size"],),
    }


def vllm_load(c: dict, tensors: dict, target_embed: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Eagle3LlamaForCausalLM.load_weights + LlamaModel.load_weights: t2d skipped, d2t renamed,
    everything but lm_head under model., midlayer. -> layers.0., q/k/v and gate/up stacked.
    Fails on any tensor without a destination, any shard written twice, any parameter unfilled.
    A checkpoint without embed_tokens gets the target's (the EAGLE proposer shares it: "Detected
    EAGLE model without its own embed_tokens ... Sharing target model embedding weights")."""
    nh, nkv, d, inter = c["num_attention_heads"], c["num_key_value_heads"], c["head_dim"], c["intermediate_size"]
    shards = {
        ".q_proj": (".qkv_proj", 0, nh * d),
        ".k_proj": (".qkv_proj", nh * d, (nh + nkv) * d),
        ".v_proj": (".qkv_proj", (nh + nkv) * d, (nh + 2 * nkv) * d),
        ".gate_proj": (".gate_up_proj", 0, inter),
        ".up_proj": (".gate_up_proj", inter, 2 * inter),
    }
    shapes = vllm_params(c)
    params = {n: torch.full(s, float("nan")) for n, s in shapes.items()}
    written = {n: torch.zeros(s[0], dtype=torch.bool) for n, s in shapes.items()}
    has_embed = has_d2t = False
    for name, w in tensors.items():
        if "t2d" in name:
            continue
        if "d2t" in name:
            name, has_d2t = name.replace("d2t", "draft_id_to_target_id"), True
        elif "lm_head" not in name:
            name = "model." + name
        has_embed |= "embed_tokens" in name
        name = name.replace("midlayer.", "layers.0.")
        lo, hi = 0, shapes.get(name, (0,))[0]
        for shard, (param, a, b) in shards.items():
            if shard in name:
                name, lo, hi = name.replace(shard, param), a, b
                break
        assert name in params, f"vLLM has no parameter for {name}"
        assert tuple(w.shape) == (hi - lo, *shapes[name][1:]), name
        assert not written[name][lo:hi].any(), f"{name}[{lo}:{hi}] written twice"
        params[name][lo:hi] = w.to(params[name].dtype)
        written[name][lo:hi] = True
    skipped = {n for n, ok in (("model.embed_tokens.weight", has_embed), ("draft_id_to_target_id", has_d2t)) if not ok}
    assert has_d2t, "without d2t vLLM would read draft ids as target ids"
    assert [n for n in params if n not in skipped and not written[n].all()] == []
    params["draft_id_to_target_id"] = params["draft_id_to_target_id"].long()
    if not has_embed:
        assert target_embed is not None, "vLLM shares the target's embedding: pass it"
        params["model.embed_tokens.weight"] = target_embed
    return params


def vllm_forward(c: dict, p: dict, aux, input_ids, positions):
    """One causal prefill of the draft as vLLM computes it; returns target-vocab logits (-inf off
    the draft vocab) and the pre-norm hidden fed to the next draft step."""
    nh, nkv, d = c["num_attention_heads"], c["num_key_value_heads"], c["head_dim"]

    def rms(x, w):
        return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + c["rms_norm_eps"]))

    def rope(x):  # neox style
        inv = 1.0 / (c["rope_theta"] ** (torch.arange(0, d, 2).float() / d))
        f = positions.float()[:, None] * inv
        cos, sin = torch.cat([f, f], -1).cos(), torch.cat([f, f], -1).sin()
        x1, x2 = x.chunk(2, -1)
        return x * cos[:, None] + torch.cat([-x2, x1], -1) * sin[:, None]

    n = aux.shape[0]
    hidden = aux @ p["model.fc.weight"].T  # combine_hidden_states
    residual = hidden  # _norm_after_residual
    x = torch.cat([rms(p["model.embed_tokens.weight"][input_ids], p["model.layers.0.input_layernorm.weight"]),
                   rms(hidden, p["model.layers.0.hidden_norm.weight"])], -1)  # fmt: skip
    q, k, v = (x @ p["model.layers.0.self_attn.qkv_proj.weight"].T).split([nh * d, nkv * d, nkv * d], -1)
    q, k, v = rope(q.view(n, nh, d)), rope(k.view(n, nkv, d)), v.view(n, nkv, d)
    k, v = k.repeat_interleave(nh // nkv, 1), v.repeat_interleave(nh // nkv, 1)
    s = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(d)
    s = s.masked_fill(~torch.ones(n, n, dtype=torch.bool).tril(), float("-inf"))
    layer = {k.removeprefix("model.layers.0."): w for k, w in p.items() if k.startswith("model.layers.0.")}
    a = torch.einsum("hqk,khd->qhd", s.softmax(-1), v).reshape(n, nh * d) @ layer["self_attn.o_proj.weight"].T
    residual = a + residual  # post_attention_layernorm(hidden, residual)
    x = rms(residual, layer["post_attention_layernorm.weight"])
    gate, up = (x @ layer["mlp.gate_up_proj.weight"].T).chunk(2, -1)
    prenorm = (F.silu(gate) * up) @ layer["mlp.down_proj.weight"].T + residual  # norm(hidden, residual)
    draft_logits = rms(prenorm, p["model.norm.weight"]) @ p["lm_head.weight"].T
    targets = torch.arange(c["draft_vocab_size"]) + p["draft_id_to_target_id"]  # compute_logits
    logits = torch.full((n, c["vocab_size"]), float("-inf"))
    logits[:, targets] = draft_logits
    return logits, prenorm


def test_vllm_loader_consumes_every_tensor_and_matches_forward(trained, tmp_path):
    model, tc, draft, cfg, d2t, t2d = trained
    # the default export has no embedding: vLLM shares the target's, which the draft was trained with
    config, tensors = read_export(export_draft(draft, d2t, t2d, tc, tmp_path / "d", dtype=torch.float32))
    assert "embed_tokens.weight" not in tensors
    params = vllm_load(config, tensors, target_embed=model.get_input_embeddings().weight.detach())
    batch = pack_features(model, random_docs([12]), cfg.aux_layer_ids)
    aux, ids = batch["aux"][:11], batch["input_ids"][1:].long()
    logits, prenorm = vllm_forward(config, params, aux, ids, torch.arange(11))
    draft_logits, hidden = draft.step(aux, ids, torch.arange(11), KVCache())
    torch.testing.assert_close(prenorm, hidden, atol=1e-5, rtol=1e-5)
    target_ids = torch.arange(VD) + d2t
    torch.testing.assert_close(logits[:, target_ids], draft_logits, atol=1e-5, rtol=1e-5)
    assert torch.isinf(logits[:, ~t2d]).all()
    # with the optional embedding: every tensor consumed, none missing, the same layer
    config, with_embed = read_export(export_draft(draft, d2t, t2d, tc, tmp_path / "e", dtype=torch.float32,
                                                  include_embed=True))
    own = vllm_load(config, with_embed)
    assert torch.equal(own["model.embed_tokens.weight"], params["model.embed_tokens.weight"])
    with pytest.raises(AssertionError):
        vllm_load(config, {**tensors, "midlayer.self_attn.rotary.weight": torch.zeros(1)})


def test_a_draft_wider_than_its_target_exports_its_own_embedding(trained, tmp_path):
    """hidden_size > target_hidden_size: config.json carries both widths, the export always holds
    the draft's padded embedding (vLLM shares the target's only when the shapes match; SGLang's
    set_embed skips such a draft), and vLLM's loader and forward reproduce draft.step."""
    model, tc, _, _, d2t, t2d = trained
    draft, cfg = make_draft(tc, model, VD, hidden_size=128)
    config, tensors = read_export(export_draft(draft, d2t, t2d, tc, tmp_path / "w", dtype=torch.float32))
    assert (config["hidden_size"], config["target_hidden_size"]) == (128, 64)
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]) == (8, 2, 16)
    assert tensors["embed_tokens.weight"].shape == (256, 128)
    params = vllm_load(config, tensors)  # no target embedding offered: the draft's own is used
    batch = pack_features(model, random_docs([12]), cfg.aux_layer_ids)
    aux, ids = batch["aux"][:11], batch["input_ids"][1:].long()
    logits, prenorm = vllm_forward(config, params, aux, ids, torch.arange(11))
    draft_logits, hidden = draft.step(aux, ids, torch.arange(11), KVCache())
    torch.testing.assert_close(prenorm, hidden, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits[:, torch.arange(VD) + d2t], draft_logits, atol=1e-5, rtol=1e-5)
    again, *_ = load_draft(tmp_path / "w")  # self-contained: no target embedding needed
    torch.testing.assert_close(again.step(aux, ids, torch.arange(11), KVCache())[0], draft_logits)


def test_roundtrip_identical_outputs(trained, tmp_path):
    model, tc, draft, cfg, d2t, t2d = trained
    batch = pack_features(model, random_docs([10, 15]), cfg.aux_layer_ids)
    args = (batch["aux"], batch["input_ids"], batch["cu_seqlens"], 3)
    with torch.no_grad():
        ref = draft.ttt_hidden(*args)
    out = export_draft(draft, d2t, t2d, tc, tmp_path / "fp32", dtype=torch.float32, include_embed=True)
    loaded, d2t2, t2d2, config = load_draft(out)
    assert torch.equal(d2t2, d2t) and torch.equal(t2d2, t2d) and loaded.cfg == cfg
    assert config["draft_vocab_size"] == VD
    with torch.no_grad():
        for a, b in zip(ref, loaded.ttt_hidden(*args)):
            assert torch.equal(a, b)
    # bf16 serving export: same tensors up to rounding
    loaded16, *_ = load_draft(export_draft(draft, d2t, t2d, tc, tmp_path / "bf16", include_embed=True))
    for (n, a), b in zip(draft.state_dict().items(), loaded16.state_dict().values()):
        torch.testing.assert_close(a.bfloat16().float(), b, rtol=0, atol=0, msg=n)
    # without the embedding (the default), the target's is supplied at load time
    bare = export_draft(draft, d2t, t2d, tc, tmp_path / "bare", dtype=torch.float32)
    with pytest.raises(ValueError, match="embed"):
        load_draft(bare)
    loaded_bare, *_ = load_draft(bare, embed_weight=model.get_input_embeddings().weight)
    with torch.no_grad():
        assert torch.equal(ref[2], loaded_bare.ttt_hidden(*args)[2])


def test_atomic_replace_and_failure(trained, tmp_path, monkeypatch):
    import safetensors.torch

    model, tc, draft, cfg, d2t, t2d = trained
    target_dir = tmp_path / "draft"
    export_draft(draft, d2t, t2d, tc, target_dir)
    before = (target_dir / "model.safetensors").read_bytes()
    with pytest.raises(ValueError, match="disagree"):  # inconsistent vocab maps: nothing written
        export_draft(draft, d2t.flip(0), t2d, tc, target_dir)

    def broken(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", broken)
    with pytest.raises(OSError):
        export_draft(draft, d2t, t2d, tc, target_dir)
    assert (target_dir / "model.safetensors").read_bytes() == before  # old export intact
    assert [p.name for p in tmp_path.iterdir()] == ["draft"]
    monkeypatch.undo()
    with torch.no_grad():
        draft.norm.weight.add_(1.0)
    try:
        export_draft(draft, d2t, t2d, tc, target_dir)  # replaces the existing directory
    finally:
        with torch.no_grad():
            draft.norm.weight.sub_(1.0)
    assert (target_dir / "model.safetensors").read_bytes() != before
    assert [p.name for p in tmp_path.iterdir()] == ["draft"]
