"""Benchmark of the fused linear RLSD loss (hidden states + LM head, no logits) against materialising the logits.

Rows, each on the same inputs (student + teacher hidden states, one LM-head weight, RLSD with lam = 0.5):
- ``gemm``:        one ``h @ W.T`` product into a preallocated buffer (forward only): the matmul rate on this shape. The GEMM
                   floor of a forward+backward is 4 such products with a teacher (student and teacher logits,
                   d hidden, d weight), 3 without;
- ``eager``:       ``z = h @ W.T`` (student, with grad) and ``th @ W.T`` (teacher), then the eager reference loss
                   (``rlsd_kernels.reference.rlsd_loss_eager``: full-vocabulary log_softmax, gather, PPO, autograd);
- ``logits_op``:   the same explicit matmuls, then our fused logits-level op ``rlsd_kernels.rlsd_loss``;
- ``fused_linear``: ``rlsd_kernels.rlsd_linear_loss(h, W, ..., teacher_hidden=th)``: logits never materialised
                   (the teacher's log-probs in a walk of their own, then the student's walk with the whole scratch);
- ``fused_linear_stacked``: the same with that switched off (``chunked.TEACHER_WALK``): each chunk's student and
                   teacher rows stacked in one GEMM, so half the rows per chunk and twice the chunks;
- ``fused_linear_terms``: ``fused_linear`` with two section 2c terms, a KL penalty (k3, to reference log-probs)
                   and the entropy bonus: token-local, so one walk over the chunks (four GEMMs);
- ``fused_linear_terms_2walk``: the same with the one walk switched off (``rlsd_kernels.linear.ONE_WALK_TERMS``):
                   statistics, then the gradient in the backward (five GEMMs), as GSPO still runs;
- ``fused_linear_grpo`` / ``liger_grpo``: the GRPO work (lam = 0, no teacher, DAPO token-mean, clip 0.2 / 0.28,
                   sequences of ``SEQ_LEN`` tokens with one advantage each) through ``rlsd_linear_loss`` and through
                   Liger-Kernel's ``LigerFusedLinearGRPOLoss`` (beta = 0, its defaults otherwise; CUDA only, where
                   liger-kernel is installed): the comparison Liger supports.

Each (row, shape) runs in its own subprocess, so that peak memory is that case's alone: on CPU, the growth of the
peak resident set (``ru_maxrss``) over the resident set once the inputs exist; on GPU,
``torch.cuda.max_memory_allocated`` over the allocation once the inputs exist. Times are medians of ``--reps``
runs after one warm-up: forward (loss only, no graph kept) and forward + backward (gradients for h, W).

Usage::

    python -m bench.linear                    # CPU: small shapes; CUDA: the GPU shapes below
    python -m bench.linear --shapes 2048x256x32000 --dtype float32 --reps 3
    python -m bench.linear --device cuda      # N x H x V in {4096, 16384} x 4096 x {128256, 151936}, bf16

Results go to ``bench/results/linear-<device>.json`` and ``.md``. The GPU check (``bench.gpu_check``) runs the
same rows in its own process instead (:func:`run_in_process`).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import resource
import subprocess
import sys
import time
from pathlib import Path

ROWS = ("gemm", "eager", "logits_op", "fused_linear", "fused_linear_stacked", "fused_linear_terms",
        "fused_linear_terms_2walk", "fused_linear_grpo", "liger_grpo")
# the A/B pairs: each row's fwd+bwd over its partner's ("vs A/B")
AB = {"fused_linear": "fused_linear_stacked", "fused_linear_terms": "fused_linear_terms_2walk"}
# rows whose chunks hold student and teacher rows together (the others: one stream per chunk)
TWO_STREAMS = ("fused_linear_stacked", "fused_linear_terms_2walk")
TERMS = dict(kl_coef=0.1, kl_type="k3", entropy_coef=0.01)  # the fused_linear_terms rows' section 2c terms
SEQ_LEN = 512  # tokens per sequence of the GRPO rows (N must be a multiple)
CPU_SHAPES = ["2048x256x32000", "512x128x151936"]
GPU_SHAPES = [f"{n}x4096x{v}" for v in (128256, 151936) for n in (4096, 16384)]
RESULTS = Path(__file__).resolve().parent / "results"


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _maxrss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def _case(row: str, shape: str, dtype_name: str, device: str, reps: int) -> dict:
    """Runs in the child process: one row on one shape; returns times and peak memory."""
    import torch

    import rlsd_kernels
    from rlsd_kernels import reference
    from rlsd_kernels.dispatch import select_backend
    from rlsd_kernels.linear import linear_backend
    from rlsd_kernels.backends.linear.chunked import rows_per_chunk

    N, H, V = (int(x) for x in shape.split("x"))
    dt = getattr(torch, dtype_name)
    dev = torch.device(device)
    cuda = dev.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    def make(N, H, V):
        g = torch.Generator(device=dev).manual_seed(0)
        # created directly in their dtype (no float32 temporaries that would inflate the CPU peak before the baseline)
        h = torch.randn(N, H, device=dev, dtype=dt, generator=g).requires_grad_()
        th = torch.randn(N, H, device=dev, dtype=dt, generator=g)
        w = (torch.randn(V, H, device=dev, dtype=dt, generator=g) * H ** -0.5).requires_grad_()
        labels = torch.randint(0, V, (N,), device=dev, generator=g)
        adv = torch.randn(N, device=dev, generator=g)
        kw = dict(lam=0.5)
        grpo = dict(lam=0.0, clip_low=0.2, clip_high=0.28)
        seq_adv = adv[::SEQ_LEN].contiguous()
        ref = torch.randn(N, device=dev, generator=g) - math.log(V)  # reference log-probs near a uniform policy

        out_buf = torch.zeros(N, V, device=dev, dtype=dt) if row == "gemm" else None  # touched: in the baseline

        def loss():
            if row == "gemm":  # into a buffer allocated once: the product alone, no first-touch of fresh memory
                return torch.mm(h, w.T, out=out_buf)
            if row in ("fused_linear", "fused_linear_stacked"):
                from rlsd_kernels.backends.linear import chunked

                saved, chunked.TEACHER_WALK = chunked.TEACHER_WALK, row == "fused_linear"
                try:
                    return rlsd_kernels.rlsd_linear_loss(h, w, labels, adv, teacher_hidden=th, **kw).loss
                finally:
                    chunked.TEACHER_WALK = saved
            if row.startswith("fused_linear_terms"):
                import rlsd_kernels.linear as lin

                saved, lin.ONE_WALK_TERMS = lin.ONE_WALK_TERMS, row == "fused_linear_terms"
                try:  # (the two-walk backward does not read the switch)
                    return rlsd_kernels.rlsd_linear_loss(h, w, labels, adv, teacher_hidden=th, ref_logprobs=ref,
                                                         **kw, **TERMS).loss
                finally:
                    lin.ONE_WALK_TERMS = saved
            if row == "fused_linear_grpo":
                return rlsd_kernels.rlsd_linear_loss(h.view(-1, SEQ_LEN, H), w, labels.view(-1, SEQ_LEN), seq_adv,
                                                     **grpo).loss
            if row == "liger_grpo":
                return liger(h.view(-1, SEQ_LEN, H), w, labels.view(-1, SEQ_LEN),
                             torch.ones(labels.numel() // SEQ_LEN, SEQ_LEN, device=dev), seq_adv)[0]
            z = h @ w.T
            with torch.no_grad():
                zt = th @ w.T
            fn = reference.rlsd_loss_eager if row == "eager" else rlsd_kernels.rlsd_loss
            return fn(z, zt, labels, adv, **kw).loss

        def fwd():
            with torch.no_grad():
                loss()

        def fwd_bwd():
            if row == "gemm":  # a forward-only row
                return fwd()
            h.grad = w.grad = None
            loss().backward()
            h.grad = w.grad = None

        return fwd, fwd_bwd

    def skipped(why):
        return dict(row=row, shape=shape, dtype=dtype_name, device=device, status="skipped", error=why)

    if row == "liger_grpo":
        if not cuda:
            return skipped("Liger's fused linear GRPO loss runs on CUDA only")
        try:
            from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss
        except ImportError as e:
            return skipped(f"liger-kernel not installed ({e})")
        liger = LigerFusedLinearGRPOLoss(beta=0.0, use_ref_model=False, epsilon_low=0.2, epsilon_high=0.28,
                                         loss_type="dapo")
    if row.endswith("grpo") and N % SEQ_LEN:
        return skipped(f"N={N} is not a multiple of SEQ_LEN={SEQ_LEN}")
    # warm-up on a tiny copy of the case: lazy imports, op registration, kernel compilation happen before the baseline
    for f in make(SEQ_LEN, min(H, 64), min(V, 512)):
        f()
    fwd, fwd_bwd = make(N, H, V)
    # warm-up of the runtime itself (thread pools, allocator, BLAS buffers) before the memory baseline
    (torch.ones(64, 64, device=dev) @ torch.ones(64, 64, device=dev)).sum().item()
    sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _rss_bytes()
        floor = _maxrss_bytes()
    fwd_bwd()  # first call: measured for memory (also the warm-up of the timings)
    sync()
    if cuda:
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = _maxrss_bytes() - base

    def median(fn):
        ts = []
        for _ in range(reps):
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            ts.append(time.perf_counter() - t0)
        return sorted(ts)[len(ts) // 2]

    t_fwd = median(fwd)
    t_fb = median(fwd_bwd)
    out = dict(row=row, shape=shape, N=N, H=H, V=V, dtype=dtype_name, device=device,
               fwd_ms=t_fwd * 1e3, fwd_bwd_ms=t_fb * 1e3, peak_mem_mib=peak / 2 ** 20,
               logits_mib=N * V * torch.tensor([], dtype=dt).element_size() / 2 ** 20,
               logits_backend=select_backend(dev), linear_backend=linear_backend(dev),
               chunk_rows=rows_per_chunk(N, V, 2 if row in TWO_STREAMS else 1, torch.tensor([], dtype=dt).element_size()))
    if not cuda:  # ru_maxrss never decreases: a case peaking below this floor is over-estimated, never under-
        out["rss_floor_mib"] = max(0, floor - base) / 2 ** 20
    elif row in ("fused_linear", "fused_linear_stacked", "logits_op"):  # where the time goes (results JSON only)
        try:
            from .probes import kernel_breakdown

            out["kernels"] = kernel_breakdown(fwd_bwd)
        except Exception as e:  # noqa: BLE001 -- a profiler problem must not cost the row
            out["kernels_error"] = f"{type(e).__name__}: {str(e)[:200]}"
    return out


def run_in_process(shape: str, dtype: str, device: str, reps: int, rows=ROWS, deadline=None,
                   need_s: float = 30.0, log=print) -> list:
    """Every row of ``shape`` in this process (the GPU check: no start-up per case; peak memory is still each
    row's own, since ``_case`` measures it above what is allocated once its inputs exist, and every row's tensors
    are freed before the next). Out of memory is recorded, as in the subprocess design."""
    import gc

    import torch

    out = []
    for row in rows:
        base = dict(row=row, shape=shape, dtype=dtype, device=device)
        if deadline is not None and not deadline.allows(need_s):
            out.append({**base, "status": "skipped", "error": deadline.reason(need_s)})
            continue
        t0 = time.perf_counter()
        try:
            r = _case(row, shape, dtype, device, reps)
            r.setdefault("status", "ok")
        except Exception as e:  # noqa: BLE001 -- recorded, the check goes on
            oom = isinstance(e, getattr(torch, "OutOfMemoryError", MemoryError)) or "out of memory" in str(e)
            r = {**base, "status": "oom" if oom else "error", "error": f"{type(e).__name__}: {str(e)[:300]}"}
        r["wall_s"] = round(time.perf_counter() - t0, 2)
        out.append(r)
        log(f"linear {shape} {row}: " + (f"fwd+bwd {r['fwd_bwd_ms']:.1f} ms, peak {r['peak_mem_mib']:.0f} MiB"
                                         if r["status"] == "ok" else f"{r['status']}: {r['error'][:120]}"))
        gc.collect()
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    return out


def _device_slug(device: str) -> str:
    if device.startswith("cuda"):
        import torch

        name = torch.cuda.get_device_name(torch.device(device))
        return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    return "cpu"


GEMM_PRODUCTS = {"fused_linear": 4, "fused_linear_stacked": 4, "logits_op": 4, "eager": 4, "fused_linear_terms": 4, "fused_linear_terms_2walk": 5,
                 "fused_linear_grpo": 3, "liger_grpo": 3}
TARGET_VS_LOGITS_OP = {"cpu": 1.2, "cuda": 1.15}  # docs/math.md section 8 / the fused-linear targets


def derived(results: list) -> list:
    """Per row of each shape, the ratios the targets are stated in: ``vs_logits_op`` (fused_linear fwd+bwd over
    "GEMM logits + our op"), ``gemm_floor_frac`` (the GEMM floor, 4 or 3 ``gemm`` products, over the row's
    fwd+bwd), ``vs_liger`` (fused_linear_grpo over liger_grpo). Rows that did not run get none."""
    by = {(r["shape"], r["row"]): r for r in results if "fwd_bwd_ms" in r}
    out = []
    for r in results:
        r = dict(r)
        if "fwd_bwd_ms" in r:
            gemm = by.get((r["shape"], "gemm"))
            if gemm and r["row"] in GEMM_PRODUCTS:
                r["gemm_floor_frac"] = GEMM_PRODUCTS[r["row"]] * gemm["fwd_ms"] / r["fwd_bwd_ms"]
            base = by.get((r["shape"], "logits_op"))
            if base and r["row"] == "fused_linear":
                r["vs_logits_op"] = r["fwd_bwd_ms"] / base["fwd_bwd_ms"]
            partner = by.get((r["shape"], AB.get(r["row"])))
            if partner:
                r["vs_ab"] = r["fwd_bwd_ms"] / partner["fwd_bwd_ms"]
            liger = by.get((r["shape"], "liger_grpo"))
            if liger and r["row"] == "fused_linear_grpo":
                r["vs_liger"] = r["fwd_bwd_ms"] / liger["fwd_bwd_ms"]
        out.append(r)
    return out


def _ratio(r, key):
    return f"{r[key]:.2f}" if key in r else "-"


def _markdown(results: list, device: str, slug: str, command: str) -> str:
    lines = [f"# Fused linear RLSD benchmark ({slug})", "",
             f"`{command}`; {platform.platform()}; torch threads as default.", "",
             "N x H x V | dtype | row | fwd ms | fwd+bwd ms | vs logits_op | GEMM floor | vs liger | vs A/B | "
             "peak extra MiB | N x V logits MiB | chunk rows | backends",
             "---|---|---|---|---|---|---|---|---|---|---|---|---"]
    for r in derived(results):
        if "error" in r or "fwd_ms" not in r:
            lines.append(f"{r['shape']} | {r['dtype']} | {r['row']} | {r.get('error', '?')[:90]} "
                         "| | | | | | | | | |")
            continue
        fb = "-" if r["row"] == "gemm" else f"{r['fwd_bwd_ms']:.1f}"
        lines.append(f"{r['shape']} | {r['dtype']} | {r['row']} | {r['fwd_ms']:.1f} | {fb} | "
                     f"{_ratio(r, 'vs_logits_op')} | "
                     + (f"{100 * r['gemm_floor_frac']:.0f}%" if "gemm_floor_frac" in r else "-")
                     + f" | {_ratio(r, 'vs_liger')} | {_ratio(r, 'vs_ab')} | {r['peak_mem_mib']:.0f} | "
                     f"{r['logits_mib']:.0f} | "
                     f"{r.get('chunk_rows', '-')} | logits={r['logits_backend']}, linear chunks={r['linear_backend']}")
    lines += ["", "vs logits_op: fused_linear fwd+bwd over `h @ W.T` + our logits op (target <= "
              f"{TARGET_VS_LOGITS_OP['cpu']} on CPU, <= {TARGET_VS_LOGITS_OP['cuda']} on CUDA). GEMM floor: 4 (RLSD) or "
              "3 (GRPO; 5 for the two walks) times the `gemm` row's one product, over the row's fwd+bwd. vs liger: fused_linear_grpo over "
              "Liger's fused linear GRPO loss on the same GRPO work. vs A/B: fused_linear over fused_linear_stacked (student and "
              "teacher rows stacked per chunk), fused_linear_terms (KL k3 + entropy bonus, one walk) over "
              "fused_linear_terms_2walk (the same terms in two walks). peak extra: CPU = growth of peak RSS over the "
              "RSS with the inputs allocated (one fwd+bwd); GPU = max_memory_allocated over the allocation with the "
              "inputs.", ""]
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    ap.add_argument("--shapes", nargs="*", default=None, help="NxHxV ... (default: per device)")
    ap.add_argument("--dtype", default=None, help="float32 / bfloat16 / float16 (default: cpu float32, cuda bf16)")
    ap.add_argument("--rows", nargs="*", default=list(ROWS), choices=ROWS)
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--_child", nargs=5, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args._child:
        row, shape, dtype, device, reps = args._child
        print("RESULT " + json.dumps(_case(row, shape, dtype, device, int(reps))))
        return 0

    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    gpu = device.startswith("cuda")
    shapes = args.shapes or (GPU_SHAPES if gpu else CPU_SHAPES)
    dtype = args.dtype or ("bfloat16" if gpu else "float32")
    reps = args.reps or (10 if gpu else 3)
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)  # real kernels only; the interpreter is for tests
    root = Path(__file__).resolve().parent.parent
    env["PYTHONPATH"] = str(root) + os.pathsep + env.get("PYTHONPATH", "")
    results = []
    for shape in shapes:
        for row in args.rows:
            cmd = [sys.executable, "-m", "bench.linear", "--_child", row, shape, dtype, device, str(reps)]
            p = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True)
            found = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
            if p.returncode == 0 and found:
                r = json.loads(found[-1][len("RESULT "):])
            else:  # e.g. out of memory: record it and go on
                tail = (p.stderr or p.stdout).strip().splitlines()[-1:] or ["?"]
                r = dict(row=row, shape=shape, dtype=dtype, device=device, error=tail[0])
            results.append(r)
            print(json.dumps(r), flush=True)
    slug = _device_slug(device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"linear-{slug}.json").write_text(json.dumps(derived(results), indent=1) + "\n")
    command = "python -m bench.linear " + " ".join(argv if argv is not None else sys.argv[1:])
    (out / f"linear-{slug}.md").write_text(_markdown(results, device, slug, command.strip()))
    print(f"wrote {out / f'linear-{slug}.json'} and .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
