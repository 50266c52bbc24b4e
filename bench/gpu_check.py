"""``python -m bench.gpu_check``: everything a lent GPU should measure, in one process, within a time budget.

Run it through ``bash bench/gpu_check.sh`` (which installs the package and any ``.whl/`` wheels first). Stages, most
important first; each asks the global deadline (``--started-at + --budget-s - --reserve-s``) before it starts, and
what does not fit is reported ``skipped`` with a reason starting ``"time"``:

1. the test suite on the device (``bench.testrun``: pytest with ``-n`` workers, capped at ``--tests-timeout``);
2. the device's copy bandwidth (the roofline);
3. the correctness gate of every contender on small inputs (``bench.grid.check``);
4. the docs/math.md section 8 grid (``bench.grid``), N = 16384 first, then the smaller N, the fused-linear rows
   (``bench.linear.run_in_process``), then the larger N; at ``--profile-shape`` every contender's kernel launches
   and host syncs (``bench.probes.profile_counts``), at ``--sweep-shapes`` the launch-parameter sweep
   (``bench.probes.launch_sweep``);
5. ``torch.compile`` of eager (compiled once, dynamic shapes) over the same shapes, last: its compile time is the
   least predictable cost.

Results (``gpu-check-<device slug>.json`` and ``.md``) are rewritten after every case, so a run cut short still
leaves them; a watchdog thread writes them and exits at ``--started-at + --budget-s - 5`` if the run is stuck in a
call. The short summary is printed last. Exit status: 0 clean; +1 tests did not pass; +2 one of our contenders
(or a launch-sweep setting) was wrong or errored; +4 the watchdog ended the run. A peer library's own failure (a
Liger row) is listed under ``peer_errors`` and in the summary but does not set an exit bit.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import gc
import json
import os
import shlex
import sys
import threading
import time
from pathlib import Path

import torch

from . import devices, gpu_report, testrun, timing

ROOT = Path(__file__).resolve().parent.parent
GRID_N = (16384, 4096, 32768)  # run order: the targets of docs/math.md section 8 are stated at N = 16384
GRID_V = (32000, 128256, 151936, 262144)
DEFAULT_OUT = ROOT / "bench" / "out"  # ignored by .gitignore


def _shapes(text: str):
    out = []
    for tok in text.replace(" ", "").split(","):
        if tok and tok.lower() != "none":
            out.append(tuple(int(x) for x in tok.lower().split("x")))
    return out


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.gpu_check", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default=None, help="cuda (default when available) or cpu (a dry run of the harness)")
    p.add_argument("--out", default=os.environ.get("OUT") or str(DEFAULT_OUT),
                   help="output directory (default: $OUT, else bench/out of the checkout, git-ignored)")
    p.add_argument("--started-at", type=float, default=None, help="epoch seconds the budget counts from (default now)")
    p.add_argument("--budget-s", type=float, default=480.0, help="whole check, install included (default 8 min)")
    p.add_argument("--reserve-s", type=float, default=20.0, help="kept free at the end for files and summary")
    p.add_argument("--tests", default="tests", help='pytest targets, or "none" (default: tests)')
    # 300 s: the suite grew to ~1060 tests (2026-11-27), and the Triton fused rows' variants each compile once
    p.add_argument("--tests-timeout", type=float, default=300.0)
    p.add_argument("--tests-workers", type=int, default=12, help="pytest-xdist workers (serial without xdist)")
    p.add_argument("--shapes", default=None,
                   help="NxV,... in run order (default: the docs/math.md section 8 grid, N=16384 first)")
    p.add_argument("--check-shape", default=None, help="NxV of the correctness gate (default 512x32000)")
    p.add_argument("--profile-shape", default=None, help="NxV of the launch/sync counts (default 16384x32000)")
    p.add_argument("--sweep-shapes", default=None, help='NxV,... of the launch sweep (default 16384x32000,'
                   '16384x151936; "none" skips it)')
    p.add_argument("--linear-shape", default=None, help='NxHxV,... of the fused-linear rows (default '
                   '16384x4096x151936,16384x4096x128256; "none" skips them)')
    p.add_argument("--linear-reps", type=int, default=2)
    p.add_argument("--terms-shape", default=None, help='NxV of the loss-terms rows (bench.terms; default 4096x151936,'
                   ' "none" skips them)')
    p.add_argument("--roles", default=",".join(_roles()), help="contenders to run (default: all)")
    p.add_argument("--rep-budget-s", type=float, default=0.25, help="time of the timed reps per case and mode")
    p.add_argument("--case-need-s", type=float, default=5.0, help="do not start a case with less time left")
    p.add_argument("--compile-need-s", type=float, default=90.0, help="do not start compiling with less time left")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    p.add_argument("--lam", type=float, default=0.5)
    p.add_argument("--seqs", type=int, default=8)
    p.add_argument("--no-adopt-sweep", dest="adopt_sweep", action="store_false",
                   help="time the grid with the repository's launch parameters instead of the sweep's fastest")
    p.add_argument("--quick", action="store_true", help="tiny defaults (CPU dry run of the whole harness)")
    a = p.parse_args(argv)
    q = a.quick
    a.shapes = _shapes(a.shapes) if a.shapes else ([(64, 1000)] if q else [(n, v) for n in GRID_N for v in GRID_V])
    a.check_shape = _shapes(a.check_shape)[0] if a.check_shape else ((64, 1000) if q else (512, 32000))
    a.profile_shape = _shapes(a.profile_shape)[0] if a.profile_shape else (a.shapes[0] if q else (16384, 32000))
    a.sweep_shapes = (_shapes(a.sweep_shapes) if a.sweep_shapes else
                      ([a.shapes[0]] if q else [(16384, 32000), (16384, 151936), (16384, 262144)]))
    a.linear_shape = a.linear_shape or ("512x64x1000" if q else "16384x4096x151936,16384x4096x128256")
    a.terms_shape = a.terms_shape or ("64x1000" if q else "4096x151936")
    if q:
        a.rep_budget_s, a.case_need_s, a.linear_reps = min(a.rep_budget_s, 0.02), min(a.case_need_s, 1.0), 1
    a.roles = [r for r in a.roles.split(",") if r]
    return a


def _roles():
    from .grid import ROLES

    return ROLES


class Run:
    """The results dict, its files, and the one exit path (normal end or watchdog)."""

    def __init__(self, args, argv, device, started):
        self.args, self.device, self.started = args, device, started
        self.lock = threading.RLock()
        self.done = False
        slug = devices.device_slug(device)
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.json_path, self.md_path = self.out / f"gpu-check-{slug}.json", self.out / f"gpu-check-{slug}.md"
        total = torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else None
        self.res = {
            "schema": "rlsd-gpu-check/1",
            "device": {"type": device.type, "name": devices.device_name(device), "slug": slug,
                       "total_memory_bytes": total, "copy_bw": None},
            "versions": devices.versions(),
            "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join(shlex.quote(a) for a in ["python", "-m", "bench.gpu_check"] + list(argv)),
            "host": devices.host_info(),
            "config": {"budget_s": args.budget_s, "reserve_s": args.reserve_s, "started_at": started,
                       "shapes": [list(s) for s in args.shapes], "check_shape": list(args.check_shape),
                       "profile_shape": list(args.profile_shape), "sweep_shapes": [list(s) for s in args.sweep_shapes],
                       "linear_shape": args.linear_shape, "roles": args.roles, "dtype": args.dtype, "lam": args.lam,
                       "seqs": args.seqs, "advantages": "per sequence", "rep_budget_s": args.rep_budget_s},
            "tests": None, "checks": [], "cases": [], "sweep": None, "linear": [], "terms": [], "stages": [],
            "files": {"json": str(self.json_path), "md": str(self.md_path)},
        }

    def log(self, msg: str) -> None:
        print(f"[{time.time() - self.started:5.0f}s] {msg}", flush=True)

    def add(self, key: str, item) -> None:
        with self.lock:
            self.res[key].append(item)
            self.write()

    def write(self) -> None:
        with self.lock:
            self.res["wall_s"] = round(time.time() - self.started, 1)
            self.json_path.write_text(json.dumps(self.res, indent=1, default=str))
            self.md_path.write_text(gpu_report.gpu_markdown(self.res))

    def exit_code(self) -> int:
        r = self.res
        tests_bad = bool(r["tests"]) and r["tests"].get("status") not in ("passed", "skipped")
        failed = [x for x in r["checks"] + r["cases"] if x["status"] in ("wrong", "error")]
        failed += [x for x in r["linear"] if x.get("status") == "error"]
        # A peer library failing on its own (e.g. Liger's compiled fused-linear loss hitting a dynamo error) is
        # recorded and listed, but it is not a failure of this project: only our rows set the exit bit.
        r["peer_errors"] = [_label(x) for x in failed if _is_peer(x)]
        bad = any(not _is_peer(x) for x in failed)
        bad = bad or any(x.get("status") == "error" for x in (r["sweep"] or {}).get("rows", []))
        return (1 if tests_bad else 0) + (2 if bad else 0) + (4 if r.get("watchdog") else 0)

    def finish(self, watchdog: bool = False) -> int:
        got = self.lock.acquire(timeout=5)  # the watchdog writes even if the main thread holds the lock
        try:
            if self.done:
                return self.res.get("exit_code", 0)
            self.done = True
            self.res["watchdog"] = watchdog
            self.res["exit_code"] = self.exit_code()
            self.write()
            print("\n" + gpu_report.summary(self.res), flush=True)
            return self.res["exit_code"]
        finally:
            if got:
                self.lock.release()

    def stage(self, name: str, status: str, t0: float) -> None:
        self.add("stages", {"name": name, "status": status, "wall_s": round(time.time() - t0, 1)})


def _is_peer(row: dict) -> bool:
    """A row of another library (Liger-Kernel), not of this project."""
    return any(str(row.get(k) or "").startswith("liger") for k in ("role", "contender", "row"))


def _label(row: dict) -> str:
    name = row.get("contender") or row.get("row")
    shape = row.get("shape") or f"{row.get('N')}x{row.get('V')}"
    return f"{name} {shape}: {str(row.get('reason') or row.get('error') or '')[:120]}"


def _run_tests(run: Run, args, deadline) -> None:
    t0 = time.time()
    if args.tests.strip().lower() == "none":
        run.res["tests"] = {"status": "skipped", "reason": "--tests none"}
        return
    cap = min(args.tests_timeout, max(10.0, deadline.left() - 60.0))
    run.log(f"tests: {args.tests} (cap {cap:.0f} s, log {run.out / 'tests.log'})")
    run.res["tests"] = testrun.run(args.tests, cap, run.out / "tests.log", workers=args.tests_workers, cwd=ROOT)
    run.log(testrun.brief(run.res["tests"]))
    run.stage("tests", run.res["tests"]["status"], t0)


def _bench(run: Run, args, deadline) -> None:
    import rlsd_kernels  # noqa: F401 -- imported before gc.freeze() below

    from . import grid, linear, probes
    from .contenders import backends_for
    from .workload import DTYPES

    dev = run.device
    t0 = time.time()
    gc.collect()
    gc.freeze()  # what is alive now (torch, triton, liger...) is never scanned again: collections stay short
    bw = timing.copy_bandwidth(dev)
    run.res["device"]["copy_bw"] = bw
    run.log(f"copy bandwidth {bw['bytes_per_s'] / 1e9:.0f} GB/s")
    cfg = grid.GridConfig(device=dev, dtype=DTYPES[args.dtype], lam=args.lam, seqs=args.seqs,
                          rep_budget_s=args.rep_budget_s, case_need_s=args.case_need_s, copy_bw=bw["bytes_per_s"],
                          profile_shape=tuple(args.profile_shape), flush=timing.Flush(dev),
                          profile_fn=probes.profile_counts, log=run.log)
    plan = grid.entries(dev, [r for r in args.roles if r != "compile"])
    gates = {}
    for e in plan:
        if deadline.allows(args.case_need_s):
            g = grid.check(e, cfg, *args.check_shape)
        else:
            g = {"contender": e.name, "role": e.role, "N": args.check_shape[0], "V": args.check_shape[1],
                 "status": "skipped", "reason": deadline.reason(args.case_need_s)}
        gates[e.name] = g
        run.add("checks", g)
        run.log(f"check {e.name}: {g['status']}" + (f" ({g['reason'][:100]})" if g.get("reason") else ""))
    run.stage("copy bandwidth + checks", "ok", t0)

    sweep_rows = []
    run.res["sweep"] = {"status": "pending", "rows": sweep_rows}
    backend = backends_for(dev)[0] if "ours_rlsd" in args.roles else None

    def sweep_hook(w, shared):
        if (w.N, w.V) in args.sweep_shapes and backend and w.N * w.V > 0:
            r = probes.launch_sweep(w, shared, backend, dev, deadline, cfg.copy_bw, cfg.flush,
                                    rep_budget_s=min(0.2, args.rep_budget_s), need_s=args.case_need_s, log=run.log)
            with run.lock:
                sweep_rows.extend(r["rows"])
                run.res["sweep"].update(status=r["status"], reason=r.get("reason"),
                                        summary=probes.sweep_summary(sweep_rows))
            run.write()

    def on_case(c):
        run.add("cases", c)
        fb = c.get("modes", {}).get("fwd+bwd")
        what = (f"f+b {fb['median_ms']:.3f} ms" + (f" ({100 * fb['bw_frac']:.0f}% BW)" if fb.get("bw_frac") else "")
                if fb else (c.get("reason") or "")[:90])
        run.log(f"{c['N']}x{c['V']} {c['contender']}: {c['status']} {what}")

    # The sweep runs first, on its own inputs; unless --no-adopt-sweep, the grid is then timed with the setting
    # that was fastest for the RLSD loss (geometric mean over the sweep shapes), recorded in the results.
    t1 = time.time()
    for N, V in args.sweep_shapes:
        if backend:
            grid.run_shape(N, V, [], gates, cfg, deadline, hooks=[sweep_hook])
    if run.res["sweep"]["status"] == "pending":
        run.res["sweep"].update(status="skipped", reason="no sweep shape ran (time, or no rlsd contender)")
    run.stage("launch sweep", run.res["sweep"]["status"], t1)
    adopted = probes.fastest_setting(sweep_rows) if args.adopt_sweep else None
    run.res["adopted_launch"] = adopted
    if adopted:
        from rlsd_kernels.backends.triton_launch import LAUNCH

        LAUNCH.update(adopted["params"])
        run.log(f"grid timed with the sweep's fastest RLSD setting {adopted['setting']}: {adopted['params']}")

    lin_shapes = [] if args.linear_shape == "none" else args.linear_shape.split(",")
    lin_n = int(lin_shapes[0].split("x")[0]) if lin_shapes else None
    linear_done = lin_n is None

    def run_linear():
        t1 = time.time()
        for shape in lin_shapes:
            run.res["linear"] += linear.run_in_process(shape, str(cfg.dtype).replace("torch.", ""), str(dev),
                                                       args.linear_reps, deadline=deadline,
                                                       need_s=args.case_need_s * 3, log=run.log)
            run.write()
        run.stage("fused linear", "ok", t1)

    for N, V in args.shapes:
        if not linear_done and N > lin_n:
            run_linear()
            linear_done = True
        t1 = time.time()
        grid.run_shape(N, V, plan, gates, cfg, deadline, on_case=on_case)
        run.stage(f"grid {N}x{V}", "ok", t1)
    if not linear_done:
        run_linear()

    if args.terms_shape != "none":  # the section 2c terms' cost over plain RLSD, and OPSD against eager / Liger
        t1 = time.time()
        if deadline.allows(args.case_need_s * 4):
            from . import terms

            try:
                run.res["terms"] = terms.run(args.terms_shape, str(dev), str(cfg.dtype).replace("torch.", ""), 3)
                run.stage("loss terms", "ok", t1)
            except Exception as e:  # noqa: BLE001 -- recorded, the check goes on
                run.res["terms"] = [{"status": "error", "error": f"{type(e).__name__}: {str(e)[:300]}"}]
                run.stage("loss terms", "error", t1)
        else:
            run.stage("loss terms", "skipped (time)", t1)
        run.write()

    if "compile" in args.roles:
        t1 = time.time()
        (ce,) = grid.entries(dev, ["compile"])
        need = max(args.compile_need_s, args.case_need_s)
        if deadline.allows(need):
            gates[ce.name] = g = grid.check(ce, cfg, *args.check_shape)
            cfg.first_call_s[ce.name] = g.get("seconds", 0.0) / 4  # a recompile would cost a fraction of it
        else:
            gates[ce.name] = g = {"contender": ce.name, "role": ce.role, "N": args.check_shape[0],
                                  "V": args.check_shape[1], "status": "skipped", "reason": deadline.reason(need)}
        run.add("checks", g)
        run.log(f"check {ce.name}: {g['status']} ({g.get('seconds', 0):.0f} s)")
        for N, V in args.shapes:
            grid.run_shape(N, V, [ce], gates, cfg, deadline, on_case=on_case)
        run.stage("torch.compile pass", "ok", t1)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    started = args.started_at or time.time()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        print("--device cuda given but torch.cuda.is_available() is False", file=sys.stderr)
        return 2
    os.environ.pop("TRITON_INTERPRET", None)  # never time Triton's interpreter (read when triton is imported)
    deadline = timing.Deadline(started + args.budget_s - args.reserve_s)
    run = Run(args, argv, device, started)
    run.write()

    def watchdog():
        if run.done:  # the main thread is already writing the end of the run
            return
        run.log("watchdog: the budget is spent; writing the results and exiting")
        os._exit(run.finish(watchdog=True))

    dog = threading.Timer(max(1.0, started + args.budget_s - 5 - time.time()), watchdog)
    dog.daemon = True
    dog.start()
    _run_tests(run, args, deadline)
    try:
        _bench(run, args, deadline)
    except Exception as e:  # noqa: BLE001 -- whatever broke, the tests' outcome and the cases so far are written
        import traceback

        run.res["cases"].append({"contender": "-", "role": "-", "N": 0, "V": 0, "status": "error",
                                 "reason": f"harness: {type(e).__name__}: {e}", "modes": {},
                                 "traceback": traceback.format_exc()[-3000:]})
    finally:
        gc.unfreeze()  # frozen objects must be collectable at exit (else nanobind reports them as leaks)
    dog.cancel()
    return run.finish()


if __name__ == "__main__":
    sys.exit(main())
