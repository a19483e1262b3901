import pytest
import torch


@pytest.fixture(autouse=True)
def single_thread():
    """Tiny tensors: one intra-op thread is faster, and much faster on a shared, busy CPU."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)
