"""Settings shared by the trainer tests: tiny runs pinned to the CPU and the loss backend that serves it (C++,
else the reference), so that a test means the same on a machine with a GPU, where --device auto would pick CUDA."""
from rlsd_kernels.train import cli
from rlsd_kernels.train.config import TrainConfig


def train_backend():
    from rlsd_kernels.backends.logits import cpp

    return "cpp" if cpp.available() else "reference"


TINY = dict(cli.PRESETS["tiny"], progress=False, plot=False, threads=1)
# The same pinning for tests that go through the command line.
TINY_FLAGS = ["--preset", "tiny", "--device", "cpu", "--backend", train_backend(), "--threads", "1", "--no-progress",
              "--no-plot"]


def tiny_cfg(tmp_path, name, **kw):
    return TrainConfig(**{**TINY, "out": str(tmp_path / name), "device": "cpu", "backend": train_backend(), **kw})
