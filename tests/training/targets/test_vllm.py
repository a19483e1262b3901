"""The vllm backend on real vLLM (the CPU build here, the same code path on a GPU), against the hf backend.

Three engines in all: generation and features in float32 on one VLLMTarget (the CPU build keeps both),
features in bfloat16 on another; a tiny random Llama with head_dim 32 (a size vLLM's CPU attention supports),
stored in bfloat16 as chat models ship, so "auto" meets the config's bf16.
"""

import sys

import pytest
import torch

from training.targets import TargetError, VLLMTarget, load_target
from training.targets.base import SamplingParams, render_prompt

CONVERSATIONS = [
    [{"role": "user", "content": "hello there"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 + 2?"}],
    [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}],
]
SEQUENCES = [[1, 5, 6, 7, 8, 9, 10, 11], list(range(20, 83)), [3]]
AUX = (1, 2, 3)


@pytest.fixture(scope="module")
def target_dir(tmp_path_factory):
    from training.targets.tiny import build_tiny_target

    return build_tiny_target(tmp_path_factory.mktemp("vllm") / "tiny", hidden_size=128, num_heads=4, num_kv_heads=2,
                             num_layers=4, intermediate_size=256, dtype="bfloat16")


@pytest.fixture(scope="module")
def hf(target_dir):
    return load_target(str(target_dir), backend="hf", device="cpu", dtype="float32")


def test_registered_and_lazy():
    t = load_target("some/model", backend="vllm", tensor_parallel_size=2)
    assert isinstance(t, VLLMTarget) and t.tensor_parallel_size == 2 and t.trust_remote_code is False
    assert t._engines == {}  # no engine until first use


def test_device_is_the_builds_platform():
    here = "cuda" if torch.cuda.is_available() else "cpu"
    other = "cpu" if here == "cuda" else "cuda:0"
    assert load_target("some/model", backend="vllm", device=here).device == here  # as the resources pass it
    with pytest.raises(TargetError, match=f"runs on this machine's {here}"):
        load_target("some/model", backend="vllm", device=other)


def test_clear_error_without_vllm(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # what `import vllm` meets where it is not installed
    t = load_target("some/model", backend="vllm")
    with pytest.raises(TargetError, match=r"specdraft\[cpu\]"):
        t.generate([[{"role": "user", "content": "hi"}]], [SamplingParams()])
    with pytest.raises(TargetError, match="backend='hf'"):
        t.features([[1, 2, 3]], (0,))


def test_auto_dtype_is_the_hf_backends_choice_on_the_cpu_build():
    """vLLM's own "auto" takes a bf16 config's bf16, several times slower than fp32 on a CPU without
    bf16 instructions; on its CPU build the engine runs fp32, as the hf backend does there."""
    assert load_target("some/model", backend="vllm").dtype == ("auto" if torch.cuda.is_available() else "float32")
    assert load_target("some/model", backend="vllm", dtype="bf16").dtype == "bfloat16"  # explicit wins, torch's name
    with pytest.raises(ValueError, match="unknown dtype 'fp12'"):
        load_target("some/model", backend="vllm", dtype="fp12")


@pytest.fixture(scope="module")
def vllm_fp32(target_dir):
    # "auto" meets the config's bf16 and runs fp32 on the CPU build (engine_dtype): the fp32 tolerances
    # below hold only for an fp32 engine. A GPU's "auto" is the config's bf16, so it is named there.
    dtype = "float32" if torch.cuda.is_available() else "auto"
    target = load_target(str(target_dir), backend="vllm", dtype=dtype)
    yield target
    target.close()
    assert target._engines == {} and engine_processes() == []  # stopped, not only forgotten


def engine_processes() -> list:
    """vLLM engine processes this test process started and that still run."""
    import psutil

    def cmd(p):
        try:
            return " ".join(p.cmdline())
        except psutil.Error:  # gone meanwhile
            return ""

    return [p for p in psutil.Process().children(recursive=True) if "EngineCore" in cmd(p) and p.status() != "zombie"]


@pytest.mark.slow  # a vLLM engine start: tens of seconds on 2 cores
def test_generation_keeps_the_engines_token_ids_and_equals_hf_greedy(vllm_fp32, hf):
    sampling = [SamplingParams(temperature=0.0, max_new_tokens=12)] * len(CONVERSATIONS)
    served = vllm_fp32.generate(CONVERSATIONS, sampling)
    reference = hf.generate(CONVERSATIONS, sampling)
    for conv, s, r in zip(CONVERSATIONS, served, reference):
        assert s.prompt_token_ids == tuple(render_prompt(hf.tokenizer, conv))  # the prompt tokenization trains on
        assert s.token_ids == r.token_ids and s.finish_reason == r.finish_reason == "length"
        assert s.n_tokens == 12 and hf.tokenizer.decode(list(s.token_ids)) == s.text
    # token-id prompts, no template (resampling's written prompts): the same engine, the same greedy ids
    prompts = [list(render_prompt(hf.tokenizer, conv))[:-2] for conv in CONVERSATIONS]
    for s, r, p in zip(vllm_fp32.complete(prompts, sampling), hf.complete(prompts, sampling), prompts):
        assert s.token_ids == r.token_ids and s.prompt_token_ids == tuple(p) and s.n_tokens == r.n_tokens
    # sampled with a seed: reproducible
    seeded = [SamplingParams(temperature=1.0, max_new_tokens=12, seed=3)]
    assert vllm_fp32.generate(CONVERSATIONS[:1], seeded)[0].token_ids == vllm_fp32.generate(CONVERSATIONS[:1], seeded)[0].token_ids
    # A seeded batch whose prompts exceed one engine step's token budget: with chunked prefill, a
    # partly prefilled request's generator is rewound with set_offset, which CPU generators refuse
    # and the engine died (bench_real_chat's resampling). Every row comes back, each as if alone.
    long = [[{"role": "user", "content": f"story {i}: " + "hello there " * 250}] for i in range(12)]
    params = [SamplingParams(temperature=1.0, max_new_tokens=4, seed=i) for i in range(12)]
    batch = vllm_fp32.generate(long, params)
    assert sum(len(g.prompt_token_ids) for g in batch) > 8192 and [g.n_tokens for g in batch] == [4] * 12
    assert vllm_fp32.generate(long[5:6], params[5:6])[0].token_ids == batch[5].token_ids


def _check_features(target, hf, tol: float) -> None:
    got, want = target.features(SEQUENCES, AUX), hf.features(SEQUENCES, AUX)
    assert torch.equal(got["cu_seqlens"], want["cu_seqlens"])
    H = hf.facts.hidden_size
    layers = {f"aux layer {i}": (got["aux"][:, j * H:(j + 1) * H], want["aux"][:, j * H:(j + 1) * H])
              for j, i in enumerate(AUX)}
    layers["last (post-norm)"] = (got["last"], want["last"])
    for name, (g, w) in layers.items():
        assert g.shape == w.shape, name
        rel = ((g.float() - w.float()).abs().max() / w.float().abs().max()).item()
        assert rel < tol, f"{name}: max relative error {rel:.2e} ({target.dtype})"


@pytest.mark.slow  # a vLLM engine start: tens of seconds on 2 cores
def test_features_equal_hf_per_layer_and_the_cpu_keeps_an_engine_per_mode(vllm_fp32, hf):
    generation = vllm_fp32.generation_engine()
    _check_features(vllm_fp32, hf, 1e-4)
    # Resampling and features alternate shard after shard: on the CPU build neither engine restarts.
    if not torch.cuda.is_available():
        assert vllm_fp32.generation_engine() is generation and len(vllm_fp32._engines) == 2


@pytest.mark.slow  # a vLLM engine start: tens of seconds on 2 cores
def test_features_in_bfloat16_within_its_precision(target_dir, hf):
    others = {p.pid for p in engine_processes()}  # the module's float32 engines
    target = load_target(str(target_dir), backend="vllm", dtype="bfloat16")
    try:
        _check_features(target, hf, 2e-2)
    finally:
        target.close()
    assert {p.pid for p in engine_processes()} == others  # its engine stopped: a GPU is free for the next


def test_every_engine_specdraft_starts_resolves_its_dtype_and_cpu_settings():
    """Guard: each module that builds a vLLM engine (`LLM(...)`) runs engine_dtype and
    engine_defaults, so "auto" and the CPU build's settings mean the same on every path."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[3]
    builders = []
    for path in sorted(p for d in ("training", "spec_assets", "resources", "bench") for p in (root / d).rglob("*.py")):
        tree = ast.parse(path.read_text())
        called = {n.func.attr if isinstance(n.func, ast.Attribute) else getattr(n.func, "id", None)
                  for n in ast.walk(tree) if isinstance(n, ast.Call)}
        if "LLM" in called:
            builders.append(path.relative_to(root).as_posix())
            assert {"engine_dtype", "engine_defaults"} <= called, f"{path}: builds an engine without them"
    assert set(builders) >= {"training/targets/vllm.py", "training/evaluation/served.py"}, builders
