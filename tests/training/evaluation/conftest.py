"""A tiny random target built locally (never downloaded)."""

import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """Tiny models on a shared 2-core machine: one intra-op thread is the fastest."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def target_dirs(tmp_path_factory):
    """4 decoder layers keep every forward cheap; aux layers are then (2, 2, 1)."""
    from training.targets.tiny import build_tiny_target

    root = tmp_path_factory.mktemp("eval_targets")
    return {arch: build_tiny_target(root / arch, arch, num_layers=4, seed=7) for arch in ("llama", "qwen3")}


@pytest.fixture(scope="session")
def target(target_dirs):
    from training.targets import load_target

    return load_target(str(target_dirs["llama"]), dtype="float32", device="cpu")
