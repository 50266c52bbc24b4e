"""C++ CPU backend (csrc/): not built yet, so the dispatcher falls back to the reference backend."""


def available() -> bool:
    return False


def forward(*args, **kwargs):
    raise RuntimeError("the C++ backend is not available")


backward = forward
