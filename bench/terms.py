"""Cost of each docs/math.md section 2c term over plain RLSD (one term on at a time), on the device's backend.

Every row is ``rlsd_loss`` forward + backward on the same inputs (the main bench's workload: student and teacher
logits, per-token advantages, old log-probs near the student's own; lam = 0.5, a 10% mask); ``plain`` has every term
off. Times are medians of ``--reps`` runs after
one warm-up, all rows interleaved rep by rep (so machine noise spreads over every row alike; the OPSD rows in a loop
of their own); the ratio is each row's median over ``plain``'s. The issue's CPU targets: at most 1.15x for every
term, 1.6x for JSD.

Usage::

    python -m bench.terms                       # CPU, float32, 4096 x 32000
    python -m bench.terms --shape 2048x151936 --reps 7

Also OPSD alone (``OPSD_ROWS``): the fused ``opsd_loss`` against the eager reference and, on CUDA, Liger's JSD.
Results: ``bench/results/terms-<device>.json`` and ``.md``.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import platform
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
ROWS = {
    "plain": {},
    "kl_k3": dict(kl_coef=0.1),
    "rollout_is_token": dict(rollout_is="token"),
    "rollout_is_sequence_mask": dict(rollout_is="sequence", rollout_is_mode="mask"),
    "gspo": dict(loss_type="gspo"),
    "entropy": dict(entropy_coef=0.01),
    "distill_forward_kl": dict(distill_coef=0.5),
    "distill_reverse_kl": dict(distill_coef=0.5, distill_divergence="reverse_kl"),
    "distill_jsd": dict(distill_coef=0.5, distill_divergence="jsd"),
}
TARGET = {"distill_jsd": 1.6}
# On the Triton backend these rows run once more, with its fused rows hidden ("<row>_composed": the scoring kernel, the
# algebra under autograd and a gradient kernel, which the fused rows replaced for them): the fused rows' own gain.
COMPOSED = ("kl_k3", "rollout_is_token", "rollout_is_sequence_mask", "entropy", "distill_forward_kl",
            "distill_reverse_kl", "distill_jsd")
DEFAULT_TARGET = 1.15
# OPSD alone (JSD, beta 0.5, token mean, no mask) three ways: the fused opsd_loss, the eager reference, and on CUDA
# log_softmax + Liger-Kernel's LigerJSD where it is installed; their ratio is to the eager row.
OPSD_ROWS = ("opsd_jsd", "opsd_jsd_eager", "opsd_jsd_liger")


def _inputs(N, V, device, dtype, seqs=8):
    """The main bench's workload (``bench/workload.py``: old log-probs = the student's own plus noise, so the PPO
    clip is active on a realistic share of tokens), plus a 10% mask and reference / rollout log-probs near ``old``.

    (Until 2026-11-27 this bench drew ``old`` uniformly in [-5, 0], unrelated to the policy: the PPO clip then
    zeroed the policy gradient of ~55% of the tokens, so ``plain`` skipped those rows' gradient sweep while every
    term that keeps a gradient there (entropy, distillation, KL) could not, which inflated their ratios.)"""
    import torch

    from .workload import Workload, make_inputs

    inp = make_inputs(Workload(N, V, dtype, torch.device(device), seqs=seqs))
    g = torch.Generator(device=device).manual_seed(0)
    B, T = inp.labels.shape
    r = lambda: torch.randn(B, T, generator=g, device=device)  # noqa: E731
    mask = torch.rand(B, T, generator=g, device=device) > 0.1
    ref = inp.old_logprobs + 0.3 * r()
    rollout = inp.old_logprobs + 0.1 * r()
    return inp.student, inp.teacher, inp.labels, inp.advantages, inp.old_logprobs, mask, ref, rollout


def run(shape: str, device: str, dtype_name: str, reps: int) -> list:
    import torch

    import rlsd_kernels
    from rlsd_kernels.dispatch import select_backend

    N, V = (int(x) for x in shape.split("x"))
    dtype = getattr(torch, dtype_name)
    s, t, labels, adv, old, mask, ref, rollout = _inputs(N, V, device, dtype)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)

    liger = None
    if device.startswith("cuda"):
        try:
            from liger_kernel.transformers.jsd import LigerJSD

            liger = LigerJSD(beta=0.5)
        except ImportError:
            pass

    def opsd(row):
        from rlsd_kernels import reference

        x = s.detach().requires_grad_()
        if row == "opsd_jsd":
            loss = rlsd_kernels.opsd_loss(x, t, labels, divergence="jsd").loss
        elif row == "opsd_jsd_eager":
            loss = reference.opsd_loss(x, t, labels, divergence="jsd")[0]
        else:
            V_ = x.shape[-1]
            loss = liger(torch.log_softmax(x.float().reshape(-1, V_), -1),
                         torch.log_softmax(t.float().reshape(-1, V_), -1))
        loss.backward()

    def call(kw):
        if isinstance(kw, str):
            return opsd(kw)
        x = s.detach().requires_grad_()
        extra = dict(kw)
        composed = extra.pop("_composed", False)
        if "kl_coef" in kw:
            extra["ref_logprobs"] = ref
        if "rollout_is" in kw:
            extra["rollout_logprobs"] = rollout
        with fused_rows_hidden(composed):
            out = rlsd_kernels.rlsd_loss(x, t, labels, adv, old, mask, lam=0.5, **extra)
            out.loss.backward()

    def timed(rows):
        times = {name: [] for name in rows}
        for name, kw in rows.items():  # warm-up (builds, JIT)
            call(kw)
        for _ in range(reps):
            for name, kw in rows.items():
                sync()
                t0 = time.perf_counter()
                call(kw)
                sync()
                times[name].append(time.perf_counter() - t0)
        return {k: sorted(v)[len(v) // 2] * 1e3 for k, v in times.items()}

    # two separate interleaved loops: the eager OPSD row allocates and frees GBs, and whichever row came after it
    # paid for fresh pages (plain did, which is why KL / IS / GSPO once measured 0.8-0.9x of it)
    rows = dict(ROWS)
    backend = select_backend(torch.device(device))
    if backend == "triton":
        rows.update({f"{k}_composed": dict(ROWS[k], _composed=True) for k in COMPOSED})
    med = timed(rows)
    med.update(timed({r: r for r in OPSD_ROWS if r != "opsd_jsd_liger" or liger is not None}))
    out = [dict(row=k, shape=shape, dtype=dtype_name, device=device, backend=backend, fwd_bwd_ms=med[k],
                vs_plain=med[k] / med["plain"],
                target=None if k == "plain" or k.endswith("_composed") else TARGET.get(k, DEFAULT_TARGET))
           for k in rows]
    out += [dict(row=k, shape=shape, dtype=dtype_name, device=device, backend=backend, fwd_bwd_ms=med[k],
                 vs_eager=med[k] / med["opsd_jsd_eager"]) for k in OPSD_ROWS if k in med]
    return out


@contextlib.contextmanager
def fused_rows_hidden(hide: bool):
    """The device backend's ``fused_rows`` hidden inside the block (``ops/fused_rows.serves`` then says no)."""
    fn = None
    if hide:
        from rlsd_kernels.backends.logits import triton as tk

        fn = getattr(tk, "fused_rows", None)
    if fn is not None:
        delattr(tk, "fused_rows")
    try:
        yield
    finally:
        if fn is not None:
            tk.fused_rows = fn


