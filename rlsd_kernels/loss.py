"""The per-token algebra of the RLSD loss (docs/math.md sections 2 and 3), written once.

Everything here works on flat ``[N]`` vectors of per-token log-probs. Two users:

- the eager reference (``reference.py``) and the fused-linear op run it under autograd: ``loss_t`` is
  differentiable through ``logp_s``;
- the fused logits op on the CPU backends runs it without autograd and uses ``coef``, the explicit
  ``d loss_t / d logp_s`` of docs/math.md section 3, to form the gradient in one vocabulary sweep.

The Triton epilogue (``backends/triton_epilogue.py``) is the same algebra transcribed per row; tests check it, and
``coef``, against autograd through this module.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch

from ._output import RLSDOutput
from .hyper import Hyper


class TokenTerms(NamedTuple):
    loss_t: torch.Tensor      # per-token policy loss (differentiable when logp_s is)
    coef: torch.Tensor        # d loss_t / d logp_s, detached
    g: torch.Tensor           # token weight (1 - lam) + lam * clip(w), detached
    w: torch.Tensor           # unclipped evidence weight, detached
    delta: torch.Tensor       # logp_T - logp_S, detached
    clipped: torch.Tensor     # bool: the PPO clip is active (CISPO: ratio_c != ratio)
    dual: torch.Tensor        # bool: the dual clip is active
    log_ratio: torch.Tensor   # logp_S - old_logp, detached


def token_weights(logp_s, logp_t, advantages, lam: float, eps_w: float):
    """Evidence weight (section 2): ``(g, w, delta)``, all detached; ``sign(0) = 0`` gives ``w = 1``."""
    with torch.no_grad():
        delta = logp_t - logp_s
        sign = torch.sign(advantages)
        # sign(0) = 0 gives w = 1 even where delta is infinite (0 * inf would be nan)
        w = torch.exp(torch.where(sign == 0, 0.0, sign * delta))
        g = (1.0 - lam) + lam * w.clamp(1.0 - eps_w, 1.0 + eps_w)
    return g, w, delta


def _clamp(x, low: float, high: float):
    """``x.clamp(low, high)`` whose value and gradient stay NaN at a NaN input (torch.clamp's backward gives 0
    there, which would make a NaN row look masked); at the bounds the gradient passes, as torch.clamp's does."""
    return torch.where(x < low, low, torch.where(x > high, high, x))


def _inside(x, low, high):
    """1 where ``_clamp(x, low, high)`` passes the gradient (bounds included; NaN counts as inside), else 0."""
    return (~((x < low) | (x > high))).to(x.dtype)


def _weights_or_grpo(ls, logp_t, advantages, h: Hyper):
    """``(g, w, delta)`` of section 2; no teacher (``logp_t`` None) gives GRPO: g = w = 1, delta = 0."""
    if logp_t is not None:
        return token_weights(ls, logp_t.detach().to(ls.dtype), advantages, h.lam, h.eps_w)
    return torch.ones_like(advantages), torch.ones_like(advantages), torch.zeros_like(advantages)


