"""Triton kernels of the row terms (docs/math.md sections 2b / 2c): the entropy bonus and the distillation
divergence, the two terms that need whole rows (``backends/logits/__init__.py`` has the interface).

Forward (one program per row): the scoring pass of ``triton.py`` plus, for a divergence, a running cross sum
weighted by the teacher (forward KL: ``sum p_T (x_T - x_S)``) or by the student (reverse KL), relative to the
running max and rescaled with it, so that ``D_t`` comes out of the same read of both rows. JSD needs ``log M`` of the
normalised probabilities: one more sweep over the row once both log-sum-exps are known.

Backward (a 2-D grid, row x vocabulary chunk, as ``triton.py``'s): ``[coef (onehot - p) - e p (log p + H) +
f dD/dz] / T``, reading the teacher chunk only for a divergence.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import alloc_row_outputs
from ..triton_common import (check_device, col_offsets, jsd_sums, log_mixture, row_pointer, row_stats,
                             target_logits, unit_vocab_stride)
from ..triton_launch import LAUNCH

FORWARD_KL, REVERSE_KL, JSD = 1, 2, 3  # backends.logits.DIV_MODES


@triton.jit
def _terms_fwd(
    S, TCH, LABELS, LOGP_S, LOGP_T, LSE_S, ENT, LSE_T, DIV, AUX,  # LSE_S, LSE_T: float64
    seq_len, t_seq_len, V,
    s_sb, s_st, s_sv, t_sb, t_st, t_sv,
    inv_temp, ignore_index, beta,
    HAS_TEACHER: tl.constexpr, DIV_MODE: tl.constexpr, CONTIG: tl.constexpr, BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    s_row = row_pointer(S, row, seq_len, s_sb, s_st)
    t_row = row_pointer(TCH, row, t_seq_len, t_sb, t_st)
    label = tl.load(LABELS + row)
    tgt_s, tgt_t = target_logits(s_row, t_row, label, V, s_sv, t_sv, inv_temp, HAS_TEACHER)
    # the entropy always (the terms' backward needs it), the divergence's cross sum in the same read
    m_s, d_s, e_s, m_t, d_t, c, e_t = row_stats(s_row, t_row, V, s_sv, t_sv, inv_temp, HAS_TEACHER, True, CONTIG, BLOCK_V,
                                           False, False, DIV_MODE)
    log_d = tl.log(d_s)
    ignored = label == ignore_index
    tl.store(LSE_S + row, m_s.to(tl.float64) + log_d.to(tl.float64))
    tl.store(LOGP_S + row, tl.where(ignored, 0.0, (tgt_s - m_s) - log_d))
    tl.store(ENT + row, log_d - e_s / d_s)
    if HAS_TEACHER:
        log_dt = tl.log(d_t)
        tl.store(LOGP_T + row, tl.where(ignored, 0.0, (tgt_t - m_t) - log_dt))
        if DIV_MODE != 0:
            # float64: at |logits| ~ 1e4 a float32 lse is rounded by ~5e-4, a relative error of every p_T
            tl.store(LSE_T + row, m_t.to(tl.float64) + log_dt.to(tl.float64))
            if DIV_MODE == 1:  # KL(p_w || p_o) = (e_w - c) / d_w - log d_w + log d_o
                tl.store(DIV + row, (e_t - c) / d_t - log_dt + log_d)
            if DIV_MODE == 2:
                tl.store(DIV + row, (e_s - c) / d_s - log_d + log_dt)
            if DIV_MODE == 3:  # second sweep: sum p_T (log p_T - log M) and sum p_S (log p_S - log M)
                jsd, aux = jsd_sums(s_row, t_row, V, s_sv, t_sv, inv_temp, m_s, log_d, m_t, log_dt, beta, CONTIG,
                                    BLOCK_V)
                tl.store(DIV + row, jsd)
                tl.store(AUX + row, aux)


@triton.jit
def _terms_bwd(
    S, TCH, OUT, COEF, ECOEF, FCOEF, LABELS, LSE, ENT, LSE_T, DIV, AUX,
    seq_len, t_seq_len, V,
    s_sb, s_st, s_sv, t_sb, t_st, t_sv, o_sb, o_st, o_sv,
    inv_temp, beta,
    HAS_ENT: tl.constexpr, DIV_MODE: tl.constexpr, CONTIG: tl.constexpr, BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    cols = chunk * BLOCK_V + tl.arange(0, BLOCK_V)
    inb = cols < V
    coef = tl.load(COEF + row) * inv_temp
    lse64 = tl.load(LSE + row)  # float64, used as two float32 parts: (x - hi) - lo
    lse = lse64.to(tl.float32)
    lse_lo = (lse64 - lse.to(tl.float64)).to(tl.float32)
    label = tl.load(LABELS + row)
    x = tl.load(row_pointer(S, row, seq_len, s_sb, s_st) + col_offsets(cols, s_sv, CONTIG), mask=inb,
                other=float("-inf")).to(tl.float32)
    lp = (x * inv_temp - lse) - lse_lo
    p = tl.exp(lp)
    g = coef * tl.where(cols == label, 1.0 - p, -p)  # target term in float32 before the cast
    live = coef != 0
    if HAS_ENT:
        e = tl.load(ECOEF + row) * inv_temp
        g -= e * tl.where(p > 0, p * (lp + tl.load(ENT + row)), 0.0)
        live = live | (e != 0)
    if DIV_MODE != 0:
        f = tl.load(FCOEF + row) * inv_temp
        y = tl.load(row_pointer(TCH, row, t_seq_len, t_sb, t_st) + col_offsets(cols, t_sv, CONTIG), mask=inb,
                    other=float("-inf")).to(tl.float32)
        lse_t = tl.load(LSE_T + row)  # float64, used as two float32 parts: (y - hi) - lo
        lse_hi = lse_t.to(tl.float32)
        lse_lo = (lse_t - lse_hi.to(tl.float64)).to(tl.float32)
        lt = (y * inv_temp - lse_hi) - lse_lo
        if DIV_MODE == 1:
            g += f * (p - tl.exp(lt))
        if DIV_MODE == 2:
            g += f * tl.where(p > 0, p * (lp - lt - tl.load(DIV + row)), 0.0)
        if DIV_MODE == 3:
            lm = log_mixture(lt, lp, beta)
            g += f * (1.0 - beta) * tl.where(p > 0, p * (lp - lm - tl.load(AUX + row)), 0.0)
        live = live | (f != 0)
    # rows with nothing to contribute (masked, ignore_index: they may hold garbage) or of only -inf logits get 0
    g = tl.where(live & (lse != float("-inf")), g, 0.0)
    tl.store(row_pointer(OUT, row, seq_len, o_sb, o_st) + col_offsets(cols, o_sv, CONTIG),
             g.to(OUT.dtype.element_ty), mask=inb)


def forward_terms(student, teacher, labels, temperature, ignore_index, want_entropy, div_mode, beta):
    check_device(student)
    B, T, V = student.shape
    n = B * T
    dev = student.device
    logp_s, logp_t, _, ent = alloc_row_outputs(n, dev, teacher is not None, True)
    lse_s = torch.empty(n, dtype=torch.float64, device=dev)  # float64: see backends/logits/__init__.py
    lse_t = div = aux = None
    if div_mode:
        lse_t = torch.zeros(n, dtype=torch.float64, device=dev)  # see backends/logits/__init__.py
        div, aux = (torch.zeros(n, dtype=torch.float32, device=dev) for _ in range(2))
    if n:
        tch = teacher if teacher is not None else student  # dummy pointer without a teacher, never read
        block = min(LAUNCH["fwd_block_v"], triton.next_power_of_2(V))
        _terms_fwd[(n,)](
            student, tch, labels, logp_s, logp_t if logp_t is not None else logp_s, lse_s, ent,
            lse_t if div_mode else lse_s, div if div_mode else logp_s, aux if div_mode else logp_s,
            T, tch.shape[1], V, *student.stride(), *tch.stride(),
            1.0 / temperature, ignore_index, float(beta),
            HAS_TEACHER=teacher is not None, DIV_MODE=int(div_mode), CONTIG=unit_vocab_stride(student, tch),
            BLOCK_V=block, num_warps=LAUNCH["fwd_warps"],
        )
    return logp_s, logp_t, lse_s, ent, lse_t, div, aux  # the entropy always: the kernel has it for free


def backward_terms(coef, ent_coef, div_coef, student, teacher, labels, lse, entropy, lse_t, div, aux, temperature,
                   div_mode, beta, out):
    check_device(student)
    B, T, V = student.shape
    n = B * T
    if n == 0:
        return
    tch = teacher if div_mode else student
    dummy = coef  # float32 pointers never read (their flags are off)
    block = min(LAUNCH["bwd_block_v"], triton.next_power_of_2(V))
    _terms_bwd[(n, triton.cdiv(V, block))](
        student, tch, out, coef, dummy if ent_coef is None else ent_coef, dummy if div_coef is None else div_coef,
        labels, lse, dummy if entropy is None else entropy, lse_t if div_mode else lse,
        div if div_mode else dummy, aux if div_mode else dummy,
        T, tch.shape[1], V, *student.stride(), *tch.stride(), *out.stride(),
        1.0 / temperature, float(beta),
        HAS_ENT=ent_coef is not None, DIV_MODE=int(div_mode), CONTIG=unit_vocab_stride(student, tch, out),
        BLOCK_V=block, num_warps=LAUNCH["bwd_warps"],
    )


# Every kernel of this module by name, for the ahead-of-time compile test (tests/backends/aot_compile.py).
KERNELS = {"terms_fwd": _terms_fwd, "terms_bwd": _terms_bwd}
