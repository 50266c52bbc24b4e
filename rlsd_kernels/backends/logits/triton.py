"""Triton backend: the vocabulary-chunked forward and backward of docs/math.md section 4.

Forward: one program per row walks the vocabulary once in ``BLOCK_V`` chunks, reading the student and the teacher
chunk together and keeping an online (running max, running sum) log-sum-exp for each and, when asked, the running
sum of ``p * (x - max)`` for the student entropy; the target logits are two scalar loads. Nothing of size ``N x V``
is written.

Backward: a 2-D grid (row, vocabulary chunk). The forward saved ``lse_s`` so every chunk is independent:
``grad = coef * (onehot - exp(x / T - lse)) / T``, formed in float32 and cast once on store. This re-reads the
student logits once and writes the gradient once, optionally into the logits buffer itself.

Offsets: the row base ``b * stride_b + t * stride_t`` is formed in int64 (``N * V`` exceeds 2^31 at real sizes);
column offsets stay int32 when the vocabulary dimension is contiguous (``V < 2^31``) and are widened otherwise.
"""
from __future__ import annotations

import triton
import triton.language as tl

from . import alloc_row_outputs
from ..triton_common import check_device, col_offsets, row_pointer, row_stats, target_logits, unit_vocab_stride
from ..triton_launch import LAUNCH

# Launch parameters live in triton_launch.LAUNCH (read at call time), with the measurements behind them.


@triton.jit
def _fused_logprobs_fwd(
    S, TCH, LABELS, LOGP_S, LOGP_T, LSE_S, ENT,
    seq_len, t_seq_len, V,
    s_sb, s_st, s_sv, t_sb, t_st, t_sv,
    inv_temp, ignore_index,
    HAS_TEACHER: tl.constexpr, WANT_ENT: tl.constexpr, CONTIG: tl.constexpr, BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    s_row = row_pointer(S, row, seq_len, s_sb, s_st)
    # the teacher may split the same rows differently ([B, T] vs [1, B*T] when only one is contiguous)
    t_row = row_pointer(TCH, row, t_seq_len, t_sb, t_st)
    label = tl.load(LABELS + row)
    tgt_s, tgt_t = target_logits(s_row, t_row, label, V, s_sv, t_sv, inv_temp, HAS_TEACHER)
    m_s, d_s, e_s, m_t, d_t, _, _ = row_stats(s_row, t_row, V, s_sv, t_sv, inv_temp, HAS_TEACHER, WANT_ENT, CONTIG,
                                           BLOCK_V, False, False, 0)

    # logp = (x_y - m) - log(d) rather than x_y - (m + log d): x_y - m is exact for logits of similar size, which
    # keeps float32 log-probs accurate at |logits| ~ 1e4 where m + log(d) would round away ~1e-3.
    log_d = tl.log(d_s)
    lse_s = m_s + log_d
    ignored = label == ignore_index
    tl.store(LSE_S + row, lse_s)
    tl.store(LOGP_S + row, tl.where(ignored, 0.0, (tgt_s - m_s) - log_d))
    if WANT_ENT:
        tl.store(ENT + row, log_d - e_s / d_s)
    if HAS_TEACHER:
        tl.store(LOGP_T + row, tl.where(ignored, 0.0, (tgt_t - m_t) - tl.log(d_t)))


@triton.jit
def _fused_logprobs_bwd(
    S, OUT, GRAD, LABELS, LSE,
    seq_len, V,
    s_sb, s_st, s_sv, o_sb, o_st, o_sv,
    inv_temp,
    CONTIG: tl.constexpr, BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    cols = chunk * BLOCK_V + tl.arange(0, BLOCK_V)
    inb = cols < V
    s_off = col_offsets(cols, s_sv, CONTIG)
    o_off = col_offsets(cols, o_sv, CONTIG)
    coef = tl.load(GRAD + row) * inv_temp
    lse = tl.load(LSE + row)
    label = tl.load(LABELS + row)
    x = tl.load(row_pointer(S, row, seq_len, s_sb, s_st) + s_off, mask=inb, other=float("-inf")).to(tl.float32)
    p = tl.exp(x * inv_temp - lse)
    # Rows with a zero coefficient (masked, ignore_index) and rows of only -inf (lse = -inf, softmax undefined) get
    # exactly 0, never 0 * nan; a NaN logit in a live row gives that row NaN, as IEEE and the reference do.
    live = (coef != 0) & (lse != float("-inf"))
    # Target term 1 - p[y] is formed in float32 before the cast (bf16 cancellation near p = 1).
    g = tl.where(live, coef * tl.where(cols == label, 1.0 - p, -p), 0.0)
    tl.store(row_pointer(OUT, row, seq_len, o_sb, o_st) + o_off, g.to(OUT.dtype.element_ty), mask=inb)


def forward(student, teacher, labels, temperature, ignore_index, want_entropy):
    check_device(student)
    B, T, V = student.shape
    n = B * T
    dev = student.device
    logp_s, logp_t, lse_s, ent = alloc_row_outputs(n, dev, teacher is not None, want_entropy)
    if n == 0:
        return logp_s, logp_t, lse_s, ent
    tch = teacher if teacher is not None else student  # dummy pointer, never read (HAS_TEACHER=False)
    block = min(LAUNCH["fwd_block_v"], triton.next_power_of_2(V))
    _fused_logprobs_fwd[(n,)](
        student, tch, labels, logp_s, logp_t if logp_t is not None else logp_s, lse_s,
        ent if ent is not None else logp_s,
        T, tch.shape[1], V,
        *student.stride(), *tch.stride(),
        1.0 / temperature, ignore_index,
        HAS_TEACHER=teacher is not None, WANT_ENT=want_entropy, CONTIG=unit_vocab_stride(student, tch),
        BLOCK_V=block, num_warps=LAUNCH["fwd_warps"],
    )
    return logp_s, logp_t, lse_s, ent


def backward(grad_logp, student, labels, lse, temperature, out):
    check_device(student)
    B, T, V = student.shape
    n = B * T
    if n == 0:
        return
    block = min(LAUNCH["bwd_block_v"], triton.next_power_of_2(V))
    grid = (n, triton.cdiv(V, block))
    _fused_logprobs_bwd[grid](
        student, out, grad_logp.contiguous(), labels, lse,
        T, V,
        *student.stride(), *out.stride(),
        1.0 / temperature,
        CONTIG=unit_vocab_stride(student, out), BLOCK_V=block, num_warps=LAUNCH["bwd_warps"],
    )


# Every kernel of this module by name, for the ahead-of-time compile test (tests/backends/aot_compile.py).
KERNELS = {"fused_logprobs_fwd": _fused_logprobs_fwd, "fused_logprobs_bwd": _fused_logprobs_bwd}


# The row terms (entropy bonus, distillation divergence: docs/math.md sections 2b/2c): triton_terms.py.
from .triton_terms import backward_terms, forward_terms  # noqa: E402,F401
# The loss with its token-local terms and its gradient in one launch (ops/fused_rows.py): triton_rows.py.
from .triton_rows import FUSED_ROWS_DIV_MODES, FUSED_ROWS_LOSS, fused_rows  # noqa: E402,F401
