"""The one reader of a target's HF config for its language-model settings.

Everything that needs the target's vocab, sizes, heads, RoPE, norm epsilon or head tying reads
them here (`TargetFacts.from_config` on a config dict, `read_facts` on a model path), so the
draft, its serving export, the vocab map and the backends all agree.

Multimodal checkpoints (Gemma-3, LLaVA, Qwen2-VL, ...) keep the LM's settings under
`text_config`, and often write only the keys that differ from the model class's defaults (a
LLaVA config.json may give `text_config: {model_type: llama, vocab_size: 32064}` and nothing
else). A config whose `model_type` transformers knows is therefore completed with that class's
defaults first, exactly what `from_pretrained` would load, so a key left out means here what it
means in the target itself. Only for a model type transformers does not know do the fallbacks
below apply; MAX_POSITIONS_FALLBACK is the one for max_position_embeddings.

No torch import: the Dagster code location imports training.targets while loading.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# max_position_embeddings when the config has none and its model class gives none: 8192 is the
# value vLLM's Llama layers assume for a config without the key (vllm/model_executor/models/
# llama.py and llama_eagle3.py: getattr(config, "max_position_embeddings", 8192)), so the draft
# and its export match what the engine would assume anyway.
MAX_POSITIONS_FALLBACK = 8192


def complete_config(config: dict[str, Any]) -> dict[str, Any]:
    """`config` with every key its transformers config class defaults (nested text_config too);
    unchanged when transformers does not know its model_type (remote-code models)."""
    model_type = config.get("model_type")
    if not model_type:
        return dict(config)
    try:
        from transformers import AutoConfig

        rest = {k: v for k, v in config.items() if k != "model_type"}
        return AutoConfig.for_model(model_type, **rest).to_dict()
    except (ValueError, KeyError, TypeError, AttributeError):  # unknown model type, or kwargs its class refuses
        return dict(config)


def text_config(config: dict[str, Any]) -> dict[str, Any]:
    """The language model's own settings: `text_config` where a multimodal wrapper nests them."""
    return config.get("text_config") or config


def rope_from_config(config: dict[str, Any]) -> tuple[float, dict | None]:
    """(rope_theta, rope_scaling) from either the transformers-5 `rope_parameters` form or the
    legacy `rope_theta` + `rope_scaling` keys. rope_scaling is None for plain RoPE. A per-layer-type
    form (Gemma 3: sliding/full) gives the full-attention entry: the draft is one full-attention layer."""
    params = config.get("rope_parameters")
    if isinstance(params, dict) and "rope_theta" not in params and "full_attention" in params:
        params = params["full_attention"]
    if isinstance(params, dict) and "rope_theta" in params:
        rest = {k: v for k, v in params.items() if k != "rope_theta"}
        kind = rest.get("rope_type", rest.get("type", "default"))
        return float(params["rope_theta"]), (None if kind == "default" else rest)
    scaling = config.get("rope_scaling")
    if scaling is not None and scaling.get("rope_type", scaling.get("type", "default")) == "default":
        scaling = None
    return float(config.get("rope_theta", 10000.0)), scaling


@dataclass(frozen=True)
class TargetFacts:
    """Architecture facts the draft model and its serving export copy from the target."""

    num_layers: int
    hidden_size: int
    vocab_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict[str, Any] | None
    max_position_embeddings: int
    hidden_act: str
    tie_word_embeddings: bool = True
    config: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)  # the completed HF config

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> TargetFacts:
        """Facts from an HF config dict (config.json as read, or AutoConfig.to_dict()).

        Raises ValueError naming the setting when a required one (hidden_size, num_attention_heads,
        num_hidden_layers, vocab_size) is in neither the config nor its class's defaults."""
        full = complete_config(config)
        text = text_config(full)
        missing = [k for k in ("hidden_size", "num_attention_heads", "num_hidden_layers", "vocab_size") if k not in text]
        if missing:
            where = "text_config" if "text_config" in full else "the config"
            raise ValueError(f"target config has no {missing} in {where} (model_type {full.get('model_type')!r})")
        heads = int(text["num_attention_heads"])
        hidden = int(text["hidden_size"])
        theta, scaling = rope_from_config(text)
        intermediate = text.get("intermediate_size") or text.get("moe_intermediate_size") or 4 * hidden
        # Tying: a multimodal wrapper's own flag decides for its LM head; transformers' default is tied.
        tied = full.get("tie_word_embeddings", text.get("tie_word_embeddings", True))
        return cls(
            num_layers=int(text["num_hidden_layers"]),
            hidden_size=hidden,
            vocab_size=int(text["vocab_size"]),
            num_attention_heads=heads,
            num_key_value_heads=int(text.get("num_key_value_heads") or heads),
            head_dim=int(text.get("head_dim") or hidden // heads),
            intermediate_size=int(intermediate),
            rms_norm_eps=float(text.get("rms_norm_eps") or text.get("layer_norm_eps") or 1e-6),
            rope_theta=theta,
            rope_scaling=dict(scaling) if scaling else None,
            max_position_embeddings=int(text.get("max_position_embeddings") or MAX_POSITIONS_FALLBACK),
            hidden_act=str(text.get("hidden_act") or text.get("hidden_activation") or "silu"),
            tie_word_embeddings=bool(tied),
            config=full,
        )


def read_facts(name_or_path: str, *, revision: str | None = None, trust_remote_code: bool = False) -> TargetFacts:
    """TargetFacts of a local HF directory or hub id (its config.json through AutoConfig)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(name_or_path, revision=revision, trust_remote_code=trust_remote_code)
    return TargetFacts.from_config(config.to_dict())
