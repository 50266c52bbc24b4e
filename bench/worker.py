"""One benchmark case (one contender, one shape) in one process: check, peak memory, timings.

Run by ``bench.__main__`` as ``python -m bench.worker SPEC.json RESULT.json`` in a fresh subprocess per case, so
that peak memory is that case's alone (CPU: growth of the process's peak resident set, VmHWM, above the
post-input, post-warm-up resident set, after resetting VmHWM through /proc/self/clear_refs; CUDA:
``max_memory_allocated`` above ``memory_allocated`` after the inputs exist) and no allocator cache, compiled graph
or autotuning state leaks from one contender into another.

Order: build inputs -> correctness check against the chunked float32 reference (also the first warm-up, which is
where torch.compile compiles) -> more warm-up -> one measured call per mode for peak memory -> ``reps`` timed
calls per mode. ``fwd`` is the forward pass with autograd recording (what a training step runs; its peak includes
what it saves for backward); ``fwd+bwd`` is forward plus ``torch.autograd.grad`` w.r.t. the student logits.
"""
from __future__ import annotations

import gc
import json
import math
import re
import statistics
import sys
import time
import traceback

import torch

from . import contenders
from .workload import DTYPES, Workload, make_inputs, refill_student

# Correctness tolerances vs the float32 reference evaluated on the same (rounded) inputs. A contender's gradient
# comes back in the input dtype, so it can differ from the float32 reference by the rounding of that dtype
# (bf16: 2^-8 relative): elementwise |g - r| <= GRAD_RTOL * |r| + GRAD_ATOL * max|r|. The loss is a float32 scalar in
# every contender; only summation order differs.
TOL = {
    torch.bfloat16: dict(loss_rtol=1e-3, grad_rtol=1e-2, grad_atol=1e-3),
    torch.float16: dict(loss_rtol=1e-3, grad_rtol=2e-3, grad_atol=1e-3),
    torch.float32: dict(loss_rtol=1e-5, grad_rtol=1e-4, grad_atol=1e-6),
}
# Rows of float32 reference evaluated at once in the check (~1 GiB of float32 per chunk at most).
_CHECK_ELEMS = 1 << 28


# ------------------------------------------------------------------------------------------------ memory probes
def _status_kb(key: str):
    try:
        with open("/proc/self/status") as f:
            m = re.search(rf"^{key}:\s+(\d+)\s+kB", f.read(), re.M)
        return int(m.group(1)) * 1024 if m else None
    except OSError:
        return None


