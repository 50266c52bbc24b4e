"""Host (Python / torch dispatch) cost of one forward+backward of the fused ops on the Triton path.

On a GPU the fused loss is host-bound at small vocabularies (16384 x 32000 bf16: ~1.1 ms of host time per
forward+backward against ~0.75 ms of device time on one H200), so every microsecond of Python counts. This
benchmark isolates that host cost on any machine:

- **CPU (default)**: CPU tensors, the Triton backend forced (Triton's interpreter, ``TRITON_INTERPRET=1``), and
  every Triton kernel of ``backends/logits/triton_loss.py`` / ``triton.py`` replaced by a no-op launch. What remains
  is pure host overhead: validation, the ``torch.library`` custom-op dispatch, ``autograd.Function``, output
  allocation, ``RLSDOutput``, the benchmark contender's own call. Small shapes (default 16384 x 64) keep the
  allocations cheap. The outputs hold garbage (no kernel ran); only the time is meaningful.
- **CUDA** (``--device cuda``): the real kernels; each call starts on an idle device (synchronised before, not
  after), so the wall time of the call is what the host spends issuing it (launches are asynchronous).

Cases (the bench contenders' own calls, ``bench/contenders.py``, GPU-check workload: per-sequence advantages, old
log-probs, ``lam = 0.5``): ``rlsd`` (``rlsd[triton]``: with teacher logits), ``grpo`` (``grpo[triton]``: no teacher),
``token_logprobs`` (scoring: forward + ``autograd.grad`` of the log-probs), and ``rlsd_kl_entropy`` /
``rlsd_kl_entropy_composed``: ``rlsd_loss`` with a KL penalty (k3) and the entropy bonus through the Triton fused
rows (``backends/logits/triton_rows.py``) and, with them hidden, through the composed path they replaced;
``rlsd_gspo``: ``loss_type="gspo"``, which keeps the composed path (its sequence ratio is not token-local). ``aten ops``: the aten ops
dispatched in one forward+backward (outermost ``aten::`` events of ``torch.profiler``, those run inside the
custom ops included).

``python -m bench.host_overhead`` times this tree; ``--against /work/main`` also times another checkout (each tree in
its own subprocess, rounds alternating, best of all rounds) and prints the ratio. ``--profile rlsd`` prints the
cProfile top of one case.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
CASES = ("rlsd", "grpo", "token_logprobs", "rlsd_kl_entropy", "rlsd_kl_entropy_composed", "rlsd_gspo")


def _stub_kernels():
    """Replace every Triton kernel of the fused-loss and scoring backends by a launch that does nothing."""
    import importlib

    class _NoLaunch:
        def __init__(self, fn):
            self.fn = fn

        def __getitem__(self, grid):
            return _noop

    def _noop(*args, **kwargs):
        return None

    for name in ("rlsd_kernels.backends.logits.triton_loss", "rlsd_kernels.backends.logits.triton",
                 "rlsd_kernels.backends.logits.triton_terms"):
        mod = importlib.import_module(name)
        kernels = getattr(mod, "KERNELS", {})
        for attr, obj in list(vars(mod).items()):
            if any(obj is k for k in kernels.values()):
                setattr(mod, attr, _NoLaunch(obj))


def _runners(device, N: int, V: int, dtype):
    import torch

    from bench import contenders
    from bench.worker import run_step
    from bench.workload import Workload, make_inputs
    from rlsd_kernels import token_logprobs
    from rlsd_kernels.dispatch import force_backend

    w = Workload(N=N, V=V, dtype=dtype, device=torch.device(device), lam=0.5, adv="seq")
    steps = {}
    for case in ("rlsd", "grpo"):
        runner = contenders.factory(f"{case}[triton]")(make_inputs(w), w)
        steps[case] = (lambda r=runner: run_step(r, "fwd+bwd"))
    inp = make_inputs(w)
    z = inp.student.detach().requires_grad_(True)
    ones = torch.ones(inp.labels.shape, dtype=torch.float32, device=device)

    def score(z=z, y=inp.labels, ones=ones):
        with force_backend("triton"):
            logp = token_logprobs(z, y)
        return torch.autograd.grad(logp, z, ones)

    steps["token_logprobs"] = score

    import rlsd_kernels
    from bench.terms import fused_rows_hidden

    ref = (inp.old_logprobs + 0.1).detach()
    adv = inp.advantages

    def terms_step(composed: bool):
        x = inp.student.detach().requires_grad_(True)
        with force_backend("triton"), fused_rows_hidden(composed):
            out = rlsd_kernels.rlsd_loss(x, inp.teacher, inp.labels, adv, inp.old_logprobs, lam=0.5,
                                         ref_logprobs=ref, kl_coef=0.1, entropy_coef=0.01)
            out.loss.backward()
        return out

    def gspo_step():
        x = inp.student.detach().requires_grad_(True)
        with force_backend("triton"):
            out = rlsd_kernels.rlsd_loss(x, inp.teacher, inp.labels, adv, inp.old_logprobs, lam=0.5,
                                         loss_type="gspo")
            out.loss.backward()
        return out

    steps["rlsd_kl_entropy"] = lambda: terms_step(False)
    steps["rlsd_kl_entropy_composed"] = lambda: terms_step(True)
    steps["rlsd_gspo"] = gspo_step
    return steps


def _aten_ops(step) -> list:
    """The aten ops one ``step()`` dispatches, from ``torch.profiler``: outermost ``aten::`` events only (those
    inside our custom ops' host functions included, the ones an aten op calls itself not)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        out = step()
        del out
    ops = []
    for ev in prof.events():
        if not ev.name.startswith("aten::"):
            continue
        parent = ev.cpu_parent
        while parent is not None and not parent.name.startswith("aten::"):
            parent = parent.cpu_parent
        if parent is None:
            ops.append(ev.name[len("aten::"):])
    return ops


def _time(step, device, number: int, repeat: int) -> float:
    """Best over ``repeat`` rounds of the mean microseconds per call over ``number`` calls."""
    import torch

    cuda = device == "cuda"
    best = float("inf")
    for _ in range(repeat):
        if cuda:  # each call on an idle device: the wall time is the host's share
            total = 0.0
            for _ in range(number):
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                out = step()
                total += time.perf_counter() - t0
                del out
        else:
            t0 = time.perf_counter()
            for _ in range(number):
                out = step()
                del out
            total = time.perf_counter() - t0
        best = min(best, total / number * 1e6)
    return best


def measure(device: str, N: int, V: int, dtype_name: str, number: int, repeat: int) -> dict:
    import gc

    import torch

    from bench.workload import DTYPES

    if device == "cpu":
        _stub_kernels()
    steps = _runners(device, N, V, DTYPES[dtype_name])
    res = {}
    for case, step in steps.items():
        for _ in range(5):  # warm-up (Triton compiles on a GPU; caches fill)
            del_ = step()
            del del_
        ops = _aten_ops(step)
        gc.collect()
        gc.disable()
        try:
            us = _time(step, device, number, repeat)
        finally:
            gc.enable()
        res[case] = {"us": us, "aten_ops": len(ops), "ops": ops}
    return res


def _child(tree: str, args) -> dict:
    env = dict(os.environ, PYTHONPATH=tree)
    if args.device == "cpu":
        env["TRITON_INTERPRET"] = "1"
    cmd = [sys.executable, os.path.abspath(__file__), "--child", tree, "--device", args.device, "-N", str(args.N),
           "-V", str(args.V), "--dtype", args.dtype, "--number", str(args.number), "--repeat", str(args.repeat)]
    out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True, cwd=tree)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("-N", type=int, default=16384)
    p.add_argument("-V", type=int, default=64)
    p.add_argument("--dtype", default="bf16")
    p.add_argument("--number", type=int, default=200, help="calls per timed round")
    p.add_argument("--repeat", type=int, default=5, help="timed rounds per process (best is kept)")
    p.add_argument("--rounds", type=int, default=3, help="processes per tree, alternating between trees")
    p.add_argument("--against", default=None, help="another checkout (e.g. /work/main) to time the same way")
    p.add_argument("--profile", default=None, choices=CASES, help="print the cProfile top of one case")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.child is not None:  # one measurement in this process, the tree first on sys.path
        sys.path.insert(0, args.child)
        print(json.dumps(measure(args.device, args.N, args.V, args.dtype, args.number, args.repeat)))
        return

    tree = os.path.dirname(HERE)
    if args.profile:
        import cProfile
        import pstats

        if args.device == "cpu":
            os.environ["TRITON_INTERPRET"] = "1"
        sys.path.insert(0, tree)
        from bench.workload import DTYPES

        if args.device == "cpu":
            _stub_kernels()
        step = _runners(args.device, args.N, args.V, DTYPES[args.dtype])[args.profile]
        for _ in range(5):
            step()
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(args.number):
            step()
        prof.disable()
        pstats.Stats(prof).sort_stats("tottime").print_stats(30)
        return

    trees = [("this tree", tree)] + ([("against", os.path.abspath(args.against))] if args.against else [])
    best = {label: {} for label, _ in trees}
    for _ in range(args.rounds):
        for label, path in trees:
            for case, r in _child(path, args).items():
                prev = best[label].get(case)
                if prev is None or r["us"] < prev["us"]:
                    best[label][case] = r
    print(f"host time per forward+backward, device={args.device}"
          f"{' (Triton launches stubbed out)' if args.device == 'cpu' else ''}, N={args.N} V={args.V} {args.dtype},"
          f" best of {args.rounds} x {args.repeat} rounds of {args.number} calls")
    head = "| case |" + "".join(f" {label} us | aten ops |" for label, _ in trees)
    if args.against:
        head += " ratio (against / this) |"
    print(head)
    print("|---" * (1 + 2 * len(trees) + (1 if args.against else 0)) + "|")
    for case in CASES:
        row = f"| {case} |"
        for label, _ in trees:
            r = best[label][case]
            row += f" {r['us']:.1f} | {r['aten_ops']} |"
        if args.against:
            row += f" {best['against'][case]['us'] / best['this tree'][case]['us']:.2f}x |"
        print(row)


if __name__ == "__main__":
    main()
