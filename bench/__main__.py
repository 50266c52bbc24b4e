"""``python -m bench`` / ``rlsd-bench``: the benchmark suite of docs/math.md section 8.

Examples::

    python -m bench --quick                                   # seconds on CPU: small shapes, every contender
    python -m bench --device cpu --n 1024,4096 --v 32000,151936
    python -m bench --device cuda                             # the full section 8 grid, bf16, one process per case (on a GPU prefer bash bench/gpu_check.sh)

Each (contender, shape) case runs in a fresh subprocess (``bench.worker``), is first checked against the float32
reference, then timed; results go to ``<out>/<device-slug>.{json,md,png}`` (``-fp32``/``-fp16`` appended for those dtypes, ``-quick`` for
``--quick``).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import itertools
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from . import contenders, devices, report

GRID_N = (4096, 16384, 32768)
GRID_V = (32000, 128256, 151936, 262144)
CPU_N = (1024, 4096)
CPU_V = (32000, 151936)
QUICK_SHAPES = ((128, 8192), (256, 32000))
DEFAULT_CONTENDERS = "rlsd,eager,compile,liger"
ROOT = Path(__file__).resolve().parent.parent
CHECKOUT = (ROOT / "setup.py").exists()
# bench/results of the source checkout (tracked: the committed tables); an installed package writes to
# ./bench-results instead of site-packages. --quick (a smoke run, never a result to commit) and the GPU check write
# to bench/out/ of the checkout, which .gitignore ignores, so they never leave the checkout dirty.
DEFAULT_OUT = ROOT / "bench" / "results" if CHECKOUT else Path.cwd() / "bench-results"
SCRATCH_OUT = ROOT / "bench" / "out" if CHECKOUT else Path.cwd() / "bench-results"


def _ints(s: str):
    return [int(x) for x in s.replace(" ", "").split(",") if x]


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="rlsd-bench", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default=None, help="cpu or cuda[:i] (default: cuda if available)")
    p.add_argument("--backends", "--contenders", dest="backends", default=DEFAULT_CONTENDERS,
                   help="comma list of contenders: rlsd (= the backends rlsd_kernels.dispatch.select_backend "
                        "accepts for the device), rlsd[triton], rlsd[cpp], rlsd[reference], grpo (the op without a "
                        "teacher), eager, compile, compile[dynamic], liger, liger_grpo; a +inplace suffix selects the "
                        "in-place backward (default: %(default)s)")
    p.add_argument("--inplace", action="store_true",
                   help="also time the in-place-backward variant (gradient written into the logits) of every "
                        "contender that has one: rlsd[...]+inplace, liger+inplace")
    p.add_argument("--shapes", default=None, help='comma list of NxV, e.g. "4096x32000,16384x151936"')
    p.add_argument("--n", default=None, help="comma list of N (rows); product with --v")
    p.add_argument("--v", default=None, help="comma list of V (vocabulary)")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    p.add_argument("--mode", default="both", choices=["fwd", "fwd+bwd", "both"])
    p.add_argument("--reps", type=int, default=None, help="timed repetitions per mode (default 10, quick 3)")
    p.add_argument("--warmup", type=int, default=None, help="untimed calls per mode after the check (default 2)")
    p.add_argument("--lam", type=float, default=0.5, help="RLSD lam (0 = plain GRPO)")
    p.add_argument("--seqs", type=int, default=8, help="sequences per batch (N = seqs * T)")
    p.add_argument("--quick", action="store_true", help=f"small shapes {QUICK_SHAPES}, 3 reps: seconds on CPU")
    p.add_argument("--out", default=None,
                   help="output directory (default: bench/results of the checkout; with --quick the ignored "
                        "bench/out)")
    p.add_argument("--name", default=None, help="file stem of the outputs (default: device slug, +-<dtype> unless bf16, +-quick)")
    p.add_argument("--resume", action="store_true",
                   help="merge into an existing results file with the same stem: its finished cases are kept and "
                        "not re-run (a sweep can be split across commands)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads in each case")
    p.add_argument("--peak-bw-tbs", type=float, default=None, help="override the device's peak bandwidth (TB/s)")
    p.add_argument("--case-timeout", type=float, default=1800.0, help="seconds per case before it is killed")
    p.add_argument("--no-plot", action="store_true")
    return p.parse_args(argv)


def shapes_from(args, device):
    if args.shapes:
        out = []
        for tok in args.shapes.replace(" ", "").split(","):
            if tok:
                n, v = tok.lower().split("x")
                out.append((int(n), int(v)))
        return out
    if args.n or args.v:
        dn, dv = (GRID_N, GRID_V) if device.type == "cuda" else (CPU_N, CPU_V)
        return list(itertools.product(_ints(args.n) if args.n else dn, _ints(args.v) if args.v else dv))
    if args.quick:
        return list(QUICK_SHAPES)
    return list(itertools.product(*((GRID_N, GRID_V) if device.type == "cuda" else (CPU_N, CPU_V))))


def run_subprocess(spec: dict, timeout: float) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    # Never time Triton's interpreter: on CPU nothing Triton is timed, and on CUDA TRITON_INTERPRET=1 (as CI sets it)
    # would run rlsd[triton] and Liger through the interpreter.
    env.pop("TRITON_INTERPRET", None)
    with tempfile.TemporaryDirectory(prefix="rlsd-bench-") as d:
        sp, rp = Path(d, "spec.json"), Path(d, "result.json")
        sp.write_text(json.dumps(spec))
        base = {"contender": spec["contender"], "N": spec["N"], "V": spec["V"], "dtype": spec["dtype"],
                "lam": spec["lam"], "check": None, "modes": {}}
        try:
            proc = subprocess.run([sys.executable, "-m", "bench.worker", str(sp), str(rp)], env=env, cwd=str(ROOT),
                                  capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return {**base, "status": "timeout", "reason": f"case exceeded --case-timeout={timeout:.0f}s"}
        if rp.exists():
            return json.loads(rp.read_text())
        rc = proc.returncode
        oom = rc in (-9, 137)
        tail = (proc.stderr or proc.stdout or "").strip().splitlines()[-3:]
        reason = (f"worker killed by SIGKILL (exit {rc}), most likely out of memory" if oom
                  else f"worker exited {rc}: {' | '.join(tail)[:500]}")
        return {**base, "status": "oom" if oom else "error", "reason": reason}


def _brief(c: dict) -> str:
    if c["status"] != "ok":
        return f"{c['status']}: {c.get('reason')}"
    parts = [f"{m} {st['median_ms']:.3g} ms, peak {st['peak_mem_bytes'] / 2**20:.0f} MiB"
             for m, st in c["modes"].items()]
    return "ok  " + "; ".join(parts) + f"  (check: loss rel {c['check']['loss_rel_err']:.1e}, grad err/max " \
        f"{c['check']['grad_max_err_over_max_ref']:.1e})"


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda given but torch.cuda.is_available() is False")
    if args.quick:
        args.reps = 3 if args.reps is None else args.reps
        args.warmup = 1 if args.warmup is None else args.warmup
    reps = 10 if args.reps is None else args.reps
    warmup = 2 if args.warmup is None else args.warmup
    shapes = shapes_from(args, device)
    names = contenders.expand(args.backends.split(","), device, args.inplace)
    peak_bw = args.peak_bw_tbs * 1e12 if args.peak_bw_tbs else devices.peak_bandwidth(device)
    slug = devices.device_slug(device)
    # one results file per device and dtype (bf16, the benchmark dtype of docs/math.md section 8, keeps the bare
    # device name)
    stem = args.name or (slug + ("" if args.dtype == "bf16" else f"-{args.dtype}") + ("-quick" if args.quick else ""))
    out_dir = Path(args.out or (SCRATCH_OUT if args.quick else DEFAULT_OUT))
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / f"{stem}.json"

    skipped = {n: r for n in names if (r := contenders.availability(n, device)) is not None}
    for n, r in skipped.items():
        print(f"skip {n}: {r}", flush=True)

    results = {
        "schema": "rlsd-bench/1",
        "device": {"type": device.type, "name": devices.device_name(device), "slug": slug,
                   "peak_bw_bytes_per_s": peak_bw},
        "versions": devices.versions(),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(shlex.quote(a) for a in ["python", "-m", "bench"] + (sys.argv[1:] if argv is None
                                                                                  else list(argv))),
        "host": devices.host_info(),
        "config": {"dtype": args.dtype, "mode": args.mode, "reps": reps, "warmup": warmup, "lam": args.lam,
                   "seqs": args.seqs, "quick": bool(args.quick), "threads": args.threads,
                   "shapes": [list(s) for s in shapes], "contenders": names},
        "cases": [],
    }
    if args.threads:
        results["host"]["torch_threads"] = args.threads
    done = {}
    plan = {(n, N, V, args.dtype, args.lam) for (N, V) in shapes for n in names}
    if args.resume and json_path.exists():
        # Merge: finished cases of the existing file are kept and not re-run; cases outside this invocation's plan
        # (e.g. an earlier invocation's N) are carried over unchanged, so a sweep can be split across commands.
        old = json.loads(json_path.read_text())
        for c in old.get("cases", []):
            key = (c["contender"], c["N"], c["V"], c["dtype"], c.get("lam"))
            if key not in plan:
                results["cases"].append(c)
            elif c["status"] in ("ok", "wrong", "oom"):
                done[key] = c
        for s in old.get("config", {}).get("shapes", []):
            if tuple(s) not in {tuple(x) for x in results["config"]["shapes"]}:
                results["config"]["shapes"].insert(0, s)
        for n in old.get("config", {}).get("contenders", []):
            if n not in results["config"]["contenders"]:
                results["config"]["contenders"].append(n)
        results["command"] = old.get("command", "") + " ; " + results["command"]

    def write():
        order = {n: i for i, n in enumerate(results["config"]["contenders"])}
        results["cases"].sort(key=lambda c: (c["N"], c["V"], order.get(c["contender"], 99)))
        results["config"]["shapes"].sort()
        report.add_ratios(results["cases"])
        json_path.write_text(json.dumps(results, indent=1))
        (out_dir / f"{stem}.md").write_text(report.markdown(results))

    total = len(shapes) * len(names)
    k = 0
    t_start = time.perf_counter()
    for (N, V) in shapes:
        for name in names:
            k += 1
            key = (name, N, V, args.dtype, args.lam)
            if key in done:
                c = done[key]
            elif name in skipped:
                c = {"contender": name, "N": N, "V": V, "dtype": args.dtype, "lam": args.lam, "status": "skipped",
                     "reason": skipped[name], "check": None, "modes": {}}
            else:
                spec = {"contender": name, "N": N, "V": V, "dtype": args.dtype, "device": str(device),
                        "mode": args.mode, "reps": reps, "warmup": warmup, "lam": args.lam, "seqs": args.seqs,
                        "threads": args.threads, "peak_bw": peak_bw}
                t0 = time.perf_counter()
                c = run_subprocess(spec, args.case_timeout)
                c["wall_s"] = round(time.perf_counter() - t0, 2)
                print(f"[{k}/{total}] {N}x{V} {name}: {_brief(c)}  [{c['wall_s']:.1f}s]", flush=True)
            results["cases"].append(c)
            write()
    results["wall_s"] = round(time.perf_counter() - t_start, 2)
    write()
    print()
    print(report.text_table(results))
    if not args.no_plot:
        try:
            report.plot(results, str(out_dir / f"{stem}.png"))
        except Exception as e:  # a plotting problem must not lose the numbers
            print(f"plot failed: {type(e).__name__}: {e}", file=sys.stderr)
    print(f"\nwrote {json_path} (+ .md, .png)")
    bad = [c for c in results["cases"] if c["status"] in ("wrong", "error")]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
