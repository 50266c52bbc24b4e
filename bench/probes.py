"""Two probes of the GPU check beyond speed and memory.

- :func:`profile_counts`: kernel launches and host synchronisations in one forward+backward, from
  ``torch.profiler`` (after one warm-up call outside the profiler). ``kernels``: device-side kernel events (CUDA
  activity, neither memcpy nor memset); ``memcpy`` / ``memset``: the device copies and fills (``other_device``:
  any other device activity kineto reports, e.g. sync records; record_function ranges never count); ``launch_calls``:
  host-side launch API calls (``cudaLaunchKernel``, ``cuLaunchKernel``, ...); ``sync_calls``: host calls that
  wait for the device (``cudaStreamSynchronize``, ``cudaDeviceSynchronize``, ``cudaEventSynchronize``, ...);
  ``local_scalar_dense``: ``aten::_local_scalar_dense`` (``.item()``, ``float(tensor)``: each one waits for the
  device); ``syncs`` = the larger of the two. ``host_ms``: wall time of one call without the profiler and without
  a final synchronisation (the host's share: when it exceeds the device time, the op is host-bound).
- :func:`launch_sweep`: re-times ``rlsd_kernels.backends.triton_launch.SWEEP`` (every entry under
  ``override(**entry)``; whatever keys ``LAUNCH`` has) on ``rlsd_loss`` forward+backward with a teacher (3 passes of
  ``N*V*itemsize``) and ``token_logprobs`` forward (1 pass) at one shape; the rows are collected across shapes and
  :func:`sweep_summary` names the fastest entry per (shape, op) and overall (geometric mean of time / best).
"""
from __future__ import annotations

import math
import time
from collections import Counter
from typing import Optional

import torch

from . import timing, worker

LAUNCH_NAMES = ("cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cuLaunchKernelEx",
                "cudaLaunchCooperativeKernel", "hipLaunchKernel", "hipModuleLaunchKernel")
MARK = "rlsd_gpu_check_step"
SYNC_NAMES = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cuStreamSynchronize",
              "cuCtxSynchronize", "cuEventSynchronize", "hipStreamSynchronize", "hipDeviceSynchronize")


def _device_kind(name: str, activity: str) -> str:
    low = name.lower()
    if "memcpy" in activity or low.startswith("memcpy"):
        return "memcpy"
    if "memset" in activity or low.startswith("memset"):
        return "memset"
    return "kernels" if activity in ("", "kernel", "concurrent_kernel") else "other_device"