def token_terms(logp_s, logp_t, advantages, old_logp, h: Hyper) -> TokenTerms:
    """Section 2 per token: weights, PPO (DAPO asymmetric + dual clip) or CISPO loss, and its explicit gradient.

    ``logp_t`` None means no teacher (GRPO: g = 1); ``old_logp`` None means on-policy (old = detach(logp_s)).
    Masked positions must already hold finite values (the caller zeroes them).
    """
    ls = logp_s.detach()
    g, w, delta = _weights_or_grpo(ls, logp_t, advantages, h)
    a_hat = advantages * g
    old = ls if old_logp is None else old_logp
    log_ratio = logp_s - old
    lo, hi = math.log(1.0 - h.clip_low), math.log(1.0 + h.clip_high)
    ratio = torch.exp(_clamp(log_ratio, -20.0, 20.0))
    ratio_c = torch.exp(_clamp(log_ratio, lo, hi))
    with torch.no_grad():
        lr = log_ratio.detach()
        d_ratio = ratio.detach() * _inside(lr, -20.0, 20.0)    # d ratio / d logp_s
        d_ratio_c = ratio_c.detach() * _inside(lr, lo, hi)     # d ratio_c / d logp_s
    if h.loss_type == "cispo":
        loss_t = -a_hat * ratio_c.detach() * logp_s
        with torch.no_grad():
            coef = -a_hat * ratio_c.detach()
            clipped = ratio_c.detach() != ratio.detach()
            dual = torch.zeros_like(clipped)
        return TokenTerms(loss_t, coef, g, w, delta, clipped, dual, lr)
    l1 = -a_hat * ratio
    l2 = -a_hat * ratio_c
    l3 = -a_hat * h.clip_dual
    l_hi = torch.maximum(l1, l2)
    neg = a_hat < 0
    loss_t = torch.where(neg, torch.minimum(l_hi, l3), l_hi)
    with torch.no_grad():
        # torch.maximum / minimum split the gradient evenly at ties; the explicit form does the same
        c1, c2 = -a_hat * d_ratio, -a_hat * d_ratio_c
        l1d, l2d, lhd = l1.detach(), l2.detach(), l_hi.detach()
        c_hi = torch.where(l1d > l2d, c1, torch.where(l2d > l1d, c2, 0.5 * (c1 + c2)))
        c_dual = torch.where(lhd < l3, c_hi, torch.where(lhd > l3, 0.0, 0.5 * c_hi))
        coef = torch.where(neg, c_dual, c_hi)
        clipped = l2d > l1d
        dual = neg & (lhd > l3)
    return TokenTerms(loss_t, coef, g, w, delta, clipped, dual, lr)


def agg_weights(valid, h: Hyper, seq_ids=None, num_seqs: int = 0, dtype=torch.float32):
    """Per-token aggregation weight ``a_t`` (section 2): ``loss = sum_t a_t * loss_t``; 0 outside the mask.

    token: 1 / sum(m); sum: 1 / norm; seq: 1 / (tokens of t's sequence * non-empty sequences). An all-masked batch
    gives all zeros (loss 0, zero gradients).
    """
    m = valid.to(dtype)
    if h.loss_agg_mode == "token":
        return m / m.sum().clamp(min=1.0)
    if h.loss_agg_mode == "sum":
        return m / h.norm
    counts = torch.zeros(num_seqs, dtype=dtype, device=m.device).index_add(0, seq_ids, m)
    n_seq = (counts > 0).to(dtype).sum().clamp(min=1.0)
    return m / (counts[seq_ids].clamp(min=1.0) * n_seq)


def aggregate(loss_t, valid, h: Hyper, seq_ids=None, num_seqs: int = 0):
    """token / seq / sum aggregation of ``loss_t`` over the mask; an all-masked batch gives exactly 0."""
    a = agg_weights(valid, h, seq_ids, num_seqs, dtype=loss_t.dtype)
    return (torch.where(valid, loss_t, 0.0) * a).sum()


def metric_values(terms: TokenTerms, valid, h: Hyper):
    """The section 5 metrics as one float32 vector in ``METRIC_NAMES`` order (masked means over valid tokens)."""
    with torch.no_grad():
        v = valid.to(torch.float32)
        count = v.sum().clamp(min=1.0)
        rows = torch.stack([terms.clipped.to(torch.float32), terms.dual.to(torch.float32),
                            -terms.log_ratio.to(torch.float32),
                            (terms.w < 1.0 - h.eps_w).to(torch.float32), (terms.w > 1.0 + h.eps_w).to(torch.float32),
                            terms.delta.to(torch.float32), terms.g.to(torch.float32)])
        return torch.where(valid, rows, 0.0).sum(1) / count


def masked_inputs(logp_s, logp_t, old, valid):
    """Zero the log-probs outside the mask so that padding's -inf/nan never reaches a sum or a gradient
    (``torch.where`` sends exactly zero gradient to the unselected branch)."""
    logp_s = torch.where(valid, logp_s, 0.0)
    old = None if old is None else torch.where(valid, old, 0.0)
    logp_t = None if logp_t is None else torch.where(valid, logp_t.detach().to(logp_s.dtype), 0.0)
    return logp_s, logp_t, old


