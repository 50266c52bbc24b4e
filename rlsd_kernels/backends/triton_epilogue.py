"""The per-row epilogue of the fused loss kernel: docs/math.md sections 2 and 3 on scalars, in float32; and the
per-element gradient of the section 2c row terms (``terms_chunk_grad``: entropy bonus, forward / reverse KL).

A line-by-line transcription of ``rlsd_kernels/loss.py`` (``token_terms``), which is what tests check it against;
keep the two in step. NaN stays NaN (``clamp_nan`` and ``where`` orderings that keep the NaN operand), like torch.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .triton_common import clamp_nan, log_mixture


@triton.jit
def evidence_weight(logp_s, logp_t, adv, lam, eps_w):
    """``(g, w, delta)``: w = exp(sign(A) * delta) with sign(0) = 0, g = (1 - lam) + lam * clip(w)."""
    delta = logp_t - logp_s
    sgn = tl.where(adv > 0, 1.0, tl.where(adv < 0, -1.0, 0.0))
    w = tl.exp(tl.where(sgn == 0, 0.0, sgn * delta))
    g = (1.0 - lam) + lam * clamp_nan(w, 1.0 - eps_w, 1.0 + eps_w)
    return g, w, delta


@triton.jit
def policy_terms(logp_s, old, a_hat, log_lo, log_hi, clip_dual, CISPO: tl.constexpr):
    """``(loss_t, c, clipped, dual)`` with ``c = d loss_t / d logp_s``; ``log_lo/hi = log(1 - clip_low)``,
    ``log(1 + clip_high)``. Ties of max/min split the gradient evenly, as torch.maximum/minimum do."""
    lr = logp_s - old
    ratio = tl.exp(clamp_nan(lr, -20.0, 20.0))
    ratio_c = tl.exp(clamp_nan(lr, log_lo, log_hi))
    # clamp passes the gradient only inside its bounds (bounds included, as torch.clamp; NaN stays NaN)
    d_ratio = tl.where((lr < -20.0) | (lr > 20.0), 0.0, ratio)
    d_ratio_c = tl.where((lr < log_lo) | (lr > log_hi), 0.0, ratio_c)
    if CISPO:
        loss_t = -a_hat * ratio_c * logp_s
        c = -a_hat * ratio_c
        clipped = ratio_c != ratio
        dual = lr > float("inf")  # all False (NaN too), with lr's shape
    else:
        l1 = -a_hat * ratio
        l2 = -a_hat * ratio_c
        l3 = -a_hat * clip_dual
        l_hi = tl.where(l2 > l1, l2, l1)
        neg = a_hat < 0
        loss_t = tl.where(neg & (l_hi > l3), l3, l_hi)
        c1 = -a_hat * d_ratio
        c2 = -a_hat * d_ratio_c
        c_hi = tl.where(l1 > l2, c1, tl.where(l2 > l1, c2, 0.5 * (c1 + c2)))
        c_dual = tl.where(l_hi < l3, c_hi, tl.where(l_hi > l3, 0.0, 0.5 * c_hi))
        c = tl.where(neg, c_dual, c_hi)
        clipped = l2 > l1
        dual = neg & (l_hi > l3)
    return loss_t, c, clipped, dual


@triton.jit
def kl_grad(ls, ref, KL_TYPE: tl.constexpr):
    """``d kl_t / d logp_s`` of verl's estimators (loss_terms.py ``kl_penalty``; KL_TYPE 1 / 2 / 3 = k1 / k2 / k3):
    k3's clamps pass no gradient outside their bounds (NaN passes, as ``loss_terms._inside``)."""
    if KL_TYPE == 1:
        return tl.full((), 1.0, tl.float32)
    elif KL_TYPE == 2:
        return ls - ref
    else:
        r_raw = ref - ls
        r = clamp_nan(r_raw, -20.0, 20.0)
        v_raw = tl.exp(r) - r - 1.0
        outside = (v_raw < -10.0) | (v_raw > 10.0) | (r_raw < -20.0) | (r_raw > 20.0)
        return tl.where(outside, 0.0, -(tl.exp(r) - 1.0))