def profile_counts(step, device: torch.device) -> dict:
    """Counts over one ``step()`` (see the module docstring); ``kernels`` etc. are ``None`` on CPU."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile, record_function

    out = step()
    del out
    timing.sync(device)
    t0 = time.perf_counter()
    out = step()
    host_ms = (time.perf_counter() - t0) * 1e3
    del out
    timing.sync(device)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        with record_function(MARK):
            out = step()
            del out
        timing.sync(device)
    evs = list(prof.events())
    spans = [ev.time_range for ev in evs if ev.name == MARK and ev.device_type == DeviceType.CPU]
    lo, hi = (spans[0].start, spans[0].end) if spans else (-math.inf, math.inf)
    # record_function ranges (ours, inductor's) are recorded on the host and mirrored on the device: never kernels
    ranges = {MARK} | {ev.name for ev in evs if getattr(ev, "is_user_annotation", False)}
    c = Counter()
    for ev in evs:
        name = ev.name
        at = str(getattr(ev, "activity_type", None) or "").lower()  # kineto's kind, where torch records it
        if name in ranges or "annotation" in at:
            continue
        if ev.device_type != DeviceType.CPU:  # device side: every kernel of the profile is the step's
            c[_device_kind(name, at)] += 1
            continue
        if not lo <= ev.time_range.start <= hi:  # host side: only inside the step (not our own final sync)
            continue
        if name in LAUNCH_NAMES:
            c["launch_calls"] += 1
        elif name in SYNC_NAMES:
            c["sync_calls"] += 1
        elif name == "aten::_local_scalar_dense":
            c["local_scalar_dense"] += 1
    res = {k: c.get(k, 0) for k in ("kernels", "memcpy", "memset", "other_device", "launch_calls", "sync_calls",
                                   "local_scalar_dense")}
    res["syncs"] = max(res["sync_calls"], res["local_scalar_dense"])
    res["host_ms"] = round(host_ms, 3)
    res["marked"] = bool(spans)
    if device.type != "cuda":  # no device activity to count on CPU
        for k in ("kernels", "memcpy", "memset", "other_device", "launch_calls", "sync_calls", "syncs"):
            res[k] = None
    return res


# ------------------------------------------------------------------------------------------------ launch sweep
def _settings(tl):
    """``[(label, params)]``: the current ``LAUNCH`` (unless a SWEEP entry equals it) and every SWEEP entry."""
    cur = dict(tl.LAUNCH)
    out = []
    sweep = list(getattr(tl, "SWEEP", []))
    if not any({**cur, **dict(e)} == cur for e in sweep):
        out.append(("LAUNCH", {}))
    out += [(f"SWEEP[{i}]", dict(e)) for i, e in enumerate(sweep)]
    return out, cur


def launch_sweep(w, shared, backend: str, device: torch.device, deadline, copy_bw: Optional[float] = None,
                 flush=None, rep_budget_s: float = 0.2, need_s: float = 4.0, log=print) -> dict:
    """Rows ``{setting, params, N, V, op, status, median_ms, ..., bw_frac}`` for one shape (see module docstring)."""
    from rlsd_kernels import token_logprobs

    from . import contenders
    from .grid import own_views

    try:
        from rlsd_kernels.backends import triton_launch as tl
    except Exception as e:  # noqa: BLE001
        return {"status": "skipped", "reason": f"rlsd_kernels.backends.triton_launch: {type(e).__name__}: {e}",
                "rows": []}
    settings, cur = _settings(tl)
    plain = shared[0]
    rows = []
    for label, params in settings:
        for op, passes in (("rlsd fwd+bwd", 3), ("token_logprobs fwd", 1)):
            row = {"setting": label, "params": {**cur, **params}, "N": w.N, "V": w.V, "op": op, "backend": backend}
            rows.append(row)
            if not deadline.allows(need_s):
                row.update(status="skipped", reason=deadline.reason(need_s))
                continue
            inp = own_views(plain)
            try:
                with tl.override(**params):
                    if op.startswith("rlsd"):
                        runner = contenders.factory(f"rlsd[{backend}]")(inp, w)
                        step = (lambda: worker.run_step(runner, "fwd+bwd"))
                    else:
                        def step(z=inp.student, y=inp.labels):
                            with torch.no_grad():
                                return token_logprobs(z, y)
                    t0 = time.perf_counter()
                    out = step()  # first call: Triton compiles this setting
                    del out
                    timing.sync(device)
                    row["first_call_s"] = round(time.perf_counter() - t0, 3)
                    row.update(timing.time_fn(step, device, budget_s=rep_budget_s, flush=flush))
                nbytes = passes * w.N * w.V * w.itemsize
                row.update(status="ok", bytes_model=nbytes, achieved_gbps=nbytes / (row["median_ms"] * 1e-3) / 1e9)
                row["bw_frac"] = row["achieved_gbps"] * 1e9 / copy_bw if copy_bw else None
                log(f"  sweep {w.N}x{w.V} {label} {op}: {row['median_ms']:.3f} ms")
            except Exception as e:  # noqa: BLE001 -- e.g. a key the kernels reject, or out of memory
                row.update(status="oom" if timing.is_oom(e) else "error", reason=f"{type(e).__name__}: {str(e)[:300]}")
            runner = inp = step = None  # noqa: F841
            timing.free_memory(device, collect=row["status"] != "ok")
    return {"status": "ok", "rows": rows}


def sweep_summary(rows: list) -> dict:
    """Fastest setting per (shape, op), and overall: the smallest geometric mean of time / best time over the
    (shape, op) pairs that every counted setting completed."""
    ok = [r for r in rows if r.get("status") == "ok"]
    best = {}
    for r in ok:
        k = (r["N"], r["V"], r["op"])
        if k not in best or r["median_ms"] < best[k]["median_ms"]:
            best[k] = r
    per = [{"N": k[0], "V": k[1], "op": k[2], "fastest": r["setting"], "median_ms": r["median_ms"],
            "params": r["params"]} for k, r in sorted(best.items())]
    score = {}
    for s in {r["setting"] for r in ok}:
        mine = {(r["N"], r["V"], r["op"]): r["median_ms"] for r in ok if r["setting"] == s}
        if set(mine) == set(best):
            score[s] = math.exp(sum(math.log(mine[k] / best[k]["median_ms"]) for k in best) / len(best))
    overall = min(score, key=score.get) if score else None
    params = next((r["params"] for r in ok if r["setting"] == overall), None)
    return {"per_case": per, "overall": overall, "overall_params": params,
            "geomean_vs_best": {k: round(v, 4) for k, v in sorted(score.items())}}


def fastest_setting(rows: list, op: str = "rlsd fwd+bwd"):
    """The setting with the smallest geometric mean of ``time / best time`` for ``op`` over the shapes that every
    counted setting completed: ``{"setting", "params", "geomean_vs_best"}``, or None without a complete row."""
    ok = [r for r in rows if r.get("status") == "ok" and r["op"] == op]
    best = {}
    for r in ok:
        k = (r["N"], r["V"])
        best[k] = min(best.get(k, float("inf")), r["median_ms"])
    score = {}
    for s in {r["setting"] for r in ok}:
        mine = {(r["N"], r["V"]): r["median_ms"] for r in ok if r["setting"] == s}
        if best and set(mine) == set(best):
            score[s] = math.exp(sum(math.log(mine[k] / best[k]) for k in best) / len(best))
    if not score:
        return None
    top = min(score, key=score.get)
    params = next(r["params"] for r in ok if r["setting"] == top)
    return {"setting": top, "params": params, "geomean_vs_best": round(score[top], 4)}