def loss_from_logprobs(logp_s, logp_t, prep, h: Hyper, entropy=None) -> RLSDOutput:
    """Section 2 from per-token log-probs (flat ``[N]``) under autograd: ``logp_s`` carries the gradient."""
    valid = prep.valid
    ls, lt, old = masked_inputs(logp_s, logp_t, prep.old_logprobs, valid)
    terms = token_terms(ls, lt, prep.advantages, old, h)
    loss = aggregate(terms.loss_t, valid, h, prep.seq_ids, prep.num_seqs)
    return _output(loss, logp_s, logp_t, terms, entropy, prep, metric_values(terms, valid, h))


def _output(loss, logp_s, logp_t, terms, entropy, prep, values, extra_names=()) -> RLSDOutput:
    """The output object from flat per-token tensors, reshaped to the labels' shape."""
    shape = prep.label_shape
    return RLSDOutput(
        loss=loss,
        logprobs=logp_s.detach().reshape(shape),
        teacher_logprobs=None if logp_t is None else logp_t.detach().reshape(shape),
        weights=terms.g.reshape(shape),
        entropy=None if entropy is None else entropy.detach().reshape(shape),
        metric_values=values,
        extra_metric_names=tuple(extra_names),
    )


def token_coef(logp_s, logp_t, advantages, old, valid, agg, h: Hyper):
    """Only the gradient factor of :func:`loss_and_coef`, ``a_t * d loss_t / d logp_s`` (zero outside the mask):
    what a row chunk of the fused linear op needs before its gradient sweep."""
    with torch.no_grad():
        ls, lt, old = masked_inputs(logp_s, logp_t, old, valid)
        return torch.where(valid, token_terms(ls, lt, advantages, old, h).coef * agg, 0.0)


def loss_and_coef(logp_s, logp_t, advantages, old, valid, agg, h: Hyper):
    """No-autograd form for the fused op's CPU path: ``(loss, coef, g, metrics)`` with ``coef = a_t * d loss_t /
    d logp_s`` (zero outside the mask), the per-row factor of the gradient sweep."""
    with torch.no_grad():
        ls, lt, old = masked_inputs(logp_s, logp_t, old, valid)
        terms = token_terms(ls, lt, advantages, old, h)
        loss = (torch.where(valid, terms.loss_t, 0.0) * agg).sum()
        coef = torch.where(valid, terms.coef * agg, 0.0)
        return loss, coef, terms.g, metric_values(terms, valid, h)


def loss_and_coef_of_batch(logp_s, logp_t, labels_shape, advantages, adv_per_seq: bool, old_logprobs, valid,
                           cu_seqlens, h: Hyper):
    """:func:`loss_and_coef` from a call's own tensors: per-sequence advantages broadcast over their tokens, the
    aggregation weights of the batch's layout (``labels_shape`` / ``cu_seqlens``); ``logp_t`` may be None (GRPO).
    Shared by the CPU backends' fused loss and the vocabulary-parallel op."""
    from ._inputs import token_seq_ids

    n = valid.numel()
    acc = logp_s.dtype
    seq_ids, num_seqs = token_seq_ids(labels_shape, cu_seqlens, n, valid.device)
    adv = (advantages[seq_ids] if adv_per_seq else advantages.reshape(n)).to(acc)
    old = None if old_logprobs is None else old_logprobs.reshape(n).to(acc)
    lt = None if logp_t is None else logp_t.reshape(n).to(acc)
    agg = agg_weights(valid, h, seq_ids, num_seqs, dtype=acc)
    return loss_and_coef(logp_s, lt, adv, old, valid, agg, h)


__all__ = ["TokenTerms", "token_weights", "token_terms", "agg_weights", "aggregate", "metric_values",
           "masked_inputs", "loss_from_logprobs", "loss_and_coef", "loss_and_coef_of_batch", "token_coef"]
