"""Triton backend of the fused RLSD loss: the whole of docs/math.md sections 2-3 in three small launches.

1. ``prologue`` (one program, ``triton_prologue.py``): label range check (device-side error flags instead of a host
   sync), the mask count, the per-token aggregation weight ``a_t`` of every mode, per-sequence advantages broadcast
   to tokens, and the ``cu_seqlens`` checks. O(N) work.
2. ``_loss_rows`` (persistent programs, one row at a time): per row, one sweep over the vocabulary reading the
   student and teacher logits together (online log-sum-exp of both, target logits, entropy), the per-row epilogue
   (weights, ratio, clipping, ``a_t * d loss_t / d logp_s``), and, when the student needs a gradient, a second
   sweep over the same row that writes ``a_t * c_t * (onehot - softmax) / T``. The second sweep re-reads the student
   row while it is still in L2: rows in flight are bounded so that they fit (``LAUNCH["loss_l2_budget_mib"]``), the
   student is loaded ``evict_last`` in the first sweep and the teacher ``evict_first``. HBM traffic is then 3 passes
   over ``N x V`` for RLSD (read z_S, read z_T, write the gradient) and 2 for GRPO.
3. ``_finalize`` (one program): fixed-order sums of the per-row partials into the loss and the metrics
   (deterministic, no atomics).

The backward is a scale of the precomputed gradient by ``grad_output`` on the device (``scale_``), which touches no
memory when ``grad_output == 1``: the usual case costs one launch and no bytes.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl

from ..triton_common import (check_device, col_offsets, jsd_sums, load_chunk, lse_chunk, row_pointer, row_stats,
                             target_logits, unit_vocab_stride)
from ..triton_epilogue import row_epilogue, terms_chunk_grad
from .triton_prologue import prologue as _prologue
from ..triton_launch import LAUNCH

AGG_CODES = {"token": 0, "seq": 1, "sum": 2}
N_ROWSTATS = 9  # loss, clipped, dual, -log_ratio, w_low, w_high, delta, g, valid (rows of the partials buffer)
N_TERM_PARTS = 12  # the fused rows' (triton_rows.py): and the per-token KL, entropy and divergence of their metrics


@triton.jit
def _loss_rows(
    S, TCH, GRAD, LABELS, AGG, ADV, OLD, TLP, REF, WIS, INMASK,
    LOGP_S, LOGP_T, WEIGHT, ENT, LSE, COEF, PARTS, LSE_T, DIV, AUX,
    N, seq_len, t_seq_len, g_seq_len, V,
    s_sb, s_st, s_sv, t_sb, t_st, t_sv, g_sb, g_st, g_sv,
    inv_temp, ignore_index, lam, eps_w, log_lo, log_hi, clip_dual, kl_coef, entropy_coef, distill_coef, distill_clip,
    beta,
    TEACHER: tl.constexpr, HAS_OLD: tl.constexpr, WANT_ENT: tl.constexpr, CISPO: tl.constexpr,
    WRITE_GRAD: tl.constexpr, CONTIG: tl.constexpr, BLOCK_V: tl.constexpr, PREFETCH: tl.constexpr,
    ROW_IN_REGS: tl.constexpr, KL_TYPE: tl.constexpr, HAS_WIS: tl.constexpr, ENT_GRAD: tl.constexpr,
    DIV_MODE: tl.constexpr, TERM_PARTS: tl.constexpr, HAS_INMASK: tl.constexpr,
):
    # TEACHER: 0 none (GRPO), 1 teacher logits (read in the same sweep), 2 teacher log-probs per token.
    # KL_TYPE / HAS_WIS / ENT_GRAD / DIV_MODE: the section 2c token-local terms of the fused rows (triton_rows.py):
    # KL to REF, the rollout IS weight WIS on the policy term, the entropy bonus -entropy_coef * a_t * H_t, whose
    # gradient -p (log p + H) / T the second sweep adds (ENT_GRAD needs WANT_ENT), and the distillation term
    # distill_coef * a_t * D_t (DIV_MODE 1 forward KL, 2 reverse KL, 3 JSD with weight beta; TEACHER 1, not
    # ROW_IN_REGS): the KLs' cross sums in sweep 1 (row_stats), JSD's sums in a sweep of their own once both
    # log-sum-exps are known (jsd_sums), D_t, the teacher's lse and JSD's KL(p_S || M) into DIV / LSE_T / AUX, the
    # gradient in sweep 2, which then re-reads the teacher chunk too. TERM_PARTS: PARTS has 12 rows, the loss partial
    # (row 0) holds every term, and rows 9-11 the per-token KL, entropy and (clipped) divergence for their metrics.
    # HAS_INMASK: INMASK is the section 2 mask that the inputs are masked with (rollout rejection: AGG is 0 on more).
    NEG_INF: tl.constexpr = float("-inf")
    cols0 = tl.arange(0, BLOCK_V)
    for program_row in range(tl.program_id(0), N, tl.num_programs(0)):
        row = program_row + tl.zeros((), tl.int64)  # int64 offsets: N * V exceeds 2^31
        s_row = row_pointer(S, row, seq_len, s_sb, s_st)
        t_row = row_pointer(TCH, row, t_seq_len, t_sb, t_st)
        label = tl.load(LABELS + row).to(tl.int64)
        # a_t > 0 exactly for tokens that take part in the loss; float32 whatever its dtype (the fused rows pass
        # float64), so that nothing per element is computed in float64
        agg = tl.load(AGG + row).to(tl.float32)
        tgt_s, tgt_t = target_logits(s_row, t_row, label, V, s_sv, t_sv, inv_temp, TEACHER == 1)

        # ---- sweep 1: online log-sum-exp of student (and teacher), entropy; the student row is kept in L2 (or, with
        # ROW_IN_REGS, the whole row is one block that stays in registers for the gradient)
        if ROW_IN_REGS:
            x_row, y_row = load_chunk(s_row, t_row, 0, cols0, V, s_sv, t_sv, TEACHER == 1, CONTIG, False)
            x_row = x_row.to(tl.float32) * inv_temp
            m_s, shift, alpha, p = lse_chunk(tl.full((), NEG_INF, tl.float32), tl.zeros((), tl.float32), x_row)
            d_s = tl.sum(p, axis=0)
            e_s = tl.zeros((), tl.float32)
            if WANT_ENT:
                e_s = tl.sum(p * tl.where(p > 0, x_row - shift, 0.0), axis=0)
            m_t = tl.full((), NEG_INF, tl.float32)
            d_t = tl.zeros((), tl.float32)
            if TEACHER == 1:
                m_t, t_shift, t_alpha, q = lse_chunk(m_t, d_t, y_row.to(tl.float32) * inv_temp)
                d_t = tl.sum(q, axis=0)
            cross = tl.zeros((), tl.float32)  # (no divergence with ROW_IN_REGS)
            e_t = tl.zeros((), tl.float32)
        else:
            m_s, d_s, e_s, m_t, d_t, cross, e_t = row_stats(s_row, t_row, V, s_sv, t_sv, inv_temp, TEACHER == 1,
                                                         WANT_ENT, CONTIG, BLOCK_V, PREFETCH, True, DIV_MODE)

        # ---- per-row epilogue (docs/math.md sections 2-3)
        lse, coef, part, kl_t = row_epilogue(row, N, m_s, d_s, e_s, m_t, d_t, tgt_s, tgt_t, label, agg, V,
                                             ignore_index, lam, eps_w, log_lo, log_hi, clip_dual, kl_coef, ADV, OLD,
                                             TLP, REF, WIS, INMASK, LOGP_S, LOGP_T, WEIGHT, ENT, LSE, COEF, PARTS,
                                             TEACHER, HAS_OLD, WANT_ENT, CISPO, KL_TYPE, HAS_WIS, HAS_INMASK)

        log_d = tl.log(d_s)
        log_dt = tl.log(d_t)
        H = tl.zeros((), tl.float32)
        if ENT_GRAD:  # the entropy of the row, for the bonus' loss share and gradient
            H = log_d - e_s / d_s
        D = tl.zeros((), tl.float32)
        aux = tl.zeros((), tl.float32)
        f_scale = tl.zeros((), tl.float32)
        if DIV_MODE != 0:  # KL(p_w || p_o) = (e_w - c) / d_w - log d_w + log d_o, as triton_terms.py
            if DIV_MODE == 1:
                D = (e_t - cross) / d_t - log_dt + log_d
            elif DIV_MODE == 2:
                D = (e_s - cross) / d_s - log_d + log_dt
            else:
                D, aux = jsd_sums(s_row, t_row, V, s_sv, t_sv, inv_temp, m_s, log_d, m_t, log_dt, beta, CONTIG,
                                  BLOCK_V)
                tl.store(AUX + row, aux)
            tl.store(LSE_T + row, m_t.to(tl.float64) + log_dt.to(tl.float64))
            tl.store(DIV + row, D)
            # d loss / d D_t = distill_coef * a_t; beyond the clip the value is capped and the gradient 0 (NaN passes)
            f = tl.where(agg > 0, distill_coef * agg, 0.0)
            f_scale = tl.where((distill_clip < float("inf")) & (D > distill_clip), 0.0, f) * inv_temp
        if TERM_PARTS:  # the row terms' share of the loss, and the per-token values of their metrics
            in_loss = agg > 0
            H_t = tl.where(in_loss, H, 0.0)
            if ENT_GRAD:
                part += tl.where(in_loss, -entropy_coef * agg * H_t, 0.0)
            D_t = tl.zeros((), tl.float32)
            if DIV_MODE != 0:  # capped at the clip (torch.clamp's max: NaN stays NaN)
                D_t = tl.where(in_loss, tl.where(D > distill_clip, distill_clip, D), 0.0)
                part += tl.where(in_loss, distill_coef * agg * D_t, 0.0)
            tl.store(PARTS + 9 * N + row, kl_t)
            tl.store(PARTS + 10 * N + row, H_t)
            tl.store(PARTS + 11 * N + row, D_t)
        tl.store(PARTS + row, part)

        # ---- sweep 2: the gradient of the row, re-read from L2
        if WRITE_GRAD:
            g_row = row_pointer(GRAD, row, g_seq_len, g_sb, g_st)
            scale = coef * inv_temp
            e_scale = tl.zeros((), tl.float32)
            if ENT_GRAD:  # d loss / d H_t = -entropy_coef * a_t
                e_scale = tl.where(agg > 0, -entropy_coef * agg, 0.0) * inv_temp
            # rows with no factor (masked) and rows of only -inf get exactly 0 (0 * nan would be nan); NaN rows stay
            # NaN (e_scale / f_scale are the constant 0 when their term is off)
            live = ((scale != 0) | (e_scale != 0) | (f_scale != 0)) & (lse != NEG_INF)
            if ROW_IN_REGS:
                if ENT_GRAD:
                    grad = terms_chunk_grad(x_row, x_row, m_s, log_d, H, m_t, log_dt, D, aux, beta, cols0, label,
                                            scale, e_scale, f_scale, ENT_GRAD, 0)
                else:
                    p = tl.exp(x_row - lse)
                    grad = scale * tl.where(cols0 == label, 1.0 - p, -p)
                grad = tl.where(live, grad, 0.0)
                tl.store(g_row + col_offsets(cols0, g_sv, CONTIG), grad.to(GRAD.dtype.element_ty), mask=cols0 < V)
            # backwards: the chunks read last in sweep 1 are the likeliest still in L2
            n_chunks = tl.cdiv(V, BLOCK_V)
            if ROW_IN_REGS:
                n_chunks = 0
            for k in range(0, n_chunks):
                cols = (n_chunks - 1 - k) * BLOCK_V + cols0
                inb = cols < V
                s_off = col_offsets(cols, s_sv, CONTIG)
                g_off = col_offsets(cols, g_sv, CONTIG)
                x = tl.load(s_row + s_off, mask=inb, other=NEG_INF, eviction_policy="evict_first").to(tl.float32)
                if ENT_GRAD or DIV_MODE != 0:
                    y = x
                    if DIV_MODE != 0:
                        y = tl.load(t_row + col_offsets(cols, t_sv, CONTIG), mask=inb, other=NEG_INF,
                                    eviction_policy="evict_first").to(tl.float32)
                    grad = terms_chunk_grad(x * inv_temp, y * inv_temp, m_s, log_d, H, m_t, log_dt, D, aux, beta, cols,
                                            label, scale, e_scale, f_scale, ENT_GRAD, DIV_MODE)
                else:
                    p = tl.exp(x * inv_temp - lse)
                    # the target term 1 - p[y] is formed in float32 before the cast (bf16 cancellation near p = 1)
                    grad = scale * tl.where(cols == label, 1.0 - p, -p)
                grad = tl.where(live, grad, 0.0)
                # streaming store: the gradient is not re-read, keep L2 for the student rows
                tl.store(g_row + g_off, grad.to(GRAD.dtype.element_ty), mask=inb, eviction_policy="evict_first")


@triton.jit
def _finalize(PARTS, LOSS, METRICS, N, BLOCK: tl.constexpr, K: tl.constexpr, N_PARTS: tl.constexpr):
    """Fixed-order sums of the per-row partials: loss = sum a_t * loss_t; metrics = masked means (the 7 of rows 1-7,
    and with N_PARTS = 12 the row terms' 3 of rows 9-11)."""
    k = tl.arange(0, K)[:, None]
    acc = tl.zeros((K, BLOCK), tl.float32)
    for start in range(0, N, BLOCK):
        r = start + tl.arange(0, BLOCK)[None, :]
        acc += tl.load(PARTS + k.to(tl.int64) * N + r, mask=(k < N_PARTS) & (r < N), other=0.0)
    sums = tl.sum(acc, axis=1)
    kk = tl.arange(0, K)
    count = tl.maximum(tl.sum(tl.where(kk == 8, sums, 0.0), axis=0), 1.0)
    tl.store(LOSS, tl.sum(tl.where(kk == 0, sums, 0.0), axis=0))
    tl.store(METRICS + kk - 1, sums / count, mask=(kk >= 1) & (kk <= 7))
    if N_PARTS > 9:
        tl.store(METRICS + kk - 2, sums / count, mask=(kk >= 9) & (kk < N_PARTS))


@triton.jit
def _scale_grad(GRAD, GOUT, numel, BLOCK: tl.constexpr):
    """GRAD *= grad_output in place; no memory is touched when grad_output == 1 (the loop has no iterations)."""
    gout = tl.load(GOUT).to(tl.float32)
    stop = tl.where(gout != 1.0, numel, 0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    for start in range(tl.program_id(0).to(tl.int64) * BLOCK, stop, tl.num_programs(0).to(tl.int64) * BLOCK):
        o = start + offs
        m = o < numel
        x = tl.load(GRAD + o, mask=m).to(tl.float32)
        tl.store(GRAD + o, (x * gout).to(GRAD.dtype.element_ty), mask=m)


# ------------------------------------------------------------------------------------------------ host side
# Every kernel of this module by name, for the ahead-of-time compile test (tests/backends/aot_compile.py).
KERNELS = {"prologue": _prologue, "loss_rows": _loss_rows, "finalize": _finalize, "scale_grad": _scale_grad}
_SM_COUNT = {}


def _programs(device, n_rows: int, row_bytes: int) -> int:
    """Persistent programs for ``_loss_rows``: enough rows in flight to saturate HBM, few enough that their
    student rows stay in L2 until the gradient sweep re-reads them."""
    if device.type != "cuda":
        return max(1, min(n_rows, LAUNCH["loss_interpreter_programs"]))
    budget = LAUNCH["loss_l2_budget_mib"] * 2 ** 20
    if budget <= 0:
        return n_rows
    if device.index not in _SM_COUNT:
        _SM_COUNT[device.index] = torch.cuda.get_device_properties(device).multi_processor_count
    sms = _SM_COUNT[device.index]
    by_l2 = budget // max(row_bytes, 1)
    return max(1, min(n_rows, max(sms * LAUNCH["loss_min_programs_per_sm"], by_l2)))


def fused_loss(student, teacher, teacher_logprobs, labels, advantages, adv_per_seq, old_logprobs, mask,
               cu_seqlens, num_seqs, seq_len, h, want_entropy, grad):
    """Run the three kernels. ``student``/``teacher``/``grad``: ``[B, T, V]`` views (``grad`` None: no gradient);
    labels/advantages/old/mask: contiguous, one value per row (advantages one per sequence when ``adv_per_seq``).
    Returns ``(loss, logp_s, logp_t, weights, entropy, metrics, errors, lse, coef)``; per-row outputs are flat."""
    check_device(student)
    B, T, V = student.shape
    n = B * T
    dev = student.device
    f32 = dict(dtype=torch.float32, device=dev)
    logp_s = torch.empty(n, **f32)
    weights = torch.empty(n, **f32)
    lse = torch.empty(n, **f32)
    coef = torch.empty(n, **f32)
    agg = torch.empty(n, **f32)
    parts = torch.empty(N_ROWSTATS, n, **f32)
    logp_t = torch.empty(n, **f32) if teacher is not None else None
    ent = torch.empty(n, **f32) if want_entropy else None
    loss = torch.empty((), **f32)
    metrics = torch.empty(7, **f32)
    errors = torch.empty(3, dtype=torch.int64, device=dev)
    seq_aware = adv_per_seq or h.loss_agg_mode == "seq"
    adv_rows = torch.empty(n, **f32) if adv_per_seq else advantages
    seq_cnt = torch.empty(max(num_seqs, 1), **f32) if seq_aware else agg
    if n == 0:
        return (loss.zero_(), logp_s, logp_t, weights, ent, metrics.zero_(), errors.zero_(), lse, coef)
    dummy = agg
    _prologue[(1,)](
        labels, mask if mask is not None else dummy, cu_seqlens if cu_seqlens is not None else dummy,
        advantages, agg, adv_rows, seq_cnt, errors,
        n, V, seq_len, num_seqs, h.ignore_index, 1.0 / h.norm if h.loss_agg_mode == "sum" else 1.0,
        HAS_MASK=mask is not None, HAS_CU=cu_seqlens is not None, AGG_MODE=AGG_CODES[h.loss_agg_mode],
        ADV_PER_SEQ=adv_per_seq, BLOCK=LAUNCH["prologue_block"], BLOCK_S=16, BLOCK_T=LAUNCH["prologue_tile_t"],
        num_warps=LAUNCH["small_warps"],
    )
    launch_rows(student, teacher, grad, labels, agg, adv_rows, old_logprobs, teacher_logprobs,
                (logp_s, logp_t, weights, ent, lse, coef, parts), h)
    finalize(parts, loss, metrics)
    return loss, logp_s, logp_t, weights, ent, metrics, errors, lse, coef


def finalize(parts, loss, metrics) -> None:
    """The loss and the metrics from the ``[9 or 12, N]`` per-row partials (one program, fixed order)."""
    _finalize[(1,)](parts, loss, metrics, parts.shape[1], BLOCK=LAUNCH["finalize_block"], K=16,
                    N_PARTS=parts.shape[0], num_warps=LAUNCH["small_warps"])


def scale_(grad, grad_output) -> None:
    """``grad *= grad_output`` on the device (``grad`` contiguous); free when grad_output is 1."""
    check_device(grad)
    numel = grad.numel()
    if numel == 0:
        return
    block = LAUNCH["scale_block"]
    if grad.device.type == "cuda":
        if grad.device.index not in _SM_COUNT:
            _SM_COUNT[grad.device.index] = torch.cuda.get_device_properties(grad.device).multi_processor_count
        programs = _SM_COUNT[grad.device.index] * 8
    else:
        programs = 4
    programs = max(1, min(programs, triton.cdiv(numel, block)))
    _scale_grad[(programs,)](grad, grad_output, numel, BLOCK=block, num_warps=8)


class RowTerms(NamedTuple):
    """The section 2c token-local terms of ``_loss_rows`` (the fused rows, ``triton_rows.py``)."""
    ref: Optional[torch.Tensor] = None   # [N] reference log-probs (KL term), None: off
    w_is: Optional[torch.Tensor] = None  # [N] rollout IS weights on the policy term, None: off
    kl_coef: float = 0.0
    kl_type: int = 0                     # 0 off, 1 / 2 / 3: k1 / k2 / k3
    entropy_coef: float = 0.0            # > 0: the entropy bonus in the gradient (needs the entropy)
    div_mode: int = 0                    # 0 off, 1 / 2 / 3: forward KL / reverse KL / JSD distillation (teacher logits)
    distill_coef: float = 0.0
    beta: float = 0.5                    # JSD's mixture weight
    distill_clip: float = math.inf       # D_t beyond it: capped value, no gradient
    lse_t: Optional[torch.Tensor] = None  # [N] float64 output: the teacher's lse (div_mode)
    div: Optional[torch.Tensor] = None    # [N] float32 output: D_t, unclipped (div_mode)
    aux: Optional[torch.Tensor] = None    # [N] float32 output: JSD's KL(p_S || M) (div_mode 3)
    in_mask: Optional[torch.Tensor] = None  # [N] bool: the section 2 mask, where rollout rejection narrows agg > 0


def launch_rows(student, teacher, grad, labels, agg, adv, old, teacher_logprobs, outs, h, terms=RowTerms()):
    """One launch of ``_loss_rows``: per row the statistics, the epilogue and, with ``grad`` (a ``[B, T, V]`` view,
    which may be ``student`` itself), the gradient. ``agg``, ``adv``, ``old``, ``teacher_logprobs``: ``[N]`` per row
    (any float dtype; None where absent); ``outs``: the ``[N]`` float32 outputs ``(logp_s, logp_t | None, weights,
    entropy | None, lse, coef)`` and the ``[9, N]`` partials (``[12, N]``: the row terms' share of the loss in row 0
    and their metrics' per-token values in rows 9-11, for ``finalize``)."""
    logp_s, logp_t, weights, ent, lse, coef, parts = outs
    B, T, V = student.shape
    n = B * T
    dummy = coef
    opt = lambda t: dummy if t is None else t  # noqa: E731  (pointers whose flag is off are never read)
    if terms.div_mode and (teacher is None or terms.lse_t is None or terms.div is None
                           or (terms.div_mode == 3 and terms.aux is None)):
        raise ValueError("launch_rows: a divergence needs the teacher logits and the lse_t / div (JSD: aux) outputs")
    # A row short enough to live in registers is loaded once: exactly 3 passes (2 for GRPO), no L2 re-read
    # (without a divergence, whose cross sums the chunked sweep keeps).
    row_in_regs = 0 < triton.next_power_of_2(V) <= LAUNCH["loss_row_in_regs_max"] and not terms.div_mode
    tch = teacher if teacher is not None else student  # never read without a teacher (TEACHER != 1)
    out = grad if grad is not None else student  # never written without WRITE_GRAD
    args = (student, tch, out, labels, agg, adv, opt(old), opt(teacher_logprobs), opt(terms.ref), opt(terms.w_is),
            opt(terms.in_mask), logp_s, opt(logp_t), weights, opt(ent), lse, coef, parts, opt(terms.lse_t), opt(terms.div),
            opt(terms.aux))
    scalars = (n, T, tch.shape[1], out.shape[1], V,
               *student.stride(), *tch.stride(), *out.stride(),
               1.0 / h.temperature, h.ignore_index, float(h.lam), float(h.eps_w),
               math.log(1.0 - h.clip_low), math.log(1.0 + h.clip_high), float(h.clip_dual), float(terms.kl_coef),
               float(terms.entropy_coef), float(terms.distill_coef), float(terms.distill_clip), float(terms.beta))
    constexprs = dict(TEACHER=1 if teacher is not None else (2 if teacher_logprobs is not None else 0),
                      HAS_OLD=old is not None, WANT_ENT=ent is not None, CISPO=h.loss_type == "cispo",
                      WRITE_GRAD=grad is not None, CONTIG=unit_vocab_stride(student, tch, out),
                      KL_TYPE=int(terms.kl_type), HAS_WIS=terms.w_is is not None,
                      ENT_GRAD=grad is not None and terms.entropy_coef > 0, DIV_MODE=int(terms.div_mode),
                      TERM_PARTS=parts.shape[0] > N_ROWSTATS, HAS_INMASK=terms.in_mask is not None)
    if constexprs["ENT_GRAD"] and ent is None:
        raise ValueError("launch_rows: the entropy bonus needs the entropy output")
    if row_in_regs:
        block, warps, programs = triton.next_power_of_2(V), LAUNCH["loss_row_warps"], n
    else:
        block, warps = min(LAUNCH["loss_block_v"], triton.next_power_of_2(V)), LAUNCH["loss_warps"]
        programs = _programs(student.device, n, V * student.element_size())
    _loss_rows[(programs,)](*args, *scalars, **constexprs, BLOCK_V=block,
                            PREFETCH=bool(LAUNCH["loss_prefetch"]) and V > block, ROW_IN_REGS=row_in_regs,
                            num_warps=warps)
