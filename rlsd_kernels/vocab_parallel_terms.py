"""The docs/math.md section 2c terms and ``opsd_loss`` on a vocabulary shard (section 2d).

The loss algebra is the single-device one (``ops/fused_loss_terms.terms_output`` -> ``loss_terms.loss_with_terms``,
under autograd on flat ``[N]`` per-token vectors); only the per-token vectors it reads come from the shards. Two
autograd functions produce them, identical on every rank:

``_ShardedScores`` (KL to a reference, rollout IS, GSPO: per-token terms only)
    ``vocab_parallel.RowStats`` (the backend's statistics pass + ONE all-gather, as for section 2); the backward is
    ``vocab_parallel.shard_backward`` (in place if asked). No collective beyond section 2's.

``_ShardedRowTerms`` (the entropy bonus and the distillation divergence: whole rows)
    The backend's ``forward_terms`` on the shard gives the shard's float64 log-sum-exps, the owner's log-probs, the
    shard's entropy and, for forward / reverse KL, the shard's own divergence ``D_r`` (between the shard-local
    softmaxes). They are packed into one float64 ``[fields, N]`` table and all-gathered once. With the shard masses
    ``u_r = exp(lse_S,r - lse_S)`` (student) and ``w_r = exp(lse_T,r - lse_T)`` (teacher), the chain rule of KL gives
    the global values exactly::

        H    = sum_r u_r (H_r - log u_r)
        fKL  = sum_r w_r (D_r + log w_r - log u_r)        D_r = KL(q_T,r || q_S,r) on the shard
        rKL  = sum_r u_r (D_r + log u_r - log w_r)        D_r = KL(q_S,r || q_T,r)

    JSD cannot be split so: ``M = beta p_T + (1 - beta) p_S`` needs the global normalisations inside its log. Its
    two per-row sums ``KL(p_T || M)``, ``KL(p_S || M)`` are taken on the shard with the global log-sum-exps by an
    eager torch sweep (``_jsd_partials``: no backend pass exposes them), then summed over the ranks by a second
    all-gather. The backward is the backend's ``backward_terms`` sweep on the shard with the GLOBAL
    ``lse``, ``H``, ``lse_T``, ``D`` and ``KL(p_S || M)``; the target element of the rows a rank owns is then
    rewritten from the global log-prob (a backend may form ``1 - p_y`` from its own, here partial, row sum). No
    collective in the backward.

Collectives per call (forward + backward): 2 (layout check + the gather of the partials) for every term and for
``opsd_loss`` with forward / reverse KL; 3 with JSD (its second gather). The combination runs in rank order on the
gathered table, so every rank gets the same bits.
"""
from __future__ import annotations

import math

import torch

from . import dispatch
from ._inputs import check_logits, check_terms_call, prepare
from ._layout import as_rows3d
from ._output import RLSDOutput
from .backends.logits.eager import _flat_rows, _rows_per_block
from .hyper import Hyper
from .loss_terms import Terms
from .ops.fused_loss_terms import div_mode as terms_div_mode, terms_output
from .vocab_parallel import (CPP_RECOMPUTED_LSE, NOT_OWNED, Shard, RowStats, _combine, _gather_rows, _stand_in,
                             local_labels, resolve_shard, shard_backward)

FORWARD_KL, REVERSE_KL, JSD = 1, 2, 3  # backends.logits.DIV_MODES


# ------------------------------------------------------------------------------ KL / rollout IS / GSPO
class _ShardedScores(torch.autograd.Function):
    """Global ``(logp_s, logp_t, entropy)`` per row; differentiable through ``logp_s`` (section 2's pass)."""

    @staticmethod
    def forward(ctx, student, teacher, flat, shard, temperature, ignore_index, want_entropy, inplace):
        ctx.forced = dispatch.forced_by_context()
        stats = RowStats(as_rows3d(student), None if teacher is None else as_rows3d(teacher), flat, shard,
                         temperature, want_entropy)
        ignored = flat == ignore_index
        logp = torch.where(ignored, 0.0, stats.logp)
        empty = logp.new_empty((0,))
        logp_t = empty if teacher is None else torch.where(ignored, 0.0, stats.logp_t)
        ent = stats.entropy if want_entropy else empty.clone()
        ctx.save_for_backward(student, stats.local, stats.lse, stats.logp, ignored)
        ctx.temperature, ctx.inplace = temperature, inplace
        ctx.mark_non_differentiable(logp_t, ent)
        return logp, logp_t, ent

    @staticmethod
    def backward(ctx, grad_logp, *_):
        student, local, lse, logp, ignored = ctx.saved_tensors
        if grad_logp is None:
            return (None,) * 8
        coef = torch.where(ignored, 0.0, grad_logp.reshape(-1).to(torch.float32))
        with dispatch.force_backend(ctx.forced):
            grad = shard_backward(coef, student, local, lse, logp, ctx.temperature,
                                  student if ctx.inplace else None)
        return (grad,) + (None,) * 7


