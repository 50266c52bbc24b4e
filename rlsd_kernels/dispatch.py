"""The one place that decides which backend computes the fused log-prob pass.

Rules (SPEC section 6): ``RLSD_BACKEND=triton|cpp|reference`` forces a backend; otherwise CUDA tensors use
Triton, CPU tensors use Triton under ``TRITON_INTERPRET=1`` (how CI exercises the kernels without a GPU), else the
C++ backend, else (no compiler) the chunked eager reference.
"""
from __future__ import annotations

import contextlib
import importlib
import os
from typing import Optional

BACKENDS = ("triton", "cpp", "reference")
_forced: Optional[str] = None


def _check(name: str, source: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"{source} must be one of {BACKENDS}, got {name!r}")
    return name


@contextlib.contextmanager
def force_backend(name: Optional[str]):
    """Use backend ``name`` inside the block (tests and benchmarks); ``None`` restores automatic choice."""
    global _forced
    prev = _forced
    _forced = None if name is None else _check(name, "backend")
    try:
        yield
    finally:
        _forced = prev


def _cpp_available() -> bool:
    from .backends import cpp

    return cpp.available()


def explicit_backend() -> Optional[str]:
    """The backend forced by ``force_backend`` or ``RLSD_BACKEND``, or None when the choice is automatic."""
    if _forced is not None:
        return _forced
    env = os.environ.get("RLSD_BACKEND", "").strip().lower()
    return _check(env, "RLSD_BACKEND") if env else None


def backend_name(device) -> str:
    explicit = explicit_backend()
    if explicit is not None:
        return explicit
    if device.type == "cuda":
        return "triton"
    if device.type == "cpu":
        if os.environ.get("TRITON_INTERPRET", "0") == "1":
            return "triton"
        if _cpp_available():
            return "cpp"
    return "reference"


def get_backend(device):
    """The backend module for tensors on ``device``: it exposes ``forward`` and ``backward`` (see backends/)."""
    name = backend_name(device)
    return importlib.import_module(f".backends.{'triton_kernels' if name == 'triton' else name}", __package__)
