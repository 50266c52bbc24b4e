"""C++ CPU backend: ``csrc/rlsd_cpu.cpp`` (+ ``csrc/rlsd_chunks.h``; ATen + OpenMP, vectorised), compiled on first use
and cached.

The extension is built with ``torch.utils.cpp_extension.load`` into ``$TORCH_EXTENSIONS_DIR`` (default
``~/.cache/torch_extensions``) under a name that hashes the source, the compiler flags, the torch version and the
CPU's instruction-set flags, so different checkouts, versions or machines sharing a home directory never load one
another's binary. The build happens once per process (thread-safe) and once per machine (torch's file lock makes
concurrent processes wait for a single build). If there is no compiler or the build fails, :func:`available`
returns False after a single warning and the dispatcher falls back to the reference backend.

Pre-build (e.g. in a Docker image): ``python -m rlsd_kernels.backends.logits.cpp --build``.
Environment: ``RLSD_CPP_NATIVE=0`` builds without ``-march=native`` (portable binary, slower);
``RLSD_CPP_VERBOSE=1`` shows the compiler output; ``RLSD_CPP_THP=0`` stops the backward from advising transparent huge
pages for a fresh gradient buffer (fewer page faults on its first write; see csrc/rlsd_cpu.cpp).
"""
from __future__ import annotations

import hashlib
import os
import sys
import threading
import warnings
from pathlib import Path
from typing import Optional

import torch

from . import alloc_row_outputs

_SOURCE = "rlsd_cpu.cpp"
_USE_THP = os.environ.get("RLSD_CPP_THP", "1") != "0"
_lock = threading.Lock()
_module = None
_error: Optional[str] = None


def source_dir() -> Path:
    """``csrc/`` of a source checkout, or ``rlsd_kernels/csrc`` of an installed package (setup.py maps it)."""
    package = Path(__file__).resolve().parents[2]  # rlsd_kernels/ (this file is rlsd_kernels/backends/logits/cpp.py)
    for cand in (package / "csrc", package.parent / "csrc"):
        if (cand / _SOURCE).is_file():
            return cand
    raise FileNotFoundError(f"{_SOURCE} not found in the package ({package / 'csrc'}) "
                            f"or in the source checkout ({package.parent / 'csrc'})")


def _cpu_signature() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return line
    except OSError:
        pass
    import platform

    return platform.machine() + platform.processor()


def _flag_sets():
    """Compiler/linker flags to try in order: tuned (OpenMP, -march=native), then portable (no OpenMP, where the
    compiler lacks it: rows then run on one thread; no -march=native: SSE2 on x86-64)."""
    native = os.environ.get("RLSD_CPP_NATIVE", "1") != "0"
    tuned = (["-O3", "-fopenmp", "-fno-math-errno"] + (["-march=native"] if native else []), ["-fopenmp"])
    portable = (["-O3", "-fno-math-errno"], [])
    return [tuned, portable]


def _ext_name(src: bytes, cflags) -> str:
    h = hashlib.sha256()
    for part in (src, " ".join(cflags).encode(), torch.__version__.encode(), sys.version.encode(),
                 _cpu_signature().encode()):
        h.update(part)
        h.update(b"\0")
    return f"rlsd_cpu_{h.hexdigest()[:16]}"


def _build_one(src: Path, cflags, ldflags):
    from torch.utils import cpp_extension

    # the name hashes the source and the headers it includes (csrc/*.h), so an edit of either rebuilds
    code = src.read_bytes() + b"".join(h.read_bytes() for h in sorted(src.parent.glob("*.h")))
    name = _ext_name(code, cflags)
    verbose = os.environ.get("RLSD_CPP_VERBOSE", "0") == "1"
    try:
        build_dir = Path(cpp_extension._get_build_directory(name, verbose=False))
        built = any(build_dir.glob(f"{name}*.so")) or any(build_dir.glob(f"{name}*.pyd"))
    except Exception:  # private torch helper: if it changes, just always print the message
        build_dir, built = "~/.cache/torch_extensions", False
    if not built:
        print(f"rlsd_kernels: compiling the C++ CPU backend (once, 10-60 s; cached in {build_dir})",
              file=sys.stderr, flush=True)
    return cpp_extension.load(name=name, sources=[str(src)], extra_cflags=cflags, extra_ldflags=ldflags,
                              verbose=verbose)


def _build():
    src = source_dir() / _SOURCE
    errors = []
    for cflags, ldflags in _flag_sets():
        try:
            return _build_one(src, cflags, ldflags)
        except Exception as exc:
            errors.append(exc)
    raise errors[0]


def load():
    """The compiled module; builds it on first call. Raises RuntimeError if it cannot be built."""
    global _module, _error
    if _module is not None:
        return _module
    with _lock:
        if _module is None and _error is None:
            try:
                _module = _build()
            except Exception as exc:  # no compiler, missing headers, failed build: fall back, warn once
                _error = f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1] if str(exc).strip() else ''}"
                warnings.warn(f"rlsd_kernels: the C++ CPU backend could not be built ({_error}); "
                              "falling back to the eager reference backend on CPU", RuntimeWarning, stacklevel=3)
        if _module is None:
            raise RuntimeError(f"the C++ CPU backend is not available: {_error}")
    return _module


def available() -> bool:
    try:
        load()
        return True
    except RuntimeError:
        return False