# ------------------------------------------------------------------------------ entropy / divergences
def _log_masses(lse):
    """``(lse_global [N], log shard mass [P, N])`` from the gathered ``[P, N]`` float64 shard log-sum-exps."""
    top = lse.amax(0)
    shift = torch.where(torch.isfinite(top), top, 0.0)
    lse_g = shift + torch.log(torch.exp(lse - shift).sum(0))
    log_mass = torch.where(torch.isfinite(lse_g), lse - lse_g, float("-inf"))
    return lse_g, log_mass


def _kl_split(weight_log, other_log, d_local):
    """``sum_r a_r (D_r + log a_r - log b_r)`` (``a = exp(weight_log)``): a KL from its shard parts; shards with no
    mass under ``a`` contribute 0."""
    a = torch.exp(weight_log)
    return torch.where(a > 0, a * (d_local + weight_log - other_log), 0.0).sum(0)


def _split(lse):
    """A float64 ``[N]`` log-sum-exp as two float32 parts ``(hi, lo)``: ``(x - hi) - lo`` is exact where x ~ hi (as
    ``csrc/rlsd_row_terms.h``'s ``SplitLse``); rows of only -inf get 0."""
    lse = torch.where(torch.isfinite(lse), lse, 0.0)
    hi = lse.to(torch.float32)
    return hi[:, None], (lse - hi.double()).to(torch.float32)[:, None]


def _jsd_partials(s3, t3, lse_s, lse_t, temperature, beta):
    """On this shard, with the GLOBAL log-sum-exps: ``[2, N]`` float64 partial sums ``sum_v p_T (log p_T - log M)``
    and ``sum_v p_S (log p_S - log M)``. Eager torch over blocks of rows (as ``backends/logits/eager.py``), float32
    elements with the split log-sum-exps, float64 row sums."""
    B, T, V = s3.shape
    n = B * T
    out = torch.zeros(2, n, dtype=torch.float64, device=s3.device)
    (s_hi, s_lo), (t_hi, t_lo) = _split(lse_s), _split(lse_t)
    step = _rows_per_block(V)
    for r0 in range(0, n, step):
        r1 = min(n, r0 + step)
        ls = (_flat_rows(s3, r0, r1).to(torch.float32) / temperature - s_hi[r0:r1]) - s_lo[r0:r1]
        lt = (_flat_rows(t3, r0, r1).to(torch.float32) / temperature - t_hi[r0:r1]) - t_lo[r0:r1]
        ps, pt = ls.exp(), lt.exp()
        # log M as a logaddexp: beta * p_T + (1 - beta) * p_S may underflow to 0 where p_T > 0 is subnormal
        lm = torch.logaddexp(lt + math.log(beta), ls + math.log1p(-beta))
        out[0, r0:r1] = (pt * torch.where(pt > 0, lt - lm, 0.0)).sum(-1, dtype=torch.float64)
        out[1, r0:r1] = (ps * torch.where(ps > 0, ls - lm, 0.0)).sum(-1, dtype=torch.float64)
    return out


