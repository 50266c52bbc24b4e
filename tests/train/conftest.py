import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    """The trainer tests share a small CI machine: one intra-op thread, restored afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)