@triton.jit
def kl_value(ls, ref, KL_TYPE: tl.constexpr):
    """verl's per-token KL estimators (loss_terms.py ``kl_penalty``): k1 ``ls - ref``, k2 ``(ls - ref)^2 / 2``, k3
    ``exp(r) - r - 1`` with ``r = ref - ls`` clamped to [-20, 20] and the value to [-10, 10]."""
    if KL_TYPE == 1:
        return ls - ref
    elif KL_TYPE == 2:
        d = ls - ref
        return 0.5 * d * d
    else:
        r = clamp_nan(ref - ls, -20.0, 20.0)
        return clamp_nan(tl.exp(r) - r - 1.0, -10.0, 10.0)


@triton.jit
def row_epilogue(row, N, m_s, d_s, e_s, m_t, d_t, tgt_s, tgt_t, label, agg, V, ignore_index, lam, eps_w, log_lo,
                 log_hi, clip_dual, kl_coef, ADV, OLD, TLP, REF, WIS, INMASK, LOGP_S, LOGP_T, WEIGHT, ENT, LSE, COEF,
                 PARTS, TEACHER: tl.constexpr, HAS_OLD: tl.constexpr, WANT_ENT: tl.constexpr, CISPO: tl.constexpr,
                 KL_TYPE: tl.constexpr, HAS_WIS: tl.constexpr, HAS_INMASK: tl.constexpr):
    """Everything the fused loss needs of one row once its statistics are known: log-probs, lse, entropy, evidence
    weight, policy loss and its derivative, the row's partials of the loss and metrics (``PARTS``, ``[9, N]``).
    ``(m_s, d_s, e_s)``: the student's running max, sum and entropy sum (``row_stats``); ``(m_t, d_t)`` the
    teacher's; ``tgt_s, tgt_t``: the target logits / T. ``agg``: the row's aggregation weight (> 0 exactly for rows
    in the loss). Returns ``(lse, coef, part, kl_t)``: ``coef = a_t * d loss_t / d logp_s`` (0 for rows out of the
    loss), the row's loss partial ``a_t * loss_t`` for row 0 of ``PARTS`` (stored by the caller) and its KL value.

    The section 2c token-local terms (the fused rows of ``backends/logits/triton_rows.py``): ``HAS_WIS`` scales the
    policy term by the rollout IS weight ``WIS[row]``, ``KL_TYPE`` (0 off) adds ``kl_coef * d kl_t / d logp_s``
    against ``REF[row]`` to the factor, as ``loss_terms.loss_with_terms`` does; the loss partial includes both, the
    metric partials of ``PARTS`` are the policy term's."""
    valid = agg > 0
    has_tgt = (label >= 0) & (label < V)
    log_d = tl.log(d_s)
    lse = m_s + log_d
    keep = (label != ignore_index) & has_tgt
    logp_s = tl.where(keep, (tgt_s - m_s) - log_d, 0.0)
    tl.store(LOGP_S + row, logp_s)
    tl.store(LSE + row, lse)
    if WANT_ENT:
        tl.store(ENT + row, log_d - e_s / d_s)
    adv = tl.load(ADV + row).to(tl.float32)
    # the mask of the inputs: the rows in the loss, or with HAS_INMASK the section 2 mask INMASK[row], which also
    # holds the tokens rollout rejection left out of the loss (their weights are reported as loss.py computes them)
    m_in = valid
    if HAS_INMASK:
        m_in = tl.load(INMASK + row) != 0
    ls = tl.where(m_in, logp_s, 0.0)
    if HAS_OLD:
        old = tl.where(m_in, tl.load(OLD + row).to(tl.float32), 0.0)
    else:
        old = ls
    if TEACHER == 0:
        g = tl.full((), 1.0, tl.float32)
        w = g
        delta = tl.zeros((), tl.float32)
    else:
        if TEACHER == 1:
            logp_t = tl.where(keep, (tgt_t - m_t) - tl.log(d_t), 0.0)
            tl.store(LOGP_T + row, logp_t)
        else:
            logp_t = tl.load(TLP + row).to(tl.float32)
        g, w, delta = evidence_weight(ls, tl.where(m_in, logp_t, 0.0), adv, lam, eps_w)
    tl.store(WEIGHT + row, g)
    loss_t, c, clipped, dual = policy_terms(ls, old, adv * g, log_lo, log_hi, clip_dual, CISPO)
    kl_t = tl.zeros((), tl.float32)
    if HAS_WIS:
        w_is = tl.load(WIS + row).to(tl.float32)
        c = c * w_is
        loss_t = w_is * loss_t
    if KL_TYPE != 0:
        ref = tl.where(valid, tl.load(REF + row).to(tl.float32), 0.0)
        c = c + kl_coef * kl_grad(ls, ref, KL_TYPE)
        kl_t = kl_value(ls, ref, KL_TYPE)
        loss_t = loss_t + kl_coef * kl_t
    coef = tl.where(valid, agg * c, 0.0)
    tl.store(COEF + row, coef)
    vf = valid.to(tl.float32)
    tl.store(PARTS + N + row, vf * clipped.to(tl.float32))
    tl.store(PARTS + 2 * N + row, vf * dual.to(tl.float32))
    tl.store(PARTS + 3 * N + row, tl.where(valid, old - ls, 0.0))
    tl.store(PARTS + 4 * N + row, vf * (w < 1.0 - eps_w).to(tl.float32))
    tl.store(PARTS + 5 * N + row, vf * (w > 1.0 + eps_w).to(tl.float32))
    tl.store(PARTS + 6 * N + row, tl.where(valid, delta, 0.0))
    tl.store(PARTS + 7 * N + row, tl.where(valid, g, 0.0))
    tl.store(PARTS + 8 * N + row, vf)
    # the loss partial (row 0 of PARTS) is the caller's to store: the row terms add to it
    return lse, coef, tl.where(valid, agg * loss_t, 0.0), tl.where(valid, kl_t, 0.0)