class RowTermStats:
    """Global float64 per-row values of one sharded call with the entropy and/or a divergence: ``lse``,
    ``logp`` (student), ``entropy``, and with a teacher ``lse_t``, ``logp_t``; with a divergence ``div`` (``D_t``,
    unclipped) and ``aux`` (JSD: ``KL(p_S || M)``)."""

    def __init__(self, s3, t3, flat, shard: Shard, temperature, div_mode, beta):
        backend = dispatch.get_backend(s3.device)
        self.local = local_labels(flat, shard)
        # a teacher's shard lse comes from a divergence mode (float64); reverse KL needs its own D_r
        local_mode = 0 if t3 is None else (REVERSE_KL if div_mode == REVERSE_KL else FORWARD_KL)
        lp_s, lp_t, lse_s, ent, lse_t, d_r, _ = backend.forward_terms(s3, t3, self.local, temperature, NOT_OWNED,
                                                                      True, local_mode, beta)
        owned = (self.local != NOT_OWNED).to(torch.float64)
        fields = [lse_s, lp_s, owned, ent] + ([lse_t, lp_t, d_r] if t3 is not None else [])
        table = _gather_rows(torch.stack([f.to(torch.float64) for f in fields]), shard.group, shard.world)
        own = table[:, 2] != 0
        self.lse, self.logp, self.entropy = _combine(table[:, 0], table[:, 1], own, table[:, 3])
        self.lse_t = self.logp_t = self.div = self.aux = None
        if t3 is None:
            return
        self.lse_t, self.logp_t, _ = _combine(table[:, 4], table[:, 5], own)
        _, log_u = _log_masses(table[:, 0])
        _, log_w = _log_masses(table[:, 4])
        if div_mode == FORWARD_KL:
            self.div = _kl_split(log_w, log_u, table[:, 6])
        elif div_mode == REVERSE_KL:
            self.div = _kl_split(log_u, log_w, table[:, 6])
        elif div_mode == JSD:  # the second collective: the mixture's sums need the global lse's first
            sums = _gather_rows(_jsd_partials(s3, t3, self.lse, self.lse_t, temperature, beta), shard.group,
                                shard.world).sum(0)
            self.div = beta * sums[0] + (1 - beta) * sums[1]
            self.aux = sums[1]


