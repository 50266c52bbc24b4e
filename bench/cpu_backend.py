"""CPU benchmark: the eager reference RLSD loss vs the fused op on the C++ backend.

For each shape ``N x V`` and dtype it measures, per implementation:
- forward and forward+backward median wall time over ``reps`` runs (``time.perf_counter``, one warm-up run);
- peak memory beyond the inputs, in its own subprocess: the inputs are allocated, the kernel-side state is warmed
  up, the process's peak RSS is reset (``/proc/self/clear_refs``, value 5), one forward (or forward+backward) runs
  and ``VmHWM - VmRSS(before)`` is the peak extra memory. Inputs are student and teacher logits ``[N, V]`` plus
  O(N) vectors; the gradient buffer (``N x V`` in the logits dtype) is part of the forward+backward peak of every
  out-of-place implementation and is reported next to it.

Forward+backward ends with ``torch.autograd.grad(loss, logits)``, i.e. the gradient w.r.t. the logits as the
lm_head backward would receive it.

Implementations: ``eager`` (``rlsd_kernels.reference.rlsd_loss``: full-vocabulary float32 log_softmax of student
and teacher, gather, weights, PPO loss, autograd), ``cpp`` (``rlsd_kernels.rlsd_loss`` with the C++ backend) and
``cpp_inplace`` (the same with ``inplace_backward=True``: the gradient is written into the logits buffer).

    python -m bench.cpu_backend                       # N in {1024, 4096} x V in {32000, 151936}, fp32 + bf16
    python -m bench.cpu_backend --shapes 1024x32000 --dtypes float32 --reps 3     # a short sanity run

Results: a markdown table on stdout and ``bench/results/cpu_backend.{json,md}`` (``./bench-results/`` for an installed
package; ``--out`` to choose). ``run(shapes, dtypes, reps)``
returns the rows as a list of dicts for the general benchmark suite.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the checkout importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

DEFAULT_SHAPES = [(1024, 32000), (1024, 151936), (4096, 32000), (4096, 151936)]
DEFAULT_DTYPES = ["float32", "bfloat16"]
IMPLS = ["eager", "cpp", "cpp_inplace"]
_ROOT = Path(__file__).resolve().parent.parent
# bench/results of a source checkout; an installed package writes to ./bench-results instead of site-packages
RESULTS_DIR = _ROOT / "bench" / "results" if (_ROOT / "setup.py").exists() else Path.cwd() / "bench-results"
_MIB = 1024 * 1024


# ----------------------------------------------------------------------------------------------- child side
def _status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _case(impl: str, N: int, V: int, dtype_name: str, reps: int) -> dict:
    """Runs in a fresh process: timings and peak extra memory of one implementation on one shape."""
    import torch

    import rlsd_kernels
    from rlsd_kernels import reference
    from rlsd_kernels.backends import cpp
    from rlsd_kernels.dispatch import force_backend

    dtype = getattr(torch, dtype_name)
    if impl != "eager" and not cpp.available():
        raise RuntimeError("the C++ backend could not be built")
    g = torch.Generator().manual_seed(0)
    student = (torch.randn(N, V, generator=g) * 2).to(dtype)
    teacher = (torch.randn(N, V, generator=g) * 2).to(dtype)
    labels = torch.randint(0, V, (N,), generator=g)
    adv = torch.randn(N, generator=g)
    inplace = impl == "cpp_inplace"

    def loss_fn(x):
        if impl == "eager":
            return reference.rlsd_loss(x, teacher, labels, adv, lam=0.5).loss
        with force_backend("cpp"):
            return rlsd_kernels.rlsd_loss(x, teacher, labels, adv, lam=0.5, inplace_backward=inplace).loss

    def fwd():
        x = student.requires_grad_(True)
        return loss_fn(x)

    def fwd_bwd():
        # torch.autograd.grad hands back the logits' gradient as the lm_head backward would consume it. (.backward()
        # on a leaf would add AccumulateGrad's work: a clone into .grad of a gradient that aliases the leaf, i.e.
        # of the in-place one, and a sum into any .grad left from the previous step.)
        x = student.requires_grad_(True)
        (grad,) = torch.autograd.grad(loss_fn(x), x)
        # in place, grad *is* the logits buffer: later reps run on those values, which changes nothing in the work
        # done (no data-dependent shortcut for finite values)
        return grad

    def timed(fn):
        fn()  # warm-up (extension load, allocator, thread pool)
        ts = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
        return statistics.median(ts), ts

    def peak(fn):
        fn()  # warm-up outside the measured window
        base = _status_kib("VmRSS")
        exact = _reset_peak()
        keep = fn()  # keep the outputs alive until the peak is read
        extra = _status_kib("VmHWM") - base
        del keep
        return extra * 1024 / _MIB, exact

    out = {"impl": impl, "N": N, "V": V, "dtype": dtype_name, "reps": reps, "threads": torch.get_num_threads()}
    out["fwd_peak_extra_mib"], exact_f = peak(fwd)
    out["fwdbwd_peak_extra_mib"], exact_b = peak(fwd_bwd)
    out["peak_exact"] = exact_f and exact_b
    out["fwd_ms"], ts_f = (v * 1e3 if i == 0 else v for i, v in enumerate(timed(fwd)))
    out["fwdbwd_ms"], ts_b = (v * 1e3 if i == 0 else v for i, v in enumerate(timed(fwd_bwd)))
    out["fwd_ms_all"] = [round(t * 1e3, 3) for t in ts_f]
    out["fwdbwd_ms_all"] = [round(t * 1e3, 3) for t in ts_b]
    out["input_mib"] = 2 * N * V * student.element_size() / _MIB
    out["grad_mib"] = N * V * student.element_size() / _MIB
    return out


# ----------------------------------------------------------------------------------------------- parent side
def _run_child(impl, N, V, dtype, reps, timeout):
    root = str(Path(__file__).resolve().parent.parent)
    env = dict(os.environ)
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.pop("TRITON_INTERPRET", None)
    cmd = [sys.executable, "-m", "bench.cpu_backend", "--_child", f"{impl},{N},{V},{dtype},{reps}"]
    try:
        proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"impl": impl, "N": N, "V": V, "dtype": dtype, "error": f"timeout after {timeout}s"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        err = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {"impl": impl, "N": N, "V": V, "dtype": dtype, "error": f"rc={proc.returncode}: {err}"}
    return json.loads(lines[-1])


def run(shapes=None, dtypes=None, reps: int = 5, impls=None, timeout: int = 1800) -> list[dict]:
    """Benchmarks every (shape, dtype, implementation) in its own subprocess; returns one dict per case."""
    shapes = shapes or DEFAULT_SHAPES
    dtypes = dtypes or DEFAULT_DTYPES
    impls = impls or IMPLS
    rows = []
    for N, V in shapes:
        for dtype in dtypes:
            by_impl = {}
            for impl in impls:
                r = _run_child(impl, N, V, dtype, reps, timeout)
                by_impl[impl] = r
                rows.append(r)
            eager = by_impl.get("eager")
            for r in by_impl.values():
                if eager and "error" not in eager and "error" not in r:
                    r["fwd_speedup_vs_eager"] = eager["fwd_ms"] / r["fwd_ms"]
                    r["fwdbwd_speedup_vs_eager"] = eager["fwdbwd_ms"] / r["fwdbwd_ms"]
    return rows


def to_markdown(rows) -> str:
    head = ("| impl | N | V | dtype | fwd ms | fwd+bwd ms | speedup fwd / fwd+bwd | peak extra fwd MiB "
            "| peak extra fwd+bwd MiB | grad buffer MiB |\n|---|---|---|---|---|---|---|---|---|---|\n")
    lines = []
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['impl']} | {r['N']} | {r['V']} | {r['dtype']} | error: {r['error']} |||||| ")
            continue
        sp = (f"{r['fwd_speedup_vs_eager']:.2f}x / {r['fwdbwd_speedup_vs_eager']:.2f}x"
              if "fwd_speedup_vs_eager" in r else "-")
        lines.append(f"| {r['impl']} | {r['N']} | {r['V']} | {r['dtype']} | {r['fwd_ms']:.1f} | {r['fwdbwd_ms']:.1f} "
                     f"| {sp} | {r['fwd_peak_extra_mib']:.0f} | {r['fwdbwd_peak_extra_mib']:.0f} "
                     f"| {r['grad_mib']:.0f} |")
    return head + "\n".join(lines) + "\n"


def _parse_shapes(text):
    out = []
    for item in text.split(","):
        n, v = item.lower().split("x")
        out.append((int(n), int(v)))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="eager reference vs C++ backend on CPU")
    ap.add_argument("--shapes", type=_parse_shapes, default=None,
                    help="comma-separated NxV list (default: 1024x32000,1024x151936,4096x32000,4096x151936)")
    ap.add_argument("--dtypes", default=",".join(DEFAULT_DTYPES), help="comma-separated torch dtype names")
    ap.add_argument("--impls", default=",".join(IMPLS), help="comma-separated subset of " + ",".join(IMPLS))
    ap.add_argument("--reps", type=int, default=5, help="timed runs per case (median reported)")
    ap.add_argument("--out", default=str(RESULTS_DIR / "cpu_backend"), help="output path without extension")
    ap.add_argument("--_child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args._child:
        impl, N, V, dtype, reps = args._child.split(",")
        print(json.dumps(_case(impl, int(N), int(V), dtype, int(reps))), flush=True)
        return 0
    rows = run(args.shapes, args.dtypes.split(","), args.reps, args.impls.split(","))
    md = to_markdown(rows)
    import torch

    meta = {"machine": platform.machine(), "processor": platform.processor(), "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "torch": torch.__version__, "reps": args.reps,
            "time": time.strftime("%Y-%m-%d %H:%M:%S"), "loadavg_at_end": [round(x, 2) for x in os.getloadavg()],
            "thp": os.environ.get("RLSD_CPP_THP", "1") != "0"}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    out.with_suffix(".md").write_text(f"# CPU backend benchmark\n\n{json.dumps(meta)}\n\n{md}")
    print(md, end="")
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.md')}")
    return 0 if all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
