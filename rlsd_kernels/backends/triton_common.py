"""Triton helpers shared by every kernel of the package: the online log-sum-exp step over one vocabulary chunk,
NaN-propagating clamps, and the host-side device / layout checks."""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def lse_chunk(m, d, x):
    """One step of the online log-sum-exp over chunk ``x`` (float32, padded with -inf).

    Returns ``(m_new, shift, alpha, p)``: the new running max, the finite shift actually used (0 while everything
    seen is -inf, so exp() gives 0 rather than nan), the rescale ``exp(m - shift)`` of the old sum and
    ``p = exp(x - shift)``. A NaN logit makes ``p`` and so the running sum NaN: NaN rows stay NaN, as in IEEE.
    """
    m_new = tl.maximum(m, tl.max(x, axis=0))
    shift = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp(m - shift)
    p = tl.exp(x - shift)
    return m_new, shift, alpha, p


@triton.jit
def col_offsets(cols, stride, CONTIG: tl.constexpr):
    """Element offsets of vocabulary columns: the columns themselves (int32) for a unit stride, else int64."""
    if CONTIG:
        off = cols
    else:
        off = cols.to(tl.int64) * stride
    return off


@triton.jit
def load_chunk(s_row, t_row, start, cols0, V, s_sv, t_sv, HAS_T: tl.constexpr, CONTIG: tl.constexpr,
               KEEP_STUDENT: tl.constexpr):
    """Student (and teacher) logits of columns ``start + cols0`` (-inf beyond V), in their own dtype. With
    ``KEEP_STUDENT`` the student is loaded ``evict_last`` (a gradient sweep re-reads it) and the teacher
    ``evict_first`` (read once); otherwise with the default policy."""
    cols = start + cols0
    inb = cols < V
    s_off = col_offsets(cols, s_sv, CONTIG)
    t_off = col_offsets(cols, t_sv, CONTIG)
    if KEEP_STUDENT:
        x = tl.load(s_row + s_off, mask=inb, other=float("-inf"), eviction_policy="evict_last")
    else:
        x = tl.load(s_row + s_off, mask=inb, other=float("-inf"))
    y = x
    if HAS_T:
        if KEEP_STUDENT:
            y = tl.load(t_row + t_off, mask=inb, other=float("-inf"), eviction_policy="evict_first")
        else:
            y = tl.load(t_row + t_off, mask=inb, other=float("-inf"))
    return x, y


@triton.jit
def target_logits(s_row, t_row, label, V, s_sv, t_sv, inv_temp, HAS_T: tl.constexpr):
    """``(x_S[y] / T, x_T[y] / T)`` (0 for the teacher without one): one masked scalar load each, so an out-of-range
    label (possible only when validation was skipped under torch.compile) reads nothing instead of out of bounds."""
    has_tgt = (label >= 0) & (label < V)
    lbl = tl.where(has_tgt, label, 0)
    tgt_s = tl.load(s_row + lbl * s_sv, mask=has_tgt, other=0.0).to(tl.float32) * inv_temp
    tgt_t = tl.zeros((), tl.float32)
    if HAS_T:
        tgt_t = tl.load(t_row + lbl * t_sv, mask=has_tgt, other=0.0).to(tl.float32) * inv_temp
    return tgt_s, tgt_t


@triton.jit
def row_stats(s_row, t_row, V, s_sv, t_sv, inv_temp, HAS_T: tl.constexpr, WANT_ENT: tl.constexpr,
              CONTIG: tl.constexpr, BLOCK_V: tl.constexpr, PREFETCH: tl.constexpr, KEEP_STUDENT: tl.constexpr,
              DIV_MODE: tl.constexpr):
    """One sweep over a row: the online log-sum-exp of the student logits / T (running max ``m_s`` and sum ``d_s``),
    of the teacher's when ``HAS_T`` (``m_t``, ``d_t``), and with ``WANT_ENT`` the running ``e_s = sum exp(x - m) *
    (x - m)`` of the entropy ``H = log d - e / d`` (relative to the running max, so that |x| ~ 1e4 loses no digit).
    ``DIV_MODE`` 1 / 2 (forward / reverse KL, docs/math.md section 2b) also keeps the cross sum ``c = sum exp(w -
    m_w) (o - m_o)`` weighted by the teacher / student row ``w`` and relative to both running maxima (re-based as
    they grow), and for forward KL the teacher's entropy sum ``e_t``: then ``KL(p_w || p_o) = (e_w - c) / d_w -
    log d_w + log d_o`` with no cancellation at |logits| ~ 1e4.
    ``PREFETCH`` keeps the next chunk's loads in flight while this one is reduced (software pipelining).
    Returns ``(m_s, d_s, e_s, m_t, d_t, c, e_t)``."""
    cols0 = tl.arange(0, BLOCK_V)
    m_s = tl.full((), float("-inf"), tl.float32)
    d_s = tl.zeros((), tl.float32)
    e_s = tl.zeros((), tl.float32)
    m_t = tl.full((), float("-inf"), tl.float32)
    d_t = tl.zeros((), tl.float32)
    e_t = tl.zeros((), tl.float32)
    c = tl.zeros((), tl.float32)
    if PREFETCH:
        x_next, y_next = load_chunk(s_row, t_row, 0, cols0, V, s_sv, t_sv, HAS_T, CONTIG, KEEP_STUDENT)
    for start in range(0, V, BLOCK_V):
        if PREFETCH:
            x, y = x_next, y_next
            x_next, y_next = load_chunk(s_row, t_row, start + BLOCK_V, cols0, V, s_sv, t_sv, HAS_T, CONTIG,
                                        KEEP_STUDENT)
        else:
            x, y = load_chunk(s_row, t_row, start, cols0, V, s_sv, t_sv, HAS_T, CONTIG, KEEP_STUDENT)
        x = x.to(tl.float32) * inv_temp
        m_new, shift, alpha, p = lse_chunk(m_s, d_s, x)
        s_old = tl.where(m_s == float("-inf"), 0.0, m_s)  # the shift the sums so far are relative to
        d_s_old = d_s
        if WANT_ENT or DIV_MODE == 2:
            e_s = alpha * (e_s + tl.where(d_s == 0.0, 0.0, m_s - shift) * d_s) + \
                tl.sum(p * tl.where(p > 0, x - shift, 0.0), axis=0)
        d_s = d_s * alpha + tl.sum(p, axis=0)
        m_s = m_new
        if HAS_T:
            y = y.to(tl.float32) * inv_temp
            mt_new, t_shift, t_alpha, q = lse_chunk(m_t, d_t, y)
            t_old = tl.where(m_t == float("-inf"), 0.0, m_t)
            if DIV_MODE == 2:  # reverse KL: sum p_S (x_T - m_T), with the student's rescale
                c = alpha * (c - tl.where(d_s_old == 0.0, 0.0, (t_shift - t_old) * d_s_old)) + \
                    tl.sum(tl.where(p > 0, p * (y - t_shift), 0.0), axis=0)
            if DIV_MODE == 1:  # forward KL: sum p_T (x_S - m_S) and the teacher's entropy sum
                e_t = t_alpha * (e_t + tl.where(d_t == 0.0, 0.0, m_t - t_shift) * d_t) + \
                    tl.sum(q * tl.where(q > 0, y - t_shift, 0.0), axis=0)
                c = t_alpha * (c - tl.where(d_t == 0.0, 0.0, (shift - s_old) * d_t)) + \
                    tl.sum(tl.where(q > 0, q * (x - shift), 0.0), axis=0)
            d_t = d_t * t_alpha + tl.sum(q, axis=0)
            m_t = mt_new
    return m_s, d_s, e_s, m_t, d_t, c, e_t


