"""The docs/math.md section 8 grid of the GPU check, in one process: contenders, their correctness gate, one
shape's cases.

Contenders (``Entry``; ``name`` is a ``bench.contenders`` name, ``role`` what the tables call it):

| role | name | bytes the op must move (docs/math.md section 8), fwd / fwd+bwd |
|---|---|---|
| ours_rlsd | ``rlsd[<select_backend(device)>]`` (teacher logits) | 2 / 3 passes of N*V*itemsize (read z_S, z_T; write grad) |
| ours_grpo | ``grpo[...]`` (no teacher) | 1 / 2 passes (read z_S; write grad) |
| liger_rlsd | ``liger`` (GRPO loss + 2 selective log-softmax passes) | 2 / 3 (the same useful bytes as ours) |
| liger_grpo | ``liger_grpo`` | 1 / 2 |
| eager | ``eager`` (``rlsd_kernels.reference.rlsd_loss_eager``) | 2 / 3 |
| ours_inplace | ``rlsd[...]+inplace`` (fwd+bwd only: the forward is ours_rlsd's) | - / 3 |
| compile | ``compile[dynamic]`` (torch.compile of eager, compiled once) | 2 / 3 |

Every contender is first checked against the float32 reference on small inputs (loss and gradient, tolerances of
``bench.worker.TOL``; GRPO contenders against the reference at ``lam = 0``, which is GRPO); a contender that is wrong,
errors or cannot run is reported with that status at every shape and never timed.

One shape: one pair of ``(N + B) x V`` logits buffers (``workload.make_shared_inputs``) serves every contender. Per
contender and mode: a first call (its wall time is ``first_call_s``: Triton JIT, a torch.compile recompile), a
call for the peak memory above the inputs (whose wall time sets the number of reps), then ``time_fn``. A CUDA out-of-memory error is reported ``oom`` and the
memory freed; any other exception is ``error`` with the traceback's tail. Contenders that overwrite the logits
(in-place backward) run after the shape's hooks (profile, launch sweep), last.
"""
from __future__ import annotations

import time
import traceback
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Tuple

import torch

from . import contenders, timing, worker
from .workload import Inputs, Workload, make_inputs, make_shared_inputs

BOTH = ("fwd", "fwd+bwd")
RLSD_PASSES = {"fwd": 2, "fwd+bwd": 3}
GRPO_PASSES = {"fwd": 1, "fwd+bwd": 2}


@dataclass(frozen=True)
class Entry:
    name: str
    role: str
    modes: Tuple[str, ...] = BOTH
    grpo: bool = False  # no teacher: checked at lam = 0, GRPO byte count
    make: Optional[Callable] = None  # override of contenders.factory(name) (tests: fake contenders)

    @property
    def passes(self) -> dict:
        return GRPO_PASSES if self.grpo else RLSD_PASSES

    @property
    def mutates(self) -> bool:
        return self.name.endswith("+inplace")

    def factory(self):
        return self.make or contenders.factory(self.name)


ROLES = ("ours_rlsd", "ours_grpo", "liger_rlsd", "liger_grpo", "eager", "ours_inplace", "compile")


def entries(device: torch.device, roles=ROLES) -> List[Entry]:
    """The GPU check's contenders in run order (``roles`` selects)."""
    be = contenders.backends_for(device)[0]
    table = [
        Entry(f"rlsd[{be}]", "ours_rlsd"),
        Entry(f"grpo[{be}]", "ours_grpo", grpo=True),
        Entry("liger", "liger_rlsd"),
        Entry("liger_grpo", "liger_grpo", grpo=True),
        Entry("eager", "eager"),
        Entry(f"rlsd[{be}]+inplace", "ours_inplace", modes=("fwd+bwd",)),
        Entry("compile[dynamic]", "compile"),
    ]
    return [e for e in table if e.role in roles]