@triton.jit
def terms_chunk_grad(z, zt, m_s, log_d, H, m_t, log_dt, D, aux, beta, cols, label, scale, e_scale, f_scale,
                     ENT_GRAD: tl.constexpr, DIV_MODE: tl.constexpr):
    """The gradient of one chunk of a row with the entropy bonus and / or a divergence, from the student and teacher
    logits / T ``z``, ``zt``: ``scale (onehot - p) - e_scale p (log p + H) + f_scale dD/dz`` with forward KL's
    ``dD/dz = p - p_T``, reverse KL's ``p (log p - log p_T - D)`` and JSD's ``(1 - beta) p (log p - log M - aux)``
    (``aux = KL(p_S || M)``; ``e_scale``, ``f_scale``: d loss / d H and d loss / d D, over T). ``log p = (z - m) -
    log d`` keeps the digits that ``z - lse`` loses at |logits| ~ 1e4; ``p = 0`` (-inf logits) contributes 0, never
    0 * inf."""
    lp = (z - m_s) - log_d
    p = tl.exp(lp)
    g = scale * tl.where(cols == label, 1.0 - p, -p)
    if ENT_GRAD:
        g -= e_scale * p * (tl.where(p > 0, lp, 0.0) + H)
    if DIV_MODE == 1:
        g += f_scale * (p - tl.exp((zt - m_t) - log_dt))
    if DIV_MODE == 2:
        lt = (zt - m_t) - log_dt
        g += f_scale * p * (tl.where(p > 0, lp - lt, 0.0) - D)
    if DIV_MODE == 3:
        lm = log_mixture((zt - m_t) - log_dt, lp, beta)
        g += f_scale * (1.0 - beta) * p * (tl.where(p > 0, lp - lm, 0.0) - aux)
    return g