def markdown(rows: list, command: str) -> str:
    lines = [f"# Cost of the section 2c terms over plain RLSD ({rows[0]['device']}, {rows[0]['backend']} backend)", "",
             f"`{command}`; {platform.platform()}; medians, rows interleaved rep by rep (OPSD rows in a loop of "
             "their own).", "",
             "N x V | dtype | row | fwd+bwd ms | vs plain | target | met",
             "---|---|---|---|---|---|---"]
    for r in rows:
        if "vs_plain" not in r:
            continue
        met = "-" if r["target"] is None else ("yes" if r["vs_plain"] <= r["target"] else "**no**")
        lines.append(f"{r['shape']} | {r['dtype']} | {r['row']} | {r['fwd_bwd_ms']:.1f} | {r['vs_plain']:.2f} | "
                     f"{'-' if r['target'] is None else r['target']} | {met}")
    lines += ["", "OPSD alone (JSD, beta 0.5): the fused `opsd_loss`, the eager reference, and log_softmax + Liger's "
              "`LigerJSD` (CUDA, where installed)", "", "N x V | dtype | row | fwd+bwd ms | vs eager", "---|---|---|---|---"]
    lines += [f"{r['shape']} | {r['dtype']} | {r['row']} | {r['fwd_bwd_ms']:.1f} | {r['vs_eager']:.2f}"
              for r in rows if "vs_eager" in r]
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--shape", default="4096x32000", help="NxV")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args(argv)
    rows = run(args.shape, args.device, args.dtype, args.reps)
    for r in rows:
        print(json.dumps(r), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    slug = args.device.split(":")[0]
    command = "python -m bench.terms " + " ".join(argv if argv is not None else sys.argv[1:])
    (out / f"terms-{slug}.json").write_text(json.dumps(rows, indent=1) + "\n")
    (out / f"terms-{slug}.md").write_text(markdown(rows, command.strip()))
    print(f"wrote {out / f'terms-{slug}.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
