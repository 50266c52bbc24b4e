"""Eager PyTorch reference of the RLSD loss (docs/math.md sections 2, 2b and 3): the single source of truth.

Every fused backend is tested against these functions evaluated in float64. They are also the "eager baseline"
of the benchmarks: full-vocabulary ``log_softmax`` for student and teacher, gather, weights, PPO loss, autograd.

The per-token algebra is ``rlsd_kernels.loss`` (written once, run here under autograd); this module adds the
full-vocabulary log-softmax that every RL framework runs today.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from ._inputs import check_scoring, check_terms, prepare
from ._output import RLSDOutput
from .hyper import Hyper
from .loss import aggregate, loss_from_logprobs
from .loss_terms import DIVERGENCES, Terms, check_divergence, hyper_and_terms, loss_with_terms

__all__ = ["rlsd_loss_eager", "token_logprobs_eager", "opsd_loss"]


# ----------------------------------------------------------------------------------------------- log-probs
def _compute_dtype(logits: torch.Tensor, compute_dtype: Optional[torch.dtype]) -> torch.dtype:
    if compute_dtype is not None:
        return compute_dtype
    return torch.float64 if logits.dtype == torch.float64 else torch.float32


def _eager_logprobs(logits, labels_flat, temperature, ignore_index, compute_dtype, want_entropy):
    """Full-vocabulary log_softmax + gather: the N x V way every RL framework does it today."""
    V = logits.shape[-1]
    logp_all = torch.log_softmax(logits.to(compute_dtype) / temperature, dim=-1).reshape(-1, V)
    ignored = labels_flat == ignore_index
    idx = torch.where(ignored, 0, labels_flat).clamp(0, V - 1)
    logp = logp_all.gather(1, idx[:, None]).squeeze(1)
    acc = torch.float64 if compute_dtype == torch.float64 else torch.float32
    logp = torch.where(ignored, 0.0, logp.to(acc))
    entropy = None
    if want_entropy:
        with torch.no_grad():
            p = logp_all.exp()
            # p * logp is 0 * -inf = nan for -inf logits: those terms contribute 0 to the entropy.
            entropy = -torch.where(p > 0, p * logp_all, 0.0).sum(-1).to(acc)
    return logp, entropy


def token_logprobs_eager(logits, labels, temperature: float = 1.0, return_entropy: bool = False, *,
                         ignore_index: int = -100, compute_dtype: Optional[torch.dtype] = None):
    """Eager :func:`rlsd_kernels.token_logprobs`: log-prob of ``labels`` under ``softmax(logits / temperature)``; 0
    where ``labels == ignore_index``. ``compute_dtype`` as in :func:`rlsd_loss_eager`."""
    check_scoring(logits, labels, temperature, ignore_index)
    logp, ent = _eager_logprobs(logits, labels.reshape(-1).long(), temperature, ignore_index,
                                _compute_dtype(logits, compute_dtype), return_entropy)
    logp = logp.reshape(labels.shape)
    return (logp, ent.reshape(labels.shape)) if return_entropy else logp


# ------------------------------------------------------------------------------------------ full losses
def rlsd_loss_eager(student_logits, teacher_logits, labels, advantages, old_logprobs=None, mask=None, *,
                    teacher_logprobs=None, lam=1.0, eps_w=0.2, clip_low=0.2, clip_high=0.28, clip_dual=3.0,
                    loss_type="ppo", loss_agg_mode="token", norm=None, cu_seqlens=None, temperature=1.0,
                    ignore_index=-100, return_entropy=False, inplace_backward=False,
                    compute_dtype: Optional[torch.dtype] = None,
                    ref_logprobs=None, kl_coef=0.0, kl_type="k3",
                    rollout_logprobs=None, rollout_is=None, rollout_is_threshold=2.0, rollout_is_mode="truncate",
                    entropy_coef=0.0, distill_coef=0.0, distill_divergence="forward_kl", distill_beta=0.5,
                    distill_clip=None) -> RLSDOutput:
    """Eager RLSD loss with the signature of :func:`rlsd_kernels.rlsd_loss`.

    ``compute_dtype`` picks the dtype of the full-vocabulary log_softmax (default: float32, or float64 for
    float64 logits); ``inplace_backward`` is accepted for signature parity and ignored.

    The section 2c terms (KL to ``ref_logprobs``, rollout importance sampling, ``loss_type="gspo"``, the entropy
    bonus, the distillation term) are all off by default; with all of them off this is exactly section 2.
    """
    h, x = hyper_and_terms(lam, eps_w, clip_low, clip_high, clip_dual, loss_type, loss_agg_mode, norm, temperature,
                           ignore_index, kl_coef, kl_type, rollout_is, rollout_is_threshold, rollout_is_mode,
                           entropy_coef, distill_coef, distill_divergence, distill_beta, distill_clip)
    prep = prepare(student_logits, teacher_logits, labels, advantages, old_logprobs, mask, teacher_logprobs,
                   cu_seqlens, h)
    check_terms(x, prep.label_shape, prep.seq_ids is not None, student_logits.device, teacher_logits, teacher_logprobs,
                ref_logprobs, rollout_logprobs)
    cd = _compute_dtype(student_logits, compute_dtype)
    logp_s, ent = _eager_logprobs(student_logits, prep.labels, temperature, ignore_index, cd, return_entropy)
    logp_t = prep.teacher_logprobs
    if teacher_logits is not None:
        with torch.no_grad():
            logp_t, _ = _eager_logprobs(teacher_logits.detach(), prep.labels, temperature, ignore_index, cd, False)
    if logp_t is not None:
        logp_t = logp_t.to(logp_s.dtype)
    if not x.on:
        return loss_from_logprobs(logp_s, logp_t, prep, h, ent)
    entropy_t = distill_t = None
    if x.needs_full_distribution:
        entropy_t, distill_t = _full_distribution_terms(x, prep, student_logits, teacher_logits, temperature, cd,
                                                        logp_s.dtype)
    flat = lambda t: None if t is None else t.detach().reshape(-1).to(logp_s.dtype)  # noqa: E731
    return loss_with_terms(logp_s, logp_t, prep, h, x, ref=flat(ref_logprobs), rollout=flat(rollout_logprobs),
                           entropy_t=entropy_t, distill_t=distill_t, entropy=ent)


def row_entropy(logp_all):
    """Per-row entropy ``-sum_v p log p`` of full log-prob rows, differentiable (0 * log 0 = 0 with a finite
    gradient: ``dH/dz = -p (log p + H) / tau`` through the log_softmax)."""
    p = logp_all.exp()
    return -(p * torch.where(p > 0, logp_all, 0.0)).sum(-1)


def _kl(lp, lq):
    """KL(p || q) per row from log-probs; 0 * log 0 = 0 (value and gradient)."""
    p = lp.exp()
    return (p * torch.where(p > 0, lp - lq, 0.0)).sum(-1)


def row_divergence(ls, lt, divergence: str, beta: float, clip):
    """Section 2b ``D_t`` per row between the teacher's (``lt``) and the student's (``ls``) log-prob rows;
    gradient only through ``ls``; ``clip`` caps the value (zero gradient beyond it)."""
    if divergence == "forward_kl":
        d = _kl(lt, ls)
    elif divergence == "reverse_kl":
        d = _kl(ls, lt)
    else:
        # where both distributions are 0, M is 0: logsumexp over (-inf, -inf) would give a nan gradient (exp of
        # -inf - -inf) even though those entries are weighted by 0; take them out of the logsumexp
        none = (lt == float("-inf")) & (ls == float("-inf"))
        lm = torch.logsumexp(torch.stack([torch.where(none, 0.0, lt) + math.log(beta),
                                          torch.where(none, 0.0, ls) + math.log(1 - beta)]), dim=0)
        lm = torch.where(none, float("-inf"), lm)
        d = beta * _kl(lt, lm) + (1 - beta) * _kl(ls, lm)
    if clip is not None:
        d = torch.clamp(d, max=clip)  # beyond clip: value clip, zero gradient
    return d


def _full_distribution_terms(x: Terms, prep, student_logits, teacher_logits, temperature, cd, acc):
    """Per-token differentiable entropy and divergence from full log_softmax rows. Rows outside the mask are
    zeroed first, so whatever they hold (nan, -inf) never reaches a value or a gradient."""
    V = student_logits.shape[-1]
    rows = prep.valid[:, None]
    ls = torch.log_softmax(torch.where(rows, student_logits.reshape(-1, V).to(cd), 0.0) / temperature, -1)
    entropy_t = row_entropy(ls).to(acc) if x.entropy_coef > 0 else None
    distill_t = None
    if x.distill_coef > 0:
        lt = torch.log_softmax(torch.where(rows, teacher_logits.detach().reshape(-1, V).to(cd), 0.0) / temperature, -1)
        distill_t = row_divergence(ls, lt, x.distill_divergence, float(x.distill_beta), x.distill_clip).to(acc)
    return entropy_t, distill_t


OPSD_DIVERGENCES = DIVERGENCES


def opsd_loss(student_logits, teacher_logits, labels, mask=None, *, divergence="forward_kl", beta=0.5,
              clip=None, loss_agg_mode="token", norm=None, cu_seqlens=None, temperature=1.0, ignore_index=-100):
    """Pure on-policy self-distillation (docs/math.md section 2b): per-token divergence of full distributions.

    Gradient flows only into ``student_logits``. Returns ``(loss, per_token_divergence)``.
    """
    beta, clip = check_divergence(divergence, beta, clip)
    if teacher_logits is None:
        raise ValueError("teacher_logits is required for OPSD")
    h = Hyper(loss_agg_mode=loss_agg_mode, norm=norm, temperature=temperature, ignore_index=ignore_index)
    dummy_adv = torch.zeros(labels.shape, device=student_logits.device)
    prep = prepare(student_logits, teacher_logits, labels, dummy_adv, None, mask, None, cu_seqlens, h)
    V = student_logits.shape[-1]
    cd = _compute_dtype(student_logits, None)
    ls = torch.log_softmax(student_logits.to(cd) / temperature, -1).reshape(-1, V)
    lt = torch.log_softmax(teacher_logits.detach().to(cd) / temperature, -1).reshape(-1, V)
    d = row_divergence(ls, lt, divergence, beta, clip)
    loss = aggregate(d, prep.valid, h, prep.seq_ids, prep.num_seqs)
    return loss, d.detach().reshape(labels.shape)
