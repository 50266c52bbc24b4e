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

from ._inputs import check_scoring, prepare
from ._output import RLSDOutput
from .hyper import Hyper
from .loss import aggregate, loss_from_logprobs

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
                    compute_dtype: Optional[torch.dtype] = None) -> RLSDOutput:
    """Eager RLSD loss with the signature of :func:`rlsd_kernels.rlsd_loss`.

    ``compute_dtype`` picks the dtype of the full-vocabulary log_softmax (default: float32, or float64 for
    float64 logits); ``inplace_backward`` is accepted for signature parity and ignored.
    """
    h = Hyper(lam, eps_w, clip_low, clip_high, clip_dual, loss_type, loss_agg_mode, norm, temperature, ignore_index)
    prep = prepare(student_logits, teacher_logits, labels, advantages, old_logprobs, mask, teacher_logprobs,
                   cu_seqlens, h)
    cd = _compute_dtype(student_logits, compute_dtype)
    logp_s, ent = _eager_logprobs(student_logits, prep.labels, temperature, ignore_index, cd, return_entropy)
    logp_t = prep.teacher_logprobs
    if teacher_logits is not None:
        with torch.no_grad():
            logp_t, _ = _eager_logprobs(teacher_logits.detach(), prep.labels, temperature, ignore_index, cd, False)
    if logp_t is not None:
        logp_t = logp_t.to(logp_s.dtype)
    return loss_from_logprobs(logp_s, logp_t, prep, h, ent)


OPSD_DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")


def opsd_loss(student_logits, teacher_logits, labels, mask=None, *, divergence="forward_kl", beta=0.5,
              clip=None, loss_agg_mode="token", norm=None, cu_seqlens=None, temperature=1.0, ignore_index=-100):
    """Pure on-policy self-distillation (docs/math.md section 2b): per-token divergence of full distributions.

    Gradient flows only into ``student_logits``. Returns ``(loss, per_token_divergence)``.
    """
    if divergence not in OPSD_DIVERGENCES:
        raise ValueError(f"divergence must be one of {OPSD_DIVERGENCES}, got {divergence!r}")
    if divergence == "jsd" and not (0.0 < float(beta) < 1.0):
        raise ValueError(f"beta must be in (0, 1) for jsd, got {beta}")
    if teacher_logits is None:
        raise ValueError("teacher_logits is required for OPSD")
    h = Hyper(loss_agg_mode=loss_agg_mode, norm=norm, temperature=temperature, ignore_index=ignore_index)
    dummy_adv = torch.zeros(labels.shape, device=student_logits.device)
    prep = prepare(student_logits, teacher_logits, labels, dummy_adv, None, mask, None, cu_seqlens, h)
    if clip is not None:
        clip = float(clip)
        if not math.isfinite(clip) or clip <= 0:
            raise ValueError(f"clip must be a positive finite number, got {clip}")
    V = student_logits.shape[-1]
    cd = _compute_dtype(student_logits, None)
    ls = torch.log_softmax(student_logits.to(cd) / temperature, -1).reshape(-1, V)
    lt = torch.log_softmax(teacher_logits.detach().to(cd) / temperature, -1).reshape(-1, V)

    def kl(lp, lq):  # KL(p || q) from log-probs, 0 * log 0 = 0
        p = lp.exp()
        return torch.where(p > 0, p * (lp - lq), 0.0).sum(-1)

    if divergence == "forward_kl":
        d = kl(lt, ls)
    elif divergence == "reverse_kl":
        d = kl(ls, lt)
    else:
        lm = torch.logsumexp(torch.stack([lt + math.log(beta), ls + math.log(1 - beta)]), dim=0)
        d = beta * kl(lt, lm) + (1 - beta) * kl(ls, lm)
    if clip is not None:
        d = torch.clamp(d, max=clip)  # beyond clip: value clip, zero gradient
    loss = aggregate(d, prep.valid, h, prep.seq_ids, prep.num_seqs)
    return loss, d.detach().reshape(labels.shape)
