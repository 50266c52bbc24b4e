import os
import sys

import pytest
import torch

# Without a GPU the Triton kernels run in Triton's interpreter on CPU tensors; it must be enabled before triton
# decorates the kernels, i.e. before rlsd_kernels is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# tests/helpers.py is imported as a plain module, by tests in sub-folders too.
sys.path.insert(0, os.path.dirname(__file__))

from helpers import linear_params, machine_backends, running_on  # noqa: E402

# Each backend with the device it serves here: on a GPU machine triton on CUDA, cpp and reference on CPU.
BACKENDS = machine_backends()
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def available_backends():
    """The backends this machine runs, each a name (``== "triton"``) carrying its ``.device``."""
    return list(BACKENDS)


@pytest.fixture(params=BACKENDS, ids=str)
def backend(request):
    """Runs the test once per backend, forcing the dispatcher to it; build tensors on ``backend.device``."""
    with running_on(request.param) as b:
        yield b


@pytest.fixture(params=linear_params(BACKENDS), ids=lambda b: b.linear)
def linear_path(request):
    """The fused linear op's routes: ``chunked`` (over the C++ or reference backend, CPU) and ``triton``."""
    with running_on(request.param) as b:
        yield b


@pytest.fixture
def device():
    """The machine's accelerator if it has one, else the CPU (for tests that pick no backend)."""
    return DEVICE


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs CUDA (real sizes); skipped without a GPU")
    config.addinivalue_line("markers", "slow: minutes on CPU")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