def _malloc_trim() -> None:
    """Give freed heap pages back to the OS so that the baseline resident set holds only live memory (glibc keeps
    freed chunks below its dynamic mmap threshold, up to 32 MiB, which would hide later re-use from VmHWM)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _reset_hwm() -> bool:
    _malloc_trim()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class MemProbe:
    def __init__(self, device: torch.device):
        self.device = device
        self.hwm_reset = None

    def start(self):
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            self.hwm_reset = _reset_hwm()
            self.base = _status_kb("VmRSS") if self.hwm_reset else self._base_before
        return self

    def mark_inputs_ready(self):
        """Fallback baseline (CPU without clear_refs): resident set once the inputs exist, before any warm-up."""
        gc.collect()
        _malloc_trim()
        self._base_before = _status_kb("VmRSS") if self.device.type == "cpu" else 0

    def peak(self) -> int:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            return int(torch.cuda.max_memory_allocated() - self.base)
        hwm = _status_kb("VmHWM")
        return int(hwm - self.base) if hwm is not None and self.base is not None else -1


# ------------------------------------------------------------------------------------------------ check
def _reference_chunks(inp, w: Workload):
    """Yield ``(b, t0, t1, grad_ref_f32, loss_part)``: the float32 reference on row chunks. "token" aggregation
    over an unmasked batch is ``sum(loss_t) / N``, i.e. "sum" aggregation with ``norm = N`` chunk by chunk, so the
    chunks add up exactly to the full-batch loss and gradient without an N x V float32 temporary."""
    from rlsd_kernels import reference

    B, T, V = inp.student.shape
    rows = max(1, min(T, _CHECK_ELEMS // V))
    for b in range(B):
        for t0 in range(0, T, rows):
            t1 = min(T, t0 + rows)
            zs = inp.student[b:b + 1, t0:t1].detach().float().requires_grad_(True)
            adv = inp.advantages[b:b + 1] if inp.advantages.dim() == 1 else inp.advantages[b:b + 1, t0:t1]
            out = reference.rlsd_loss_eager(zs, inp.teacher[b:b + 1, t0:t1].detach().float(),
                                            inp.labels[b:b + 1, t0:t1], adv, inp.old_logprobs[b:b + 1, t0:t1],
                                            lam=w.lam, loss_agg_mode="sum", norm=float(w.N))
            (g,) = torch.autograd.grad(out.loss, zs)
            yield b, t0, t1, g[0], float(out.loss.detach())


def check_runner(runner, inp, w: Workload) -> dict:
    """``{ok, ...}``: the runner's loss and gradient against the float32 reference on the same inputs."""
    tol = TOL[w.dtype]
    loss = runner.loss()
    (grad,) = torch.autograd.grad(loss, runner.leaf)
    loss = float(loss.detach())
    grad = runner.grad_view(grad).detach()
    if runner.inplace:  # the gradient now lives in the student buffer: copy it out, then restore the logits
        grad = grad.clone()
        refill_student(inp, w)
    loss_ref, max_ref, max_excess, max_err, finite = 0.0, 0.0, -math.inf, 0.0, True
    for b, t0, t1, g_ref, part in _reference_chunks(inp, w):
        loss_ref += part
        g = grad[b, t0:t1].float()
        finite = finite and bool(torch.isfinite(g).all())
        diff = (g - g_ref).abs()
        max_err = max(max_err, float(diff.max()))
        max_excess = max(max_excess, float((diff - tol["grad_rtol"] * g_ref.abs()).max()))
        max_ref = max(max_ref, float(g_ref.abs().max()))
        del g, diff, g_ref
    del grad
    loss_rel = abs(loss - loss_ref) / max(abs(loss_ref), 1e-30)
    grad_ok = finite and max_excess <= tol["grad_atol"] * max_ref
    ok = bool(math.isfinite(loss) and loss_rel <= tol["loss_rtol"] and grad_ok)
    return {"ok": ok, "loss": loss, "loss_ref": loss_ref, "loss_rel_err": loss_rel,
            "grad_max_abs_err": max_err, "grad_max_abs_ref": max_ref,
            "grad_max_err_over_max_ref": max_err / max(max_ref, 1e-30), "grad_finite": finite, **tol}


# ------------------------------------------------------------------------------------------------ timing
def _stats(ms):
    q = statistics.quantiles(ms, n=4, method="inclusive") if len(ms) > 1 else [ms[0]] * 3
    return {"median_ms": statistics.median(ms), "p25_ms": q[0], "p75_ms": q[2], "min_ms": min(ms),
            "max_ms": max(ms), "reps": len(ms)}


def run_step(runner, mode):
    """One timed step of ``runner``: the loss (``"fwd"``), or the loss and its gradient (``"fwd+bwd"``)."""
    loss = runner.loss()
    if mode == "fwd+bwd":
        (g,) = torch.autograd.grad(loss, runner.leaf)
        return loss, g
    return loss, None


def time_mode(runner, mode, reps, device) -> dict:
    ms = []
    if device.type == "cuda":
        flush = torch.empty(256 * 1024 * 1024, dtype=torch.int8, device=device)  # > L2 of any current GPU
        evs = []
        for _ in range(reps):
            flush.zero_()
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            out = run_step(runner, mode)
            e.record()
            del out
            evs.append((s, e))
        torch.cuda.synchronize()
        ms = [s.elapsed_time(e) for s, e in evs]
        del flush
    else:
        for _ in range(reps):
            t0 = time.perf_counter()
            out = run_step(runner, mode)
            ms.append((time.perf_counter() - t0) * 1e3)
            del out
    return _stats(ms)


