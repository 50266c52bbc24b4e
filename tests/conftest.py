import os

import pytest
import torch

# Without a GPU the Triton kernels run in Triton's interpreter on CPU tensors; it must be enabled before triton
# decorates the kernels, i.e. before rlsd_kernels is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from rlsd_kernels.dispatch import force_backend  # noqa: E402


def available_backends():
    """Backends that can run on this machine's test device."""
    names = ["reference"]
    try:
        import triton  # noqa: F401

        if torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1":
            names.append("triton")
    except ImportError:
        pass
    from rlsd_kernels.backends import cpp

    if not torch.cuda.is_available() and cpp.available():
        names.append("cpp")
    return names


DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(params=available_backends())
def backend(request):
    """Runs the test once per backend, forcing the dispatcher to it."""
    with force_backend(request.param):
        yield request.param


@pytest.fixture
def device():
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


# tests/helpers.py is imported as a plain module by tests in sub-folders too.
import sys  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
