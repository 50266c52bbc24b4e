"""The one place that decides which backend serves an op (docs/math.md, "Backends").

:func:`select_backend` maps (device, forced backend) to a backend name, ``"triton" | "cpp" | "reference"``, for
the logits ops (``rlsd_loss``, ``token_logprobs``). The fused linear op (``rlsd_linear_loss``) runs its GEMMs with
torch and its row chunks on :func:`chunk_backend` (the same choice, never the Triton interpreter).

A backend is *forced* by the ``forced`` argument (the trainer's ``--backend``), else by :func:`force_backend`
(tests, benchmarks), else by ``RLSD_BACKEND``. A forced backend that cannot serve the device is a ``ValueError``
naming where it was forced, before any work. Automatic choice: CUDA -> Triton; CPU -> Triton under
``TRITON_INTERPRET=1`` (how CI runs the kernels without a GPU) when ``interpreter_ok``, else C++, else (no
compiler) the eager reference over row blocks.

:func:`get_backend` and :func:`get_loss_backend` turn that choice into the module that implements it
(``backends/logits/``); no other module maps a backend name to a module.
"""
from __future__ import annotations

import contextlib
import importlib
import os
from typing import Optional

import torch

BACKENDS = ("triton", "cpp", "reference")
_forced: Optional[str] = None
# (op, backend name) -> the module that implements it: the only place a backend name becomes a module
_MODULES = {
    ("logits", "triton"): ".backends.logits.triton",
    ("logits", "cpp"): ".backends.logits.cpp",
    ("logits", "reference"): ".backends.logits.eager",
    ("loss", "triton"): ".backends.logits.triton_loss",
}


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


def forced_by_context() -> Optional[str]:
    """The backend forced by an enclosing :func:`force_backend` block (None outside one). Ops record it in the
    forward so that their backward runs on the same backend even outside the block."""
    return _forced


def interpreter_on() -> bool:
    """Whether Triton runs in its CPU interpreter (``TRITON_INTERPRET=1`` when triton was imported)."""
    try:
        import triton

        return bool(triton.knobs.runtime.interpret)
    except (ImportError, AttributeError):
        return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _cpp_available() -> bool:
    return importlib.import_module(_MODULES["logits", "cpp"], __package__).available()


def _forced_backend(forced: Optional[str], source: str):
    if forced is not None:
        return _check(forced, source), source
    if _forced is not None:
        return _forced, "force_backend"
    env = os.environ.get("RLSD_BACKEND", "").strip().lower()
    return (_check(env, "RLSD_BACKEND"), "RLSD_BACKEND") if env else (None, None)


def _serves(name: str, device: torch.device) -> Optional[str]:
    """None if backend ``name`` can serve tensors on ``device``, else the reason it cannot."""
    if name == "triton":
        if device.type == "cuda" or (device.type == "cpu" and interpreter_on()):
            return None
        return f"Triton needs CUDA tensors (or CPU tensors with TRITON_INTERPRET=1), got {device.type}"
    if name == "cpp":
        if device.type != "cpu":
            return f"the C++ backend serves CPU tensors only, got {device.type}"
        if not _cpp_available():
            return "the C++ backend could not be built on this machine"
    return None


def select_backend(device, *, forced: Optional[str] = None, source: str = "backend",
                   interpreter_ok: bool = True) -> str:
    """The logits backend for tensors on ``device``."""
    device = torch.device(device)
    name, where = _forced_backend(forced, source)
    if name is not None:
        why = _serves(name, device)
        if why is not None:
            raise ValueError(f"{where}: backend {name!r} cannot serve {device} tensors: {why}")
    elif device.type == "cuda":
        name = "triton"
    elif device.type == "cpu" and interpreter_ok and interpreter_on():
        name = "triton"
    elif device.type == "cpu" and _cpp_available():
        name = "cpp"
    else:
        name = "reference"
    return name


def get_backend(device):
    """The logits backend module for tensors on ``device`` (see backends/logits/__init__.py for its interface)."""
    return importlib.import_module(_MODULES["logits", select_backend(device)], __package__)


def get_loss_backend(device):
    """The module of the whole fused loss for tensors on ``device`` (``backends/logits/triton_loss.py``), or None
    when the logits backend has none (the CPU backends: ``ops/fused_loss.py`` composes their forward/backward)."""
    if select_backend(device) != "triton":
        return None
    return importlib.import_module(_MODULES["loss", "triton"], __package__)


def chunk_backend(device) -> str:
    """The logits backend that the fused linear op runs its row chunks on: never the Triton interpreter (it would
    interpret the vocabulary passes of every chunk; the CPU chunks take C++, else the reference)."""
    name = select_backend(device, interpreter_ok=False)
    if name == "triton" and torch.device(device).type == "cpu":
        return "cpp" if _cpp_available() else "reference"
    return name