def _target_grad(coef, e, f, s3, t3, local, st: RowTermStats, rows, temperature, div_mode, beta):
    """The whole gradient of the target element of the rows ``rows`` (this rank owns their label), float64:
    ``[coef (1 - p_y) - e p_y (log p_y + H) + f dD/dz_y] / T`` with ``1 - p_y = -expm1(logp_y)`` (global)."""
    lp = st.logp[rows]
    p = torch.exp(lp)
    g = coef[rows].double() * -torch.expm1(lp)
    if e is not None:
        g = g - e[rows].double() * torch.where(p > 0, p * (lp + st.entropy[rows]), 0.0)
    if div_mode:
        Tt = t3.shape[1]  # the teacher's own [B, T] split of the rows (it may differ from the student's)
        zt = t3[rows // Tt, rows % Tt, local[rows]].double() / temperature
        lt = zt - st.lse_t[rows]
        pt = torch.exp(lt)
        if div_mode == FORWARD_KL:
            dd = p - pt
        elif div_mode == REVERSE_KL:
            dd = torch.where(p > 0, p * (lp - lt - st.div[rows]), 0.0)
        else:
            lm = torch.log(beta * pt + (1 - beta) * p)
            dd = (1 - beta) * torch.where(p > 0, p * (lp - lm - st.aux[rows]), 0.0)
        g = g + f[rows].double() * dd
    return g / temperature


class _ShardedRowTerms(torch.autograd.Function):
    """Global ``(logp_s, logp_t, entropy, div)`` per row (float32); differentiable through ``logp_s``, ``entropy``
    and ``div``; the backward writes this shard's gradient of all three."""

    @staticmethod
    def forward(ctx, student, teacher, flat, shard, temperature, ignore_index, div_mode, beta, inplace):
        ctx.forced = dispatch.forced_by_context()
        ctx.inplace = inplace
        s3 = as_rows3d(student)
        t3 = None if teacher is None else as_rows3d(teacher)
        st = RowTermStats(s3, t3, flat, shard, temperature, div_mode, beta)
        ignored = flat == ignore_index
        logp = torch.where(ignored, 0.0, st.logp).to(torch.float32)
        empty = logp.new_empty((0,))
        logp_t = empty if teacher is None else torch.where(ignored, 0.0, st.logp_t).to(torch.float32)
        ent = st.entropy.to(torch.float32)
        div = empty.clone() if not div_mode else st.div.to(torch.float32)
        ctx.save_for_backward(student, teacher)
        ctx.st, ctx.temperature, ctx.div_mode, ctx.beta = st, temperature, div_mode, beta
        ctx.mark_non_differentiable(logp_t)
        return logp, logp_t, ent, div

    @staticmethod
    def backward(ctx, g_logp, _g_logp_t, g_ent, g_div):
        student, teacher = ctx.saved_tensors
        st, T, mode, beta = ctx.st, ctx.temperature, ctx.div_mode, ctx.beta
        f32 = lambda g: None if g is None else g.reshape(-1).to(torch.float32).contiguous()  # noqa: E731
        coef = f32(g_logp) if g_logp is not None else torch.zeros_like(st.lse, dtype=torch.float32)
        e, f = f32(g_ent), (f32(g_div) if mode else None)
        if mode and f is None:
            f = torch.zeros_like(coef)
        with dispatch.force_backend(ctx.forced):
            name = dispatch.select_backend(student.device)
        if name == "cpp" and bool((st.lse.abs() > CPP_RECOMPUTED_LSE).any()):
            # the C++ sweep re-splits rows with |lse| > 32 from the row itself: on a shard, that is the local lse
            name = "reference"
        s3 = as_rows3d(student)
        t3 = None if (teacher is None or not mode) else as_rows3d(teacher)
        mode = mode if t3 is not None else 0
        # in place: the sweep reads each element before it writes it, and the target elements below come from the
        # global statistics and the teacher, never from the (overwritten) student
        out = student if ctx.inplace else torch.empty(student.shape, dtype=student.dtype, device=student.device)
        o3 = s3 if ctx.inplace else out.view(s3.shape)
        f32v = lambda t: None if t is None else t.to(torch.float32).contiguous()  # noqa: E731
        zeros = torch.zeros_like(coef)
        with dispatch.force_backend(name):
            dispatch.get_backend(student.device).backward_terms(
                coef, e, f if mode else None, s3, t3, st.local, st.lse.contiguous(), f32v(st.entropy),
                st.lse_t.contiguous() if mode else None, f32v(st.div) if mode else None,
                (f32v(st.aux) if mode == JSD else zeros) if mode else None, T, mode, beta, o3)
        active = coef != 0
        if e is not None:
            active = active | (e != 0)
        if f is not None:
            active = active | (f != 0)
        rows = torch.nonzero((st.local != NOT_OWNED) & active & torch.isfinite(st.lse)).squeeze(1)
        if rows.numel():
            g = _target_grad(coef, e, f, s3, t3, st.local, st, rows, T, mode, beta)
            Tn = o3.shape[1]
            o3[rows // Tn, rows % Tn, st.local[rows]] = g.to(o3.dtype)
        return (out,) + (None,) * 8


# ------------------------------------------------------------------------------------------------ the loss
def loss_terms_sharded(h: Hyper, x: Terms, student_logits, teacher_logits, labels, advantages, old_logprobs, mask,
                       teacher_logprobs, cu_seqlens, return_entropy, inplace_backward, ref_logprobs,
                       rollout_logprobs, group, vocab_start) -> RLSDOutput:
    """``rlsd_loss`` with section 2c terms on a vocabulary shard: the unsharded op's loss, log-probs and metrics
    on every rank, this rank's slice of the gradient."""
    check_logits("student_logits", student_logits)
    if teacher_logits is not None:
        check_logits("teacher_logits", teacher_logits, shape=student_logits.shape, device=student_logits.device)
    shard = resolve_shard(group, vocab_start, student_logits, has_teacher=teacher_logits is not None)
    prep = prepare(_stand_in(student_logits, shard.vocab), _stand_in(teacher_logits, shard.vocab), labels,
                   advantages, old_logprobs, mask, teacher_logprobs, cu_seqlens, h, values=True)
    check_terms_call(x, labels, cu_seqlens, student_logits.device, teacher_logits, teacher_logprobs, ref_logprobs,
                     rollout_logprobs)
    teacher = None if teacher_logits is None else teacher_logits.detach()
    T, ii = float(h.temperature), int(h.ignore_index)
    div = None
    if x.needs_full_distribution:
        logp_s, logp_t, ent, div = _ShardedRowTerms.apply(student_logits, teacher, prep.labels, shard, T, ii,
                                                          terms_div_mode(x), float(x.distill_beta),
                                                          bool(inplace_backward))
    else:
        logp_s, logp_t, ent = _ShardedScores.apply(student_logits, teacher, prep.labels, shard, T, ii,
                                                   bool(return_entropy), bool(inplace_backward))
    return terms_output(h, x, prep, logp_s, logp_t if teacher is not None else None, ent, div, teacher_logprobs,
                        ref_logprobs, rollout_logprobs, return_entropy, shard.vocab)


__all__ = ["loss_terms_sharded", "RowTermStats"]