@dataclass
class GridConfig:
    device: torch.device
    dtype: torch.dtype = torch.bfloat16
    lam: float = 0.5
    seqs: int = 8
    rep_budget_s: float = 0.25  # timed reps per (case, mode): about this much wall time, 3 to 50 reps
    case_need_s: float = 5.0  # do not start a case with less time than this left
    copy_bw: Optional[float] = None  # bytes/s
    profile_shape: Optional[Tuple[int, int]] = None
    flush: Optional[timing.Flush] = None
    profile_fn: Optional[Callable] = None  # (step, device) -> dict (bench.probes.profile_counts)
    log: Callable[[str], None] = print
    first_call_s: dict = field(default_factory=dict)  # entry name -> wall time of its last first call

    def workload(self, N: int, V: int, lam: Optional[float] = None) -> Workload:
        return Workload(N=N, V=V, dtype=self.dtype, device=self.device, seqs=self.seqs,
                        lam=self.lam if lam is None else lam, adv="seq")


def _base(e: Entry, w: Workload) -> dict:
    return {"contender": e.name, "role": e.role, "N": w.N, "V": w.V, "dtype": str(w.dtype).replace("torch.", ""),
            "lam": 0.0 if e.grpo else w.lam, "status": "error", "reason": None, "modes": {}}


def _error(e: BaseException, stage: str) -> dict:
    if timing.is_oom(e):
        return {"status": "oom", "reason": f"out of memory during {stage}: {str(e).splitlines()[0][:200]}"}
    return {"status": "error", "reason": f"{stage}: {type(e).__name__}: {str(e)[:400]}",
            "traceback": traceback.format_exc()[-2000:]}


# ------------------------------------------------------------------------------------------------ correctness gate
def check(e: Entry, cfg: GridConfig, N: int, V: int) -> dict:
    """``{status: ok|wrong|skipped|oom|error, reason, check}`` of ``e`` on small inputs."""
    w = cfg.workload(N, V, lam=0.0 if e.grpo else None)
    res = {"contender": e.name, "role": e.role, "N": N, "V": V, "status": "error", "reason": None, "check": None}
    why = None if e.make else contenders.availability(e.name, cfg.device)
    if why is not None:
        return {**res, "status": "skipped", "reason": why}
    t0 = time.perf_counter()
    try:
        inp = make_inputs(w, contenders.layout(e.name))
        runner = e.factory()(inp, w)
        res["check"] = worker.check_runner(runner, inp, w)
        ok = res["check"]["ok"]
        res.update(status="ok" if ok else "wrong",
                   reason=None if ok else "loss or gradient differs from the float32 reference; not timed")
    except Exception as ex:  # noqa: BLE001 -- reported, never fatal
        res.update(_error(ex, "check"))
    res["seconds"] = round(time.perf_counter() - t0, 2)
    timing.free_memory(cfg.device, collect=True)
    return res


# ------------------------------------------------------------------------------------------------ one shape
def own_views(x: Inputs) -> Inputs:
    """Fresh leaves over the shared buffers: each contender sets requires_grad on its own views."""
    d = (lambda t: None if t is None else t.detach())
    return Inputs(d(x.student), d(x.teacher), x.labels, x.advantages, x.old_logprobs, d(x.student_buf),
                  d(x.teacher_buf))


def _timed_mode(runner, m: str, e: Entry, w: Workload, cfg: GridConfig, st_out: dict) -> None:
    step = (lambda: worker.run_step(runner, m))
    timing.sync(cfg.device)
    t0 = time.perf_counter()
    out = step()
    del out
    timing.sync(cfg.device)
    first = time.perf_counter() - t0
    cfg.first_call_s[e.name] = first
    t0 = time.perf_counter()
    peak = timing.peak_above(step, cfg.device)  # the second call: its wall time is the estimate for the reps
    est = time.perf_counter() - t0
    st = timing.time_fn(step, cfg.device, budget_s=cfg.rep_budget_s, flush=cfg.flush, est_s=est)
    nbytes = e.passes[m] * w.N * w.V * w.itemsize
    st.update(first_call_s=round(first, 3), peak_mem_bytes=peak, bytes_model=nbytes, passes=e.passes[m],
              achieved_gbps=nbytes / (st["median_ms"] * 1e-3) / 1e9)
    st["bw_frac"] = st["achieved_gbps"] * 1e9 / cfg.copy_bw if cfg.copy_bw else None
    st_out[m] = st


