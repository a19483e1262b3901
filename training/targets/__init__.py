"""Target model backends behind one interface (DESIGN.md, "Target backends").

    target = load_target("/models/Qwen3-8B", backend="hf", dtype="bf16")
    feats = target.features([[1, 2, 3], [4, 5]], target.default_aux_layer_ids())
    gens = target.generate([[{"role": "user", "content": "hi"}]], [SamplingParams(0.7, 0.9, 256, seed=1)])

A new backend is one TargetModel subclass and one line in BACKENDS. Importing this package loads
no torch/transformers/vllm: each backend imports them when first used.
"""

from __future__ import annotations

from training.targets.base import (
    Generation,
    SamplingParams,
    TargetError,
    TargetFacts,
    TargetModel,
    default_aux_layer_ids,
)
from training.targets.hf import HFTarget
from training.targets.openai import OpenAIError, OpenAITarget
from training.targets.vllm import VLLMTarget
from training.targets.weights import load_head_weights

BACKENDS: dict[str, type[TargetModel]] = {
    "hf": HFTarget,
    "openai": OpenAITarget,
    "vllm": VLLMTarget,
}


def load_target(name_or_path: str, backend: str = "hf", **kwargs) -> TargetModel:
    """A target model: `name_or_path` is a local HF directory or hub id (a base URL for `openai`)."""
    if backend not in BACKENDS:
        raise TargetError(f"unknown target backend {backend!r}; known: {sorted(BACKENDS)}")
    return BACKENDS[backend](name_or_path, **kwargs)


__all__ = [
    "BACKENDS",
    "Generation",
    "HFTarget",
    "OpenAIError",
    "OpenAITarget",
    "SamplingParams",
    "TargetError",
    "TargetFacts",
    "TargetModel",
    "VLLMTarget",
    "default_aux_layer_ids",
    "load_head_weights",
    "load_target",
]