def forward(student, teacher, labels, temperature, ignore_index, want_entropy, row_stats=None):
    """The backend interface's ``forward``; ``row_stats`` (this backend only, float32, ``row_stats_size`` floats):
    receives each student row's max, sum and running max after each chunk, for ``fused_inplace``."""
    ext = load()
    n = labels.numel()
    logp_s = torch.empty(n, dtype=torch.float32, device=student.device)
    lse_s = torch.empty_like(logp_s)
    logp_t = torch.empty_like(logp_s) if teacher is not None else None
    ent = torch.empty_like(logp_s) if want_entropy else None
    ext.forward(student, teacher, labels, float(temperature), int(ignore_index), logp_s, logp_t, lse_s, ent,
                row_stats=row_stats)
    return logp_s, logp_t, lse_s, ent


def backward(grad_logp, student, labels, lse, temperature, out):
    load().backward(grad_logp, student, labels, lse, float(temperature), out, _USE_THP)


def forward_terms(student, teacher, labels, temperature, ignore_index, want_entropy, div_mode, beta):
    """``forward`` plus, with a divergence (``div_mode`` in ``backends.logits.DIV_MODES``), the teacher's lse, the
    divergence ``D_t`` and its auxiliary sum (JSD: KL(p_S || M)), in the same pass (JSD: one more sweep per row, over
    the row kept in cache). Without ``want_entropy`` the entropy is None and not computed."""
    ext = load()
    n = labels.numel()
    logp_s, logp_t, lse_s, ent = alloc_row_outputs(n, student.device, teacher is not None, want_entropy)
    lse_t = div = aux = None
    if div_mode:
        lse_t = torch.zeros(n, dtype=torch.float64, device=student.device)  # float64: see backends/logits/__init__.py
        div, aux = (torch.zeros(n, dtype=torch.float32, device=student.device) for _ in range(2))
    ext.forward(student, teacher, labels, float(temperature), int(ignore_index), logp_s, logp_t, lse_s, ent,
                int(div_mode), float(beta), lse_t, div, aux)
    # the terms interface's lse is float64; this backend's backward_terms re-splits rows with |lse| > 32 exactly
    return logp_s, logp_t, lse_s.double(), ent, lse_t, div, aux


def backward_terms(coef, ent_coef, div_coef, student, teacher, labels, lse, entropy, lse_t, div, aux, temperature,
                   div_mode, beta, out):
    load().backward_terms(coef, ent_coef, div_coef, student, teacher, labels, lse, entropy, lse_t, div, aux,
                          float(temperature), int(div_mode), float(beta), out)


FUSED_ROWS_DIV_MODES = (0, 1, 2, 3)  # fused_rows takes every distillation divergence (DIV_MODES)


def fused_rows(student, teacher, labels, temperature, ignore_index, want_entropy, div_mode, beta, tokens, hyper, out):
    """The loss's forward outputs and its whole gradient (into ``out``, a fresh tensor shaped like ``student``) in one
    visit of each row (``csrc/rlsd_fused_rows.h``). ``tokens``: the per-token float64 inputs of
    ``ops/fused_rows.py`` (``adv``, ``agg``; ``old``, ``teacher_lp``, ``ref``, ``w_is`` or None); ``hyper``: its
    scalars. Returns ``forward_terms``' outputs (``lse_t`` / ``div`` / ``aux`` None without a divergence)."""
    ext = load()
    n = labels.numel()
    ent_on = bool(want_entropy) or hyper["entropy_coef"] > 0
    logp_s, logp_t, lse_s, ent = alloc_row_outputs(n, student.device, teacher is not None, ent_on)
    lse_t = div = aux = None
    if div_mode:
        lse_t = torch.zeros(n, dtype=torch.float64, device=student.device)
        div, aux = (torch.zeros(n, dtype=torch.float32, device=student.device) for _ in range(2))
    ext.fused(student, teacher, labels, float(temperature), int(ignore_index), bool(want_entropy), int(div_mode),
              float(beta), tokens["adv"], tokens["old"], tokens["teacher_lp"], tokens["ref"], tokens["agg"],
              tokens["w_is"], logp_s=logp_s, logp_t=logp_t, lse_s=lse_s, entropy=ent, lse_t=lse_t, div=div, aux=aux,
              out=out, **hyper)
    return logp_s, logp_t, lse_s, ent, lse_t, div, aux


def fused_inplace(student, labels, logp_s, row_stats, temperature, tokens, hyper):
    """The plain loss's gradient written into ``student`` on the fused rows' arithmetic (bit for bit
    ``fused_rows``' gradient), from ``forward``'s ``logp_s`` and ``row_stats``; ``tokens["teacher_lp"]``: the teacher's
    log-probs (from its logits or given). ``hyper``: ``ops/fused_rows.hyper_args`` (its section 2c terms off)."""
    keep = ("lam", "eps_w", "clip_low", "clip_high", "clip_dual", "cispo")
    load().fused_inplace(student, labels, logp_s, row_stats, float(temperature), tokens["adv"], tokens["old"],
                         tokens["teacher_lp"], tokens["agg"], **{k: hyper[k] for k in keep})


if os.environ.get("RLSD_CPP_FUSED", "1") == "0":  # the two-pass path everywhere (A/B benchmarks, debugging)
    del fused_rows, fused_inplace


def main(argv=None) -> int:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--build", action="store_true", help="compile (or find in the cache) the extension now")
    args = ap.parse_args(argv)
    if not args.build:
        ap.print_help()
        return 0
    try:
        mod = load()
    except RuntimeError as exc:
        print(exc, file=sys.stderr)
        return 1
    print(f"rlsd_kernels C++ CPU backend ready: {mod.__file__}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
