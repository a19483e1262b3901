"""The vLLM backend needs a GPU and vLLM; here we check only what holds without them."""

import importlib.util

import pytest

from training.targets import TargetError, VLLMTarget, load_target
from training.targets.base import SamplingParams

HAVE_VLLM = importlib.util.find_spec("vllm") is not None


def test_registered_and_lazy():
    t = load_target("some/model", backend="vllm", tensor_parallel_size=2)
    assert isinstance(t, VLLMTarget) and t.tensor_parallel_size == 2 and t.trust_remote_code is False
    assert t._llm is None  # no engine until first use


@pytest.mark.skipif(HAVE_VLLM, reason="vLLM installed: the missing-dependency path cannot be exercised")
def test_clear_error_without_vllm():
    t = load_target("some/model", backend="vllm")
    with pytest.raises(TargetError, match=r"specdraft\[gpu\]"):
        t.generate([[{"role": "user", "content": "hi"}]], [SamplingParams()])
    with pytest.raises(TargetError, match="backend='hf'"):
        t.features([[1, 2, 3]], (0,))
