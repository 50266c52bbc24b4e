"""Triton backend of ``ops/fused_rows.py``: the loss with its section 2c token-local terms (KL to a reference,
rollout IS with ``old_logprobs``, the entropy bonus, every distillation divergence) and its whole gradient in one
launch of the fused loss kernel (``triton_loss._loss_rows``): per row the statistics sweep, the epilogue with the
terms' factors, and the gradient sweep (3 passes over ``N x V`` for RLSD, 2 for GRPO). The composed path it replaces
for these terms runs the scoring kernel, the loss algebra under autograd and a separate gradient kernel (4 passes and
its autograd's launches).

The per-token inputs come from the Python algebra (``fused_rows.token_inputs``: aggregation weights less rollout
rejection, the IS weights, advantages, old / teacher / reference log-probs); the loss value and the metrics come
from the Python algebra on this launch's per-token outputs, as on the C++ backend. Forward and reverse KL keep their
cross sums in the statistics sweep; JSD sums ``p log(p / M)`` in a sweep of its own once both log-sum-exps are known;
a divergence's gradient sweep re-reads the teacher chunk.
"""
from __future__ import annotations

import torch

from ..triton_common import check_device
from . import alloc_row_outputs
from .triton_loss import N_ROWSTATS, N_TERM_PARTS, RowTerms, finalize, launch_rows

FUSED_ROWS_DIV_MODES = (0, 1, 2, 3)  # every distillation divergence (backends.logits.DIV_MODES)
# fused_rows(..., with_loss=True) also sums the loss and the metrics on the device (ops/fused_rows.py uses it)
FUSED_ROWS_LOSS = True
N_SUMMED_METRICS = 10  # loss.METRIC_NAMES' 7, then the KL, entropy and divergence means


def fused_rows(student, teacher, labels, temperature, ignore_index, want_entropy, div_mode, beta, tokens, hyper, out,
               with_loss: bool = False):
    """``cpp.fused_rows``' contract on the GPU: ``forward_terms``' outputs (``lse_t`` / ``div`` / ``aux`` None) and
    the gradient of the loss into ``out`` (a ``[B, T, V]`` view; may be ``student`` itself). ``tokens`` / ``hyper``:
    ``ops/fused_rows.token_inputs`` / ``hyper_args``; ``div_mode`` one of ``FUSED_ROWS_DIV_MODES``.

    ``with_loss``: three more outputs, from the kernel's per-row partials and one ``finalize`` launch instead of the
    Python algebra: the loss (0-d), the evidence weights ``[N]`` and ``N_SUMMED_METRICS`` masked means
    (``loss.METRIC_NAMES``, then the KL, entropy and clipped-divergence means; 0 where the term is off)."""
    check_device(student)
    if div_mode not in FUSED_ROWS_DIV_MODES:
        raise ValueError(f"the Triton fused rows take div_mode in {FUSED_ROWS_DIV_MODES}, got {div_mode}")
    from ...hyper import Hyper

    n = labels.numel()
    dev = student.device
    ent_on = bool(want_entropy) or hyper["entropy_coef"] > 0
    logp_s, logp_t, lse_s, ent = alloc_row_outputs(n, dev, teacher is not None, ent_on)
    lse_t = div = aux = None
    if div_mode:
        lse_t = torch.zeros(n, dtype=torch.float64, device=dev)
        div, aux = (torch.zeros(n, dtype=torch.float32, device=dev) for _ in range(2))  # aux: JSD's KL(p_S || M)
    f32 = dict(dtype=torch.float32, device=dev)
    summed = (torch.zeros((), **f32), torch.ones(n, **f32), torch.zeros(N_SUMMED_METRICS, **f32)) if with_loss else ()
    if n == 0:
        return (logp_s, logp_t, lse_s, ent, lse_t, div, aux) + summed
    # weights, coef, and the per-row partials (9 rows, summed only with_loss: then 12)
    scratch = torch.empty(2 + (N_TERM_PARTS if with_loss else N_ROWSTATS), n, **f32)
    h = Hyper(hyper["lam"], hyper["eps_w"], hyper["clip_low"], hyper["clip_high"], hyper["clip_dual"],
              "cispo" if hyper["cispo"] else "ppo", "token", None, temperature, ignore_index)
    terms = RowTerms(ref=tokens["ref"] if hyper["kl_coef"] > 0 else None, w_is=tokens["w_is"],
                     kl_coef=hyper["kl_coef"], kl_type=hyper["kl_type"] if hyper["kl_coef"] > 0 else 0,
                     entropy_coef=hyper["entropy_coef"], div_mode=div_mode,
                     distill_coef=hyper["distill_coef"] if div_mode else 0.0, distill_clip=hyper["distill_clip"],
                     beta=float(beta), lse_t=lse_t, div=div, aux=aux, in_mask=tokens.get("in_mask"))
    launch_rows(student, teacher, out, labels, tokens["agg"], tokens["adv"], tokens["old"], tokens["teacher_lp"],
                (logp_s, logp_t, scratch[0], ent, lse_s, scratch[1], scratch[2:]), h, terms)
    if with_loss:
        loss, weights, metrics = summed
        finalize(scratch[2:], loss, metrics)
        summed = (loss, scratch[0], metrics)
    return (logp_s, logp_t, lse_s, ent, lse_t, div, aux) + summed
