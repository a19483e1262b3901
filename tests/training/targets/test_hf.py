"""HF backend on locally built random-weight targets: packed features equal the per-sequence forward."""

import pytest
import torch

from training.targets import BACKENDS, HFTarget, SamplingParams, TargetError, load_target
from training.targets.base import TargetModel, default_aux_layer_ids
from training.targets.tiny import build_tiny_target

ARCHS = ["llama", "qwen3", "qwen3_moe", "mixtral"]
SEQS = [[1, 40, 41, 42, 43, 44], [7, 8], [100, 101, 102, 103, 104, 105, 106, 107, 108], [9]]


@pytest.fixture(scope="module")
def target_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("targets")
    return {arch: build_tiny_target(root / arch, arch, seed=1) for arch in ARCHS}


@pytest.fixture(scope="module")
def llama(target_dirs):
    return load_target(str(target_dirs["llama"]))


def reference(model, seq):
    """The plain per-sequence unpadded forward with every hidden state."""
    with torch.inference_mode():
        return model(torch.tensor([seq]), output_hidden_states=True)


@pytest.mark.parametrize("layout", ["packed", "padded"])
@pytest.mark.parametrize("arch", ARCHS)
def test_packed_features_equal_per_sequence_forward(target_dirs, arch, layout, monkeypatch):
    from training.targets import hf

    monkeypatch.setattr(hf, "_padding_pays", lambda *a: layout == "padded")
    target = load_target(str(target_dirs[arch]), dtype="float32", device="cpu")
    L, H = target.facts.num_layers, target.facts.hidden_size
    ids = (0, 2, L // 2, L - 3, L)  # embeddings, the defaults, and HF's post-norm hidden_states[L]
    feats = target.features(SEQS, ids)
    assert feats["aux"].shape == (sum(map(len, SEQS)), len(ids) * H)
    assert feats["last"].shape == (sum(map(len, SEQS)), H)
    assert feats["cu_seqlens"].tolist() == [0, 6, 8, 17, 18]
    assert feats["cu_seqlens"].dtype == torch.int64
    for k, seq in enumerate(SEQS):
        a, b = feats["cu_seqlens"][k], feats["cu_seqlens"][k + 1]
        out = reference(target.model, seq)
        want = torch.cat([out.hidden_states[i][0] for i in ids], dim=-1)
        torch.testing.assert_close(feats["aux"][a:b], want, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(feats["last"][a:b], out.hidden_states[-1][0], rtol=1e-4, atol=1e-5)
        # lm_head(last) reproduces the target's logits
        torch.testing.assert_close(target.logits(feats["last"][a:b]), out.logits[0], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("packed", [False, True])
def test_forward_batches_cover_every_token_once(packed):
    """Padded batches (sdpa/eager) or one varlen row (flash): every packed row exactly once, the
    token at each valid cell being the one at its row."""
    from training.targets.hf import PAD_WASTE, _forward_batches, _pad_groups

    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(5, 50, (int(n),), generator=g).tolist()
            for n in torch.randint(1, 300, (40,), generator=g)]
    lengths = [len(s) for s in seqs]
    cu = torch.zeros(len(seqs) + 1, dtype=torch.long)
    cu[1:] = torch.tensor(lengths).cumsum(0)
    flat = torch.tensor([t for s in seqs for t in s])
    seen = torch.zeros(flat.numel(), dtype=torch.long)
    batches = list(_forward_batches(seqs, lengths, cu, None if packed else _pad_groups(lengths), device="cpu"))
    for b in batches:
        if packed:  # the one row is the packed output itself
            assert b["rows"] is None and b["valid"] is None and torch.equal(b["input_ids"][0], flat)
            seen += 1
            continue
        assert torch.equal(b["input_ids"][b["valid"]], flat[b["rows"]])
        seen[b["rows"]] += 1
        if not packed:
            assert b["position_ids"] is None and b["valid"].numel() <= (1 + PAD_WASTE) * b["rows"].numel()
    assert seen.eq(1).all()
    assert len(batches) == 1 if packed else 1 < len(batches) < 20


def test_padding_pays_for_many_short_documents_not_for_a_few_long_ones():
    from training.targets.hf import _forward_layout

    short = [90 + (i % 40) for i in range(80)]  # the demo: ~90-token conversations, 8192-token packs
    assert _forward_layout(short, hidden=128, intermediate=384) is not None
    assert _forward_layout([300, 340, 380], hidden=768, intermediate=2048) is None  # chat-length, 110M
    assert _forward_layout(short, hidden=128, intermediate=384, varlen=True) is None  # flash reads packs


def test_default_aux_ids_and_hooks_removed(llama):
    L = llama.facts.num_layers
    assert llama.default_aux_layer_ids() == default_aux_layer_ids(L) == (2, L // 2, L - 3)
    feats = llama.features(SEQS)
    assert feats["aux"].shape[1] == 3 * llama.facts.hidden_size
    layers = llama.model.get_decoder().layers
    assert all(not layer._forward_pre_hooks for layer in layers)


def test_bad_inputs_raise(llama):
    with pytest.raises(TargetError):
        llama.features([[1, 2], []])
    with pytest.raises(TargetError):
        llama.features([[1, 2]], (2, 99))


def test_facts_from_config(llama):
    f = llama.facts
    assert (f.num_layers, f.hidden_size, f.num_attention_heads, f.num_key_value_heads, f.head_dim) == (8, 64, 4, 2, 16)
    assert f.vocab_size == len(llama.tokenizer)
    assert f.rope_theta == 10000.0 and f.rope_scaling is None and f.hidden_act == "silu"
    assert f.config["model_type"] == "llama"
    assert llama.identity.startswith(str(llama.name_or_path)) or "#" in llama.identity


def test_generate_deterministic_per_seed_and_batch_independent(llama):
    convs = [
        [{"role": "user", "content": "hello there"}],
        [{"role": "system", "content": "be brief"}, {"role": "user", "content": "a longer prompt, so others pad"}],
        [{"role": "user", "content": "x"}],
    ]
    params = [SamplingParams(0.0, 1.0, 12), SamplingParams(1.0, 0.9, 12, seed=7), SamplingParams(0.8, 1.0, 9, seed=3)]
    first = llama.generate(convs, params)
    assert llama.generate(convs, params) == first
    assert llama.generate(convs[::-1], params[::-1])[::-1] == first  # other batch order
    assert llama.generate(convs[1:2], params[1:2]) == first[1:2]  # alone in its batch
    other_seed = llama.generate(convs[1:2], [SamplingParams(1.0, 0.9, 12, seed=8)])
    assert other_seed[0].text != first[1].text
    for g, p in zip(first, params):
        assert g.finish_reason in ("stop", "length") and 1 <= g.n_tokens <= p.max_new_tokens
        assert g.finish_reason == "stop" or g.n_tokens == p.max_new_tokens


def test_generate_stops_on_end_of_turn(target_dirs):
    """A target whose head always prefers <|im_end|> stops at once with an empty reply."""
    target = load_target(str(target_dirs["qwen3"]))
    im_end = target.tokenizer.convert_tokens_to_ids("<|im_end|>")
    V = target.facts.vocab_size

    class AlwaysEnd(torch.nn.Module):
        def forward(self, hidden):
            logits = torch.zeros(*hidden.shape[:-1], V)
            logits[..., im_end] = 1.0
            return logits

    target.model.lm_head = AlwaysEnd()
    [gen] = target.generate([[{"role": "user", "content": "hi"}]], [SamplingParams(0.0, 1.0, 5)])
    assert (gen.text, gen.finish_reason, gen.n_tokens) == ("", "stop", 1)


def test_registry_and_options():
    assert set(BACKENDS) >= {"hf", "openai", "vllm"}
    assert all(issubclass(cls, TargetModel) for cls in BACKENDS.values())
    with pytest.raises(TargetError, match="unknown target backend"):
        load_target("x", backend="nope")
    t = load_target("some/model", dtype="bf16", device="cpu")
    assert isinstance(t, HFTarget) and t.dtype == torch.bfloat16 and t.trust_remote_code is False
    assert load_target("some/model", device="cpu").dtype == torch.float32  # auto on CPU
    with pytest.raises(TargetError):
        load_target("some/model", dtype="int3")
