"""One parser of the target's HF config (training/targets/config.py): multimodal configs whose LM
settings live under text_config (Gemma-3, LLaVA) or are flat (Qwen2-VL as released), partial
text configs completed with transformers' class defaults, one documented fallback; and the
places that read these settings (vocab_map, the draft config, the export) reading the same values."""

from __future__ import annotations

import json

import pytest

from training.targets.config import MAX_POSITIONS_FALLBACK, TargetFacts, read_facts

GEMMA3 = {  # Gemma-3 style: the LM under text_config, per-layer-type RoPE, gelu, tied
    "architectures": ["Gemma3ForConditionalGeneration"],
    "model_type": "gemma3",
    "tie_word_embeddings": True,
    "text_config": {
        "model_type": "gemma3_text", "vocab_size": 300, "hidden_size": 32, "intermediate_size": 64,
        "num_hidden_layers": 8, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8,
        "rope_theta": 1e6, "rope_local_base_freq": 1e4, "rope_scaling": {"rope_type": "linear", "factor": 8.0},
        "max_position_embeddings": 1024, "rms_norm_eps": 1e-6, "hidden_activation": "gelu_pytorch_tanh",
    },
    "vision_config": {"model_type": "siglip_vision_model", "hidden_size": 16, "intermediate_size": 32,
                      "num_hidden_layers": 1, "num_attention_heads": 2, "image_size": 28, "patch_size": 14},
}  # fmt: skip

LLAVA = {  # LLaVA style: a partial text_config, the rest is LlamaConfig's defaults
    "architectures": ["LlavaForConditionalGeneration"],
    "model_type": "llava",
    "text_config": {"model_type": "llama", "vocab_size": 320, "hidden_size": 64, "num_attention_heads": 4,
                    "num_hidden_layers": 6, "intermediate_size": 128, "rope_theta": 500000.0},
}

QWEN2_VL = {  # Qwen2-VL as released: LM settings flat at the top, M-RoPE
    "model_type": "qwen2_vl", "vocab_size": 400, "hidden_size": 48, "num_attention_heads": 4,
    "num_key_value_heads": 2, "num_hidden_layers": 5, "intermediate_size": 96, "rope_theta": 1e6,
    "max_position_embeddings": 4096, "rope_scaling": {"type": "mrope", "mrope_section": [2, 1, 1]},
    "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2,
}  # fmt: skip


def write_config(tmp_path, name, config):
    d = tmp_path / name
    d.mkdir()
    (d / "config.json").write_text(json.dumps(config))
    return d


@pytest.mark.parametrize("config,expected", [
    (GEMMA3, dict(vocab_size=300, hidden_size=32, num_layers=8, num_attention_heads=4, num_key_value_heads=2,
                  head_dim=8, intermediate_size=64, rope_theta=1e6, rope_scaling={"rope_type": "linear", "factor": 8.0},
                  max_position_embeddings=1024, rms_norm_eps=1e-6, tie_word_embeddings=True)),
    (LLAVA, dict(vocab_size=320, hidden_size=64, num_layers=6, num_attention_heads=4, num_key_value_heads=4,
                 head_dim=16, intermediate_size=128, rope_theta=5e5, rope_scaling=None,
                 max_position_embeddings=2048, rms_norm_eps=1e-6, tie_word_embeddings=False)),  # LlamaConfig defaults
    (QWEN2_VL, dict(vocab_size=400, hidden_size=48, num_layers=5, num_attention_heads=4, num_key_value_heads=2,
                    head_dim=12, intermediate_size=96, rope_theta=1e6, rope_scaling=None,
                    max_position_embeddings=4096, tie_word_embeddings=False)),  # M-RoPE is plain RoPE on text
], ids=["gemma3", "llava", "qwen2_vl"])
def test_text_settings_of_multimodal_configs(tmp_path, config, expected):
    from_dict = TargetFacts.from_config(json.loads(json.dumps(config)))  # config.json as train_main reads it
    from_dir = read_facts(str(write_config(tmp_path, config["model_type"], config)))  # as AutoConfig loads it
    for facts in (from_dict, from_dir):
        assert {k: getattr(facts, k) for k in expected} == expected


def test_one_fallback_for_max_positions():
    unknown = {"model_type": "not-in-transformers", "vocab_size": 50, "hidden_size": 16,
               "num_attention_heads": 2, "num_hidden_layers": 4}
    assert TargetFacts.from_config(unknown).max_position_embeddings == MAX_POSITIONS_FALLBACK == 8192
    assert TargetFacts.from_config({**unknown, "model_type": None}).max_position_embeddings == 8192
    with pytest.raises(ValueError, match="vocab_size"):
        TargetFacts.from_config({k: v for k, v in unknown.items() if k != "vocab_size"})


def test_draft_and_export_read_the_text_config():
    """The draft config and its export take the LM's values from the Gemma-3 text_config (the
    draft's MLP stays silu: vLLM's and SGLang's LlamaMLP accept nothing else)."""
    from training.eagle3.model import DraftConfig
    from training.export import export_config

    cfg = DraftConfig.from_target_config(json.loads(json.dumps(GEMMA3)), 100)
    assert (cfg.hidden_size, cfg.target_vocab_size, cfg.head_dim, cfg.num_key_value_heads) == (32, 300, 8, 2)
    assert (cfg.rope_theta, cfg.rope_scaling, cfg.max_position_embeddings) == (1e6, {"rope_type": "linear", "factor": 8.0}, 1024)
    assert cfg.aux_layer_ids == (2, 4, 5) and cfg.hidden_act == "silu"
    exported = export_config(cfg, GEMMA3)
    assert (exported["vocab_size"], exported["hidden_size"], exported["max_position_embeddings"]) == (300, 32, 1024)
    assert exported["rope_parameters"] == {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6}  # full attention's
    assert exported["hidden_act"] == "silu" and exported["rms_norm_eps"] == 1e-6
