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
  ``N*V*itemsize``) and without one (GRPO, 2 passes), and ``token_logprobs`` forward (1 pass) for the settings that
  change the scoring kernels, at one shape. Every setting's loss and sampled gradient rows must agree with the first
  setting's, or the row is an error and the setting is never adopted. The rows are collected across shapes and
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


def kernel_breakdown(step, top: int = 12) -> list:
    """The device kernels of one ``step()`` on CUDA (after it has run once), by total device time:
    ``[{"name", "calls", "ms"}]``, the ``top`` largest. Where the time of a composed op goes (e.g. the fused linear
    op's GEMMs, its logits kernels and its float32 weight-gradient sums), for the next tuning session."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    total, calls = Counter(), Counter()
    for ev in prof.events():
        if ev.device_type != DeviceType.CPU:
            total[ev.name] += ev.time_range.elapsed_us()
            calls[ev.name] += 1
    return [{"name": name[:120], "calls": calls[name], "ms": round(us / 1e3, 3)} for name, us in total.most_common(top)]


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
    reference = {}  # op -> (loss, sampled gradient rows) of the first setting: every other one must agree
    for label, params in settings:
        scoring = any(k.startswith(("fwd_", "bwd_")) for k in params) or not rows
        ops = [("rlsd fwd+bwd", 3, "rlsd"), ("grpo fwd+bwd", 2, "grpo")]
        ops += [("token_logprobs fwd", 1, None)] if scoring else []  # only the fwd_/bwd_ keys change scoring
        for op, passes, kind in ops:
            row = {"setting": label, "params": {**cur, **params}, "N": w.N, "V": w.V, "op": op, "backend": backend}
            rows.append(row)
            if not deadline.allows(need_s):
                row.update(status="skipped", reason=deadline.reason(need_s))
                continue
            inp = own_views(plain)
            try:
                with tl.override(**params):
                    if kind:
                        runner = contenders.factory(f"{kind}[{backend}]")(inp, w)
                        step = (lambda: worker.run_step(runner, "fwd+bwd"))
                    else:
                        def step(z=inp.student, y=inp.labels):
                            with torch.no_grad():
                                return token_logprobs(z, y)
                    t0 = time.perf_counter()
                    out = step()  # first call: Triton compiles this setting
                    timing.sync(device)
                    row["first_call_s"] = round(time.perf_counter() - t0, 3)
                    if kind:
                        mismatch = _agrees(reference, op, out, w.N)
                        if mismatch:
                            row.update(status="error", reason=f"disagrees with {settings[0][0]}: {mismatch}")
                            continue
                    del out
                    row.update(timing.time_fn(step, device, budget_s=rep_budget_s, flush=flush))
                nbytes = passes * w.N * w.V * w.itemsize
                row.update(status="ok", bytes_model=nbytes, achieved_gbps=nbytes / (row["median_ms"] * 1e-3) / 1e9)
                row["bw_frac"] = row["achieved_gbps"] * 1e9 / copy_bw if copy_bw else None
                log(f"  sweep {w.N}x{w.V} {label} {op}: {row['median_ms']:.3f} ms")
            except Exception as e:  # noqa: BLE001 -- e.g. a key the kernels reject, or out of memory
                row.update(status="oom" if timing.is_oom(e) else "error", reason=f"{type(e).__name__}: {str(e)[:300]}")
            finally:
                out = runner = inp = step = None  # noqa: F841
                timing.free_memory(device, collect=row.get("status") != "ok")
    return {"status": "ok", "rows": rows}


def _agrees(reference: dict, op: str, out, n_rows: int) -> Optional[str]:
    """Compare a setting's (loss, gradient) with the first setting's (kept as the loss and 8 sampled gradient
    rows); ``None`` if they agree within float32 summation-order / one-bf16-ulp differences, else what differs.
    A fast setting that computes something else (a race, a wrong merge) must never be adopted."""
    loss, g = out
    picks = torch.linspace(0, n_rows - 1, 8).long().to(g.device)
    mine = (float(loss.detach()), g.detach().reshape(n_rows, -1).index_select(0, picks).float())
    if op not in reference:
        reference[op] = mine
        return None
    ref_loss, ref_g = reference[op]
    if not abs(mine[0] - ref_loss) <= 1e-4 * abs(ref_loss) + 1e-6:
        return f"loss {mine[0]!r} vs {ref_loss!r}"
    err = float((mine[1] - ref_g).abs().max())
    scale = float(ref_g.abs().max())
    if not err <= 1e-2 * scale + 1e-6:
        return f"gradient max abs diff {err:.3g} (max {scale:.3g})"
    return None


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


def fastest_setting(rows: list, ops=("rlsd fwd+bwd", "grpo fwd+bwd")):
    """The setting with the smallest geometric mean of ``time / best time`` for ``ops`` over the (shape, op) pairs
    that every counted setting completed: ``{"setting", "params", "geomean_vs_best"}``, or None without a complete
    row. A setting with any error row (e.g. one that disagrees with the defaults) is never chosen."""
    broken = {r["setting"] for r in rows if r.get("status") == "error"}
    ok = [r for r in rows if r.get("status") == "ok" and r["op"] in ops and r["setting"] not in broken]
    best = {}
    for r in ok:
        k = (r["N"], r["V"], r["op"])
        best[k] = min(best.get(k, float("inf")), r["median_ms"])
    score = {}
    for s in {r["setting"] for r in ok}:
        mine = {(r["N"], r["V"], r["op"]): r["median_ms"] for r in ok if r["setting"] == s}
        if best and set(mine) == set(best):
            score[s] = math.exp(sum(math.log(mine[k] / best[k]) for k in best) / len(best))
    if not score:
        return None
    top = min(score, key=score.get)
    params = next(r["params"] for r in ok if r["setting"] == top)
    return {"setting": top, "params": params, "geomean_vs_best": round(score[top], 4)}
