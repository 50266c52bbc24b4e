"""Measurement primitives of the in-process GPU check (``bench.gpu_check``): the time budget, timed calls, peak
memory above the inputs, the device's copy bandwidth, and out-of-memory handling.

- :class:`Deadline`: one global wall-clock deadline; every stage asks ``left()`` / ``allows(need_s)`` before it
  starts, and a case that would not fit is reported ``skipped`` with a reason starting ``"time"``.
- :func:`time_fn`: one untimed call (or the caller's estimate), then ``reps = budget / estimate`` calls
  (clamped to ``[min_reps, max_reps]``). CUDA: CUDA events around each call, with ``L2_FLUSH_BYTES`` zeroed before
  each one so that no call starts with its inputs in L2 (as ``triton.testing.do_bench`` does). CPU:
  ``time.perf_counter``. Returns the median, the 20th and 80th percentiles, min, max and the number of reps.
- :func:`peak_above` : one call between ``torch.cuda.reset_peak_memory_stats`` and ``max_memory_allocated``, minus
  what was allocated before it (the inputs and anything else alive). On CPU there is no allocator statistic:
  ``None``.
- :func:`copy_bandwidth`: a large device-to-device ``copy_``, bytes read + written over the median time; the
  roofline of docs/math.md section 8 (an H200 gives ~4273 GB/s, not the datasheet's 4.8 TB/s).
"""
from __future__ import annotations

import gc
import statistics
import time
from typing import Callable, Optional

import torch

L2_FLUSH_BYTES = 256 * 1024 * 1024  # larger than the L2 of any current GPU (H100/H200: 50 MiB)


class Deadline:
    """Wall-clock deadline (``time.time()`` seconds); ``None`` = no deadline."""

    def __init__(self, at: Optional[float]):
        self.at = at

    @classmethod
    def after(cls, seconds: Optional[float]) -> "Deadline":
        return cls(None if seconds is None else time.time() + seconds)

    def left(self) -> float:
        return float("inf") if self.at is None else self.at - time.time()

    def allows(self, need_s: float = 0.0) -> bool:
        return self.left() > need_s

    def reason(self, need_s: float = 0.0) -> str:
        return f"time: {max(self.left(), 0.0):.0f} s left before the deadline, this needs about {need_s:.0f} s"


def is_oom(e: BaseException) -> bool:
    oom_type = getattr(torch, "OutOfMemoryError", None) or getattr(torch.cuda, "OutOfMemoryError", MemoryError)
    if isinstance(e, (oom_type, MemoryError)):
        return True
    msg = str(e).lower()
    return "out of memory" in msg or "can't allocate memory" in msg


def free_memory(device: torch.device, collect: bool = False) -> None:
    """Give cached blocks back after a case so the next one starts from the inputs alone. ``collect`` runs the
    cycle collector first (after an exception, whose traceback may hold tensors in a cycle; between shapes): it
    costs ~0.1-0.2 s with torch, inductor and Liger imported, so not after every case (``gc.freeze()`` at start-up
    keeps it short)."""
    if collect:
        gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Flush:
    """The L2 flush buffer, allocated once (before any memory baseline, so it never counts in a peak)."""

    def __init__(self, device: torch.device):
        self.buf = torch.empty(L2_FLUSH_BYTES, dtype=torch.int8, device=device) if device.type == "cuda" else None

    def __call__(self) -> None:
        if self.buf is not None:
            self.buf.zero_()


def _stats(ms: list) -> dict:
    # in call order (a bimodal or drifting series shows there: GRPO at 16384 x 151936 on 2026-11-27)
    series = [round(x, 4) for x in ms]
    ms = sorted(ms)
    if len(ms) > 1:
        q = statistics.quantiles(ms, n=10, method="inclusive")
        p20, p80 = q[1], q[7]
    else:
        p20 = p80 = ms[0]
    return {"median_ms": statistics.median(ms), "p20_ms": p20, "p80_ms": p80, "min_ms": ms[0], "max_ms": ms[-1],
            "reps": len(ms), "series_ms": series}


def time_fn(fn: Callable[[], object], device: torch.device, budget_s: float = 0.3, min_reps: int = 3,
            max_reps: int = 50, flush: Optional[Flush] = None, est_s: Optional[float] = None) -> dict:
    """Median time of ``fn()`` (its outputs are dropped after each call); see the module docstring. ``est_s``: the
    wall time of a call already made (then no untimed call is made here)."""
    est = est_s
    if est is None:
        sync(device)
        t0 = time.perf_counter()
        out = fn()
        del out
        sync(device)
        est = time.perf_counter() - t0
    reps = min_reps if not est else int(min(max_reps, max(min_reps, budget_s / max(est, 1e-6))))
    ms = []
    if device.type == "cuda":
        evs = []
        for _ in range(reps):
            if flush is not None:
                flush()
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            out = fn()
            e.record()
            del out
            evs.append((s, e))
        torch.cuda.synchronize(device)
        ms = [s.elapsed_time(e) for s, e in evs]
    else:
        for _ in range(reps):
            t0 = time.perf_counter()
            out = fn()
            del out
            ms.append((time.perf_counter() - t0) * 1e3)
    return _stats(ms)


def peak_above(fn: Callable[[], object], device: torch.device) -> Optional[int]:
    """Bytes allocated at the peak of one ``fn()`` call above what was allocated before it (CUDA); CPU: None."""
    if device.type != "cuda":
        out = fn()
        del out
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    out = fn()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - base
    del out
    return int(peak)


def copy_bandwidth(device: torch.device, nbytes: Optional[int] = None, reps: int = 20) -> dict:
    """Measured device-to-device copy bandwidth: ``dst.copy_(src)`` of ``nbytes`` (default 1 GiB on CUDA, 64 MiB on
    CPU), ``2 * nbytes`` (read + write) over the median time."""
    nbytes = nbytes or ((1 << 30) if device.type == "cuda" else (64 << 20))
    src = torch.ones(nbytes // 2, dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    st = time_fn(lambda: dst.copy_(src), device, budget_s=0.0, min_reps=reps, max_reps=reps, est_s=0.0)
    del src, dst
    free_memory(device)
    return {"bytes_per_s": 2 * nbytes / (st["median_ms"] * 1e-3), "buffer_bytes": nbytes, "median_ms": st["median_ms"],
            "reps": st["reps"], "method": "dst.copy_(src), bytes read + written over the median time"}