@triton.jit
def log_mixture(lt, ls, beta):
    """``log(beta p_T + (1 - beta) p_S)`` from the log-probabilities, in log space: forming the mixture from
    ``exp(lt)`` and ``exp(ls)`` underflows to 0 where both are below ~1e-38 (|logit gaps| of ~90), and a token with
    ``p_T > 0`` then gets ``p_T * (lt - log 0) = inf``. -inf where both are -inf (terms there are masked out)."""
    a = lt + tl.log(beta)
    b = ls + tl.log(1.0 - beta)
    mx = tl.maximum(a, b)
    shift = tl.where(mx == float("-inf"), 0.0, mx)
    return shift + tl.log(tl.exp(a - shift) + tl.exp(b - shift))


@triton.jit
def jsd_sums(s_row, t_row, V, s_sv, t_sv, inv_temp, m_s, log_d, m_t, log_dt, beta, CONTIG: tl.constexpr,
             BLOCK_V: tl.constexpr):
    """JSD's second sweep over a row once both log-sum-exps are known: ``(beta a + (1 - beta) b, b)`` with
    ``a = sum p_T (log p_T - log M)``, ``b = sum p_S (log p_S - log M)``, ``M = beta p_T + (1 - beta) p_S``
    (``log p = (z - m) - log d``: no digit lost at |logits| ~ 1e4)."""
    a = tl.zeros((), tl.float32)
    b = tl.zeros((), tl.float32)
    cols0 = tl.arange(0, BLOCK_V)
    for start in range(0, V, BLOCK_V):
        x, y = load_chunk(s_row, t_row, start, cols0, V, s_sv, t_sv, True, CONTIG, False)
        ls = (x.to(tl.float32) * inv_temp - m_s) - log_d
        lt = (y.to(tl.float32) * inv_temp - m_t) - log_dt
        ps = tl.exp(ls)
        pt = tl.exp(lt)
        lm = log_mixture(lt, ls, beta)
        a += tl.sum(tl.where(pt > 0, pt * (lt - lm), 0.0), axis=0)
        b += tl.sum(tl.where(ps > 0, ps * (ls - lm), 0.0), axis=0)
    return beta * a + (1.0 - beta) * b, b


@triton.jit
def clamp_nan(x, low, high):
    """``clamp`` that keeps NaN (``tl.minimum``/``maximum`` return the bound for NaN, torch.clamp keeps NaN)."""
    return tl.where(x < low, low, tl.where(x > high, high, x))


@triton.jit
def row_pointer(BASE, row, seq_len, stride_b, stride_t):
    """Row ``row`` of a ``[B, T, V]`` strided view: ``b = row // T, t = row % T``, offsets in int64."""
    return BASE + (row // seq_len) * stride_b + (row % seq_len) * stride_t


def check_device(x: torch.Tensor) -> None:
    if x.device.type == "cpu" and not triton.knobs.runtime.interpret:
        raise RuntimeError(
            "the Triton backend got CPU tensors but TRITON_INTERPRET=1 was not set when rlsd_kernels was imported;"
            " set it, or use RLSD_BACKEND=cpp|reference"
        )


def unit_vocab_stride(*xs) -> bool:
    """All tensors have a contiguous vocabulary dimension (int32 column offsets are then enough)."""
    return all(x.stride(-1) == 1 for x in xs)