def run_grid_case(e: Entry, w: Workload, shared: Tuple[Inputs, Inputs], gate: dict, cfg: GridConfig, deadline) -> dict:
    res = _base(e, w)
    if gate["status"] != "ok":
        return {**res, "status": gate["status"], "reason": f"check: {gate.get('reason')}"}
    need = max(cfg.case_need_s, cfg.first_call_s.get(e.name, 0.0))
    if not deadline.allows(need):
        return {**res, "status": "skipped", "reason": deadline.reason(need)}
    plain, liger = shared
    inp = own_views(liger if contenders.layout(e.name) == "liger" else plain)
    stage = "setup"
    try:
        runner = e.factory()(inp, w)
        for m in e.modes:
            if not deadline.allows(need):
                res["modes_skipped"] = f"{m}: {deadline.reason(need)}"
                break
            stage = m
            _timed_mode(runner, m, e, w, cfg, res["modes"])
        res.update(status="ok" if res["modes"] else "skipped",
                   reason=None if res["modes"] else res.get("modes_skipped"))
        if cfg.profile_fn and cfg.profile_shape == (w.N, w.V) and res["modes"] and deadline.allows(need):
            stage = "profile"
            try:
                res["profile"] = cfg.profile_fn(lambda: worker.run_step(runner, "fwd+bwd"), cfg.device)
            except Exception as ex:  # noqa: BLE001 -- a profiler problem must not lose the timings
                if timing.is_oom(ex):
                    raise
                res["profile"] = {"error": f"{type(ex).__name__}: {str(ex)[:300]}"}
    except Exception as ex:  # noqa: BLE001 -- reported (oom / error), never fatal to the grid
        res.update(_error(ex, stage))
    runner = inp = None  # noqa: F841 -- drop the graph and the views before freeing
    timing.free_memory(cfg.device, collect=res["status"] in ("oom", "error"))
    return res


def run_shape(N: int, V: int, plan: List[Entry], gates: dict, cfg: GridConfig, deadline,
              hooks: List[Callable] = (), on_case: Callable[[dict], None] = lambda c: None) -> List[dict]:
    """Every entry of ``plan`` at ``(N, V)``; ``hooks(w, shared)`` run while the inputs exist, before the entries
    that overwrite the logits. Returns the cases (also passed one by one to ``on_case``)."""
    w = cfg.workload(N, V)
    cases: List[dict] = []

    def emit(c):
        cases.append(c)
        on_case(c)

    runnable = [e for e in plan if gates[e.name]["status"] == "ok"]
    need = cfg.case_need_s + 1.0
    if not (runnable or hooks) or not deadline.allows(need):  # no inputs needed
        for e in plan:
            emit(run_grid_case(e, w, None, gates[e.name], cfg, deadline) if e not in runnable else
                 {**_base(e, w), "status": "skipped", "reason": deadline.reason(need)})
        return cases
    t0 = time.perf_counter()
    try:
        shared = make_shared_inputs(w)
    except Exception as ex:  # noqa: BLE001
        err = _error(ex, f"inputs {N}x{V}")
        timing.free_memory(cfg.device, collect=True)
        for e in plan:
            emit({**_base(e, w), **err})
        return cases
    timing.sync(cfg.device)
    cfg.log(f"{N}x{V}: inputs {2 * shared[1].student_buf.numel() * w.itemsize / 2**30:.2f} GiB "
            f"in {time.perf_counter() - t0:.1f} s")
    ordered = [e for e in plan if not e.mutates] + [None] + [e for e in plan if e.mutates]
    for e in ordered:
        if e is None:
            for h in hooks:
                h(w, shared)
            continue
        c = run_grid_case(e, w, shared, gates[e.name], cfg, deadline)
        c["inputs_bytes"] = 2 * shared[1].student_buf.numel() * w.itemsize
        emit(c)
    shared = None  # noqa: F841
    timing.free_memory(cfg.device, collect=True)
    return cases