def _is_oom(e: BaseException) -> bool:
    if isinstance(e, torch.OutOfMemoryError if hasattr(torch, "OutOfMemoryError") else MemoryError):
        return True
    msg = str(e).lower()
    return isinstance(e, MemoryError) or "out of memory" in msg or "can't allocate memory" in msg


# ------------------------------------------------------------------------------------------------ one case
def run_case(spec: dict) -> dict:
    device = torch.device(spec["device"])
    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    w = Workload(N=spec["N"], V=spec["V"], dtype=DTYPES[spec["dtype"]], device=device, seqs=spec.get("seqs", 8),
                 lam=spec.get("lam", 0.5), seed=spec.get("seed", 0))
    name = spec["contender"]
    res = {"contender": name, "N": w.N, "V": w.V, "B": w.B, "T": w.T, "dtype": spec["dtype"], "lam": w.lam,
           "status": "error", "reason": None, "check": None, "modes": {}}
    reason = contenders.availability(name, device)
    if reason is not None:
        res.update(status="skipped", reason=reason)
        return res
    stage = "inputs"
    try:
        if name == "compile":
            torch._dynamo.config.cache_size_limit = max(8, torch._dynamo.config.cache_size_limit)
        if contenders.split(name)[0] == "rlsd[cpp]":  # build / load the extension before any baseline
            from rlsd_kernels.backends.logits import cpp
            cpp.available()
        probe = MemProbe(device)
        inp = make_inputs(w, contenders.layout(name))
        probe.mark_inputs_ready()
        stage = "setup"
        runner = contenders.factory(name)(inp, w)
        stage = "check"
        t0 = time.perf_counter()
        res["check"] = check_runner(runner, inp, w)
        res["check"]["seconds"] = time.perf_counter() - t0
        if not res["check"]["ok"]:
            res.update(status="wrong", reason="loss or gradient differs from the float32 reference; not timed")
            return res
        # In-place contenders overwrite the logits with the gradient on every backward; the work per call does not
        # depend on the values (the logits become small finite numbers), so later calls time the same work.
        modes = ["fwd", "fwd+bwd"] if spec["mode"] == "both" else [spec["mode"]]
        stage = "warmup"
        for _ in range(max(0, spec.get("warmup", 2))):
            for m in modes:
                run_step(runner, m)
        for m in modes:
            stage = f"memory/{m}"
            probe.start()
            out = run_step(runner, m)
            peak = probe.peak()
            del out
            stage = f"timing/{m}"
            st = time_mode(runner, m, spec.get("reps", 10), device)
            st["peak_mem_bytes"] = peak
            nbytes = w.bytes_moved(m)
            st["bytes_model"] = nbytes
            st["achieved_gbps"] = nbytes / (st["median_ms"] * 1e-3) / 1e9
            bw = spec.get("peak_bw")
            st["bw_frac"] = (st["achieved_gbps"] * 1e9 / bw) if bw else None
            res["modes"][m] = st
        res["mem_baseline"] = "VmRSS after warm-up, VmHWM reset" if probe.hwm_reset else (
            "cuda memory_allocated after warm-up" if device.type == "cuda" else "VmRSS after inputs (no HWM reset)")
        res["status"] = "ok"
    except Exception as e:  # noqa: BLE001 -- reported, never fatal to the sweep
        if _is_oom(e):
            res.update(status="oom", reason=f"out of memory during {stage}: {str(e).splitlines()[0][:200]}")
        else:
            res.update(status="error", reason=f"{stage}: {type(e).__name__}: {str(e)[:500]}",
                       traceback=traceback.format_exc()[-3000:])
    return res


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    spec = json.loads(open(argv[0]).read())
    res = run_case(spec)
    with open(argv[1], "w") as f:
        json.dump(res, f)


if __name__ == "__main__":
    main()
