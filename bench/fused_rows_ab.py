"""A/B of the C++ backend's one-visit path (``ops/fused_rows.py``) against its two-pass path, in one process.

Rows, each ``rlsd_loss`` forward + backward on the main bench's workload (``bench/workload.py``, lam 0.5) with the C++
backend forced:

- ``one_visit`` / ``two_pass``: the gradient formed in the forward (a new gradient buffer per call);
- ``one_visit+inplace`` / ``two_pass+inplace``: ``inplace_backward=True`` (the logits refilled between calls,
  untimed).

The two-pass path is what ``RLSD_CPP_FUSED=0`` selects at import; here the switch is flipped between calls (the C++
module's ``fused_rows`` / ``fused_inplace`` hidden for the two-pass rows), so that all four rows run in the same
process and their reps interleave: this shared CPU's speed drifts by 10-20% between runs minutes apart, which
separate processes per case (``python -m bench``) would put into the ratio. Medians of ``--reps`` after one warm-up.

Usage::

    python -m bench.fused_rows_ab                                   # 4096x32000 and 1024x151936, float32 and bf16
    python -m bench.fused_rows_ab --shapes 4096x32000 --dtypes bfloat16 --reps 15

Results: ``bench/results/fused-rows-ab-cpu.json`` and ``.md``.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
ROWS = ("one_visit", "two_pass", "one_visit+inplace", "two_pass+inplace")


def run(shape: str, dtype_name: str, reps: int) -> list:
    import torch

    import rlsd_kernels
    from rlsd_kernels import dispatch
    from rlsd_kernels.backends.logits import cpp

    from .workload import Workload, make_inputs

    N, V = (int(x) for x in shape.split("x"))
    dtype = getattr(torch, dtype_name)
    inp = make_inputs(Workload(N, V, dtype, torch.device("cpu")))
    one_visit = {name: getattr(cpp, name) for name in ("fused_rows", "fused_inplace")}
    buf = inp.student.detach().clone()

    def call(row: str) -> float:
        for name, fn in one_visit.items():  # the switch RLSD_CPP_FUSED=0 makes at import, per call
            if row.startswith("one_visit"):
                setattr(cpp, name, fn)
            elif hasattr(cpp, name):
                delattr(cpp, name)
        inplace = row.endswith("+inplace")
        if inplace:
            buf.copy_(inp.student)  # the previous call left the gradient in it
        x = (buf if inplace else inp.student).detach().requires_grad_(True)
        t0 = time.perf_counter()
        out = rlsd_kernels.rlsd_loss(x, inp.teacher, inp.labels, inp.advantages, inp.old_logprobs, lam=0.5,
                                     inplace_backward=inplace)
        (grad,) = torch.autograd.grad(out.loss, x)
        dt = time.perf_counter() - t0
        del out, grad
        return dt

    times = {row: [] for row in ROWS}
    try:
        with dispatch.force_backend("cpp"):
            for row in ROWS:
                call(row)
            for _ in range(reps):
                for row in ROWS:
                    times[row].append(call(row))
    finally:
        for name, fn in one_visit.items():
            setattr(cpp, name, fn)
    med = {row: sorted(v)[len(v) // 2] * 1e3 for row, v in times.items()}
    out = []
    for row in ROWS:
        base = med["two_pass+inplace" if row.endswith("+inplace") else "two_pass"]
        out.append(dict(row=row, shape=shape, dtype=dtype_name, fwd_bwd_ms=med[row],
                        p25_ms=sorted(times[row])[len(times[row]) // 4] * 1e3,
                        p75_ms=sorted(times[row])[3 * len(times[row]) // 4] * 1e3,
                        speedup_vs_two_pass=base / med[row]))
    return out


def markdown(rows: list, command: str) -> str:
    lines = ["# C++ backend: one visit per row against the two-pass path (cpu)", "",
             f"`{command}`; {platform.platform()}; one process, the four rows' reps interleaved; medians [p25-p75].",
             "", "N x V | dtype | row | fwd+bwd ms | speed-up vs two-pass", "---|---|---|---|---"]
    for r in rows:
        lines.append(f"{r['shape']} | {r['dtype']} | {r['row']} | {r['fwd_bwd_ms']:.1f} "
                     f"[{r['p25_ms']:.1f}-{r['p75_ms']:.1f}] | {r['speedup_vs_two_pass']:.2f}x")
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", default="4096x32000,1024x151936", help="comma list of NxV")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--reps", type=int, default=11)
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args(argv)
    rows = []
    for shape in args.shapes.split(","):
        for dtype in args.dtypes.split(","):
            got = run(shape, dtype, args.reps)
            for r in got:
                print(json.dumps(r), flush=True)
            rows += got
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    command = "python -m bench.fused_rows_ab " + " ".join(argv if argv is not None else sys.argv[1:])
    (out / "fused-rows-ab-cpu.json").write_text(json.dumps(rows, indent=1) + "\n")
    (out / "fused-rows-ab-cpu.md").write_text(markdown(rows, command.strip()))
    print(f"wrote {out / 'fused-rows-ab-cpu.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
