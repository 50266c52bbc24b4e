"""Triton backend of the fused *linear* log-prob pass: LM-head projection + log-softmax, never materialising logits.

Shapes: ``hidden [N, H]`` (any strides), ``weight [V, H]`` (any strides; tied input embeddings work), optional
``bias [V]``, optional ``teacher [N, H]`` (teacher hidden states, projected with the SAME weight/bias), ``labels``
int64 ``[N]``. Everything is accumulated in float32; ``tl.dot`` runs with ``input_precision="ieee"`` so float32
inputs are not silently rounded to TF32 (docs/math.md section 7 asks 1e-5 relative for float32).

Forward (``_linear_fwd``), grid ``(cdiv(N, BLOCK_N),)``: a program owns ``BLOCK_N`` rows and walks the vocabulary in
``BLOCK_V`` tiles. Each logit tile ``[BLOCK_N, BLOCK_V]`` is ``sum_k hidden[:, k-tile] @ weight[v-tile, k-tile]^T``
over ``BLOCK_H`` slices of the hidden dimension; with a teacher, the teacher's tile is formed from the SAME loaded
weight tile (one weight read serves both). The finished tile is merged into a per-row online log-sum-exp (running
max, running sum), the target logit and, when asked, the running sum of ``p * x`` for the entropy, exactly like the
logits-level kernel (``backends/logits/triton.py``). Outputs are O(N): ``logp_s, logp_t, lse_s, entropy``.

Backward: ``dlogits = coef * (onehot - p) / T`` with ``p = exp(x / T - lse)`` is recomputed tile by tile in
registers, never written. Reduction strategy (deterministic, no atomics): two kernels, each owning its output.
- ``_linear_bwd_dh``, grid over row blocks: for every V tile, recompute the logit tile, form ``dlogits`` and add
  ``dlogits @ weight[v-tile]`` into the program's own ``[BLOCK_N, H]`` slab of a float32 accumulator (one
  read-modify-write per H slice; no other program touches those rows, so the summation order is fixed).
- ``_linear_bwd_dw``, grid over V tiles: for every row block, recompute the tile, form ``dlogits`` and add
  ``dlogits^T @ hidden[row-block]`` into the program's own ``[BLOCK_V, H]`` slab of the float32 ``dW`` accumulator;
  the bias gradient (column sums of ``dlogits``) stays in registers and is stored once.
Bit-for-bit reproducible run to run. The price is that the backward recomputes the logit tiles twice (4 N*V*H
MACs in all instead of 3 with atomics); only the kernel needed for the requested gradients is launched.
No tile is skipped (every tile contributes to the softmax sum), so accuracy is that of a dense evaluation.

Scratch: float32 accumulators of ``d hidden`` ``[N, H]`` and ``d weight`` ``[V, H]`` (for float32 inputs they are
the returned gradients themselves), O(N) row statistics; nothing of size ``N x V``.

Offsets: row offsets ``row * stride`` and vocabulary offsets ``col * stride`` are formed in int64 (``N * H`` and
``V * H`` exceed 2^31 at real sizes); offsets along H stay int32.

float64 inputs are not served here (``tl.dot`` would accumulate in float32): the dispatcher (``dispatch.py``) sends
them to the token-chunked path.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..logits import alloc_row_outputs
from ..triton_common import check_device

# Launch parameters: untuned starting points (no GPU was available when this was written; see bench/linear.py).
# BLOCK_N x BLOCK_V logit tiles of 64 x 128 float32 = 32 KiB of accumulator per program (two with a teacher), the
# usual tensor-core tile for bf16 GEMMs; BLOCK_H = 64 keeps each operand tile at 8-16 KiB in shared memory.
_FWD = dict(BLOCK_N=64, BLOCK_V=128, BLOCK_H=64, num_warps=8)
# d hidden: wider V tiles raise the MACs per read-modify-write of the [BLOCK_N, H] float32 slab.
_BWD_DH = dict(BLOCK_N=64, BLOCK_V=128, BLOCK_H=64, num_warps=8)
_BWD_DW = dict(BLOCK_N=64, BLOCK_V=128, BLOCK_H=64, num_warps=8)
# Under TRITON_INTERPRET=1 every tile op is a numpy call: bigger V tiles mean fewer Python iterations.
_INTERP = dict(BLOCK_N=16, BLOCK_V=256, BLOCK_H=32, num_warps=1)

NEG_INF = float("-inf")


@triton.jit
def _mma(a, b, acc, DOT_F32: tl.constexpr):
    """``acc + a @ b`` in float32. ``DOT_F32`` (set under TRITON_INTERPRET=1 only) upcasts the operands first: the
    interpreter of triton 3.9 returns garbage for bfloat16 ``tl.dot``; bf16 x bf16 products are exact in float32, so
    the result is the one the tensor cores give."""
    if DOT_F32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b, acc, input_precision="ieee")


@triton.jit
def _logit_tile(HID, W, BIAS, rows64, row_ok, cols64, col_ok, H, s_hn, s_hh, s_wv, s_wh, inv_temp,
                HAS_BIAS: tl.constexpr, DOT_F32: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr):
    """``(hidden[rows] @ weight[cols]^T + bias[cols]) / T`` as a float32 [BLOCK_N, BLOCK_V] tile, -inf off the end."""
    acc = tl.zeros((BLOCK_N, BLOCK_V), tl.float32)
    for k0 in range(0, H, BLOCK_H):
        ks = k0 + tl.arange(0, BLOCK_H)
        k_ok = ks < H
        h = tl.load(HID + rows64[:, None] * s_hn + ks[None, :] * s_hh, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(W + cols64[None, :] * s_wv + ks[:, None] * s_wh, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        acc = _mma(h, w, acc, DOT_F32)
    if HAS_BIAS:
        acc += tl.load(BIAS + cols64, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    return tl.where(col_ok[None, :], acc * inv_temp, float("-inf"))


@triton.jit
def _linear_fwd(
    HS, HT, W, BIAS, LABELS, LOGP_S, LOGP_T, LSE_S, ENT,
    N, V, H,
    s_hn, s_hh, t_hn, t_hh, s_wv, s_wh,
    inv_temp, ignore_index,
    HAS_TEACHER: tl.constexpr, HAS_BIAS: tl.constexpr, WANT_ENT: tl.constexpr, DOT_F32: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
):
    rows64 = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    row_ok = rows64 < N
    label = tl.load(LABELS + rows64, mask=row_ok, other=ignore_index)
    NEG: tl.constexpr = float("-inf")

    m_s = tl.full((BLOCK_N,), NEG, tl.float32)
    d_s = tl.zeros((BLOCK_N,), tl.float32)
    e_s = tl.zeros((BLOCK_N,), tl.float32)
    tgt_s = tl.zeros((BLOCK_N,), tl.float32)
    m_t = tl.full((BLOCK_N,), NEG, tl.float32)
    d_t = tl.zeros((BLOCK_N,), tl.float32)
    tgt_t = tl.zeros((BLOCK_N,), tl.float32)
    for v0 in range(0, V, BLOCK_V):
        cols64 = v0 + tl.arange(0, BLOCK_V).to(tl.int64)
        col_ok = cols64 < V
        acc_s = tl.zeros((BLOCK_N, BLOCK_V), tl.float32)
        acc_t = tl.zeros((BLOCK_N, BLOCK_V), tl.float32)
        for k0 in range(0, H, BLOCK_H):
            ks = k0 + tl.arange(0, BLOCK_H)
            k_ok = ks < H
            # one weight tile, loaded once, serves the student and the teacher
            w = tl.load(W + cols64[None, :] * s_wv + ks[:, None] * s_wh,
                        mask=k_ok[:, None] & col_ok[None, :], other=0.0)
            hs = tl.load(HS + rows64[:, None] * s_hn + ks[None, :] * s_hh,
                         mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            acc_s = _mma(hs, w, acc_s, DOT_F32)
            if HAS_TEACHER:
                ht = tl.load(HT + rows64[:, None] * t_hn + ks[None, :] * t_hh,
                             mask=row_ok[:, None] & k_ok[None, :], other=0.0)
                acc_t = _mma(ht, w, acc_t, DOT_F32)
        if HAS_BIAS:
            b = tl.load(BIAS + cols64, mask=col_ok, other=0.0).to(tl.float32)[None, :]
            acc_s += b
            acc_t += b
        is_tgt = cols64[None, :] == label[:, None]

        x = tl.where(col_ok[None, :], acc_s * inv_temp, NEG)
        m_new = tl.maximum(m_s, tl.max(x, axis=1))
        # a row prefix of only -inf: shift by 0 instead of -inf so exp() gives 0, not nan
        m_safe = tl.where(m_new == NEG, 0.0, m_new)
        alpha = tl.exp(m_s - m_safe)
        p = tl.exp(x - m_safe[:, None])
        d_s = d_s * alpha + tl.sum(p, axis=1)
        if WANT_ENT:
            e_s = e_s * alpha + tl.sum(p * tl.where(p > 0, x, 0.0), axis=1)
        tgt_s += tl.sum(tl.where(is_tgt, x, 0.0), axis=1)
        m_s = m_new
        if HAS_TEACHER:
            y = tl.where(col_ok[None, :], acc_t * inv_temp, NEG)
            mt_new = tl.maximum(m_t, tl.max(y, axis=1))
            mt_safe = tl.where(mt_new == NEG, 0.0, mt_new)
            d_t = d_t * tl.exp(m_t - mt_safe) + tl.sum(tl.exp(y - mt_safe[:, None]), axis=1)
            tgt_t += tl.sum(tl.where(is_tgt, y, 0.0), axis=1)
            m_t = mt_new

    # logp = (x_y - m) - log d (not x_y - lse): exact cancellation for large logits, as in backends/logits/triton.py
    log_d = tl.log(d_s)
    lse_s = m_s + log_d
    ignored = label == ignore_index
    tl.store(LSE_S + rows64, lse_s, mask=row_ok)
    tl.store(LOGP_S + rows64, tl.where(ignored, 0.0, (tgt_s - m_s) - log_d), mask=row_ok)
    if WANT_ENT:
        tl.store(ENT + rows64, lse_s - e_s / d_s, mask=row_ok)
    if HAS_TEACHER:
        tl.store(LOGP_T + rows64, tl.where(ignored, 0.0, (tgt_t - m_t) - tl.log(d_t)), mask=row_ok)


@triton.jit
def _dlogits_tile(x, cols64, label, coef, lse):
    """``coef * (onehot - p)`` in float32 (``coef`` already holds ``grad_logp / T``); 1 - p[y] formed before any cast."""
    p = tl.where(lse[:, None] == float("-inf"), 0.0, tl.exp(x - lse[:, None]))
    return coef[:, None] * tl.where(cols64[None, :] == label[:, None], 1.0 - p, -p)


@triton.jit
def _linear_bwd_dh(
    HS, W, BIAS, LABELS, GRAD, LSE, DH,
    N, V, H,
    s_hn, s_hh, s_wv, s_wh,
    inv_temp,
    HAS_BIAS: tl.constexpr, DOT_F32: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
):
    rows64 = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    row_ok = rows64 < N
    label = tl.load(LABELS + rows64, mask=row_ok, other=-1)
    coef = tl.load(GRAD + rows64, mask=row_ok, other=0.0) * inv_temp
    lse = tl.load(LSE + rows64, mask=row_ok, other=0.0)
    for v0 in range(0, V, BLOCK_V):
        cols64 = v0 + tl.arange(0, BLOCK_V).to(tl.int64)
        col_ok = cols64 < V
        x = _logit_tile(HS, W, BIAS, rows64, row_ok, cols64, col_ok, H, s_hn, s_hh, s_wv, s_wh, inv_temp,
                        HAS_BIAS, DOT_F32, BLOCK_N, BLOCK_V, BLOCK_H)
        g = _dlogits_tile(x, cols64, label, coef, lse).to(W.dtype.element_ty)
        for k0 in range(0, H, BLOCK_H):
            ks = k0 + tl.arange(0, BLOCK_H)
            k_ok = ks < H
            w = tl.load(W + cols64[:, None] * s_wv + ks[None, :] * s_wh,
                        mask=col_ok[:, None] & k_ok[None, :], other=0.0)
            ptr = DH + rows64[:, None] * H + ks[None, :]
            msk = row_ok[:, None] & k_ok[None, :]
            acc = tl.load(ptr, mask=msk, other=0.0)
            acc = _mma(g, w, acc, DOT_F32)
            tl.store(ptr, acc, mask=msk)


@triton.jit
def _linear_bwd_dw(
    HS, W, BIAS, LABELS, GRAD, LSE, DW, DB,
    N, V, H,
    s_hn, s_hh, s_wv, s_wh,
    inv_temp,
    HAS_BIAS: tl.constexpr, WANT_DW: tl.constexpr, WANT_DB: tl.constexpr, DOT_F32: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
):
    cols64 = tl.program_id(0).to(tl.int64) * BLOCK_V + tl.arange(0, BLOCK_V).to(tl.int64)
    col_ok = cols64 < V
    db = tl.zeros((BLOCK_V,), tl.float32)
    for n0 in range(0, N, BLOCK_N):
        rows64 = n0 + tl.arange(0, BLOCK_N).to(tl.int64)
        row_ok = rows64 < N
        label = tl.load(LABELS + rows64, mask=row_ok, other=-1)
        coef = tl.load(GRAD + rows64, mask=row_ok, other=0.0) * inv_temp
        lse = tl.load(LSE + rows64, mask=row_ok, other=0.0)
        x = _logit_tile(HS, W, BIAS, rows64, row_ok, cols64, col_ok, H, s_hn, s_hh, s_wv, s_wh, inv_temp,
                        HAS_BIAS, DOT_F32, BLOCK_N, BLOCK_V, BLOCK_H)
        g = _dlogits_tile(x, cols64, label, coef, lse)
        if WANT_DB:
            db += tl.sum(g, axis=0)
        if WANT_DW:
            gt = tl.trans(g.to(HS.dtype.element_ty))
            for k0 in range(0, H, BLOCK_H):
                ks = k0 + tl.arange(0, BLOCK_H)
                k_ok = ks < H
                h = tl.load(HS + rows64[:, None] * s_hn + ks[None, :] * s_hh,
                            mask=row_ok[:, None] & k_ok[None, :], other=0.0)
                ptr = DW + cols64[:, None] * H + ks[None, :]
                msk = col_ok[:, None] & k_ok[None, :]
                acc = tl.load(ptr, mask=msk, other=0.0)
                acc = _mma(gt, h, acc, DOT_F32)
                tl.store(ptr, acc, mask=msk)
    if WANT_DB:
        tl.store(DB + cols64, db, mask=col_ok)


def _params(which):
    interp = bool(triton.knobs.runtime.interpret)
    return dict(_INTERP if interp else which, DOT_F32=interp)


def forward(hidden, weight, bias, teacher, labels, temperature, ignore_index, want_entropy):
    """Returns float32 ``[N]`` vectors ``(logp_s, logp_t | None, lse_s, entropy | None)``."""
    check_device(hidden)
    N, H = hidden.shape
    V = weight.shape[0]
    dev = hidden.device
    logp_s, logp_t, lse_s, ent = alloc_row_outputs(N, dev, teacher is not None, want_entropy)
    if N == 0:
        return logp_s, logp_t, lse_s, ent
    tch = teacher if teacher is not None else hidden  # dummy pointer, never read (HAS_TEACHER=False)
    p = dict(_params(_FWD))
    grid = (triton.cdiv(N, p["BLOCK_N"]),)
    _linear_fwd[grid](
        hidden, tch, weight, bias if bias is not None else weight, labels,
        logp_s, logp_t if logp_t is not None else logp_s, lse_s, ent if ent is not None else logp_s,
        N, V, H,
        *hidden.stride(), *tch.stride(), *weight.stride(),
        1.0 / temperature, ignore_index,
        HAS_TEACHER=teacher is not None, HAS_BIAS=bias is not None, WANT_ENT=want_entropy, **p,
    )
    return logp_s, logp_t, lse_s, ent


def backward(grad_logp, hidden, weight, bias, labels, lse, temperature, need_hidden, need_weight, need_bias):
    """Returns ``(d_hidden | None, d_weight | None, d_bias | None)`` in the dtypes of the inputs."""
    check_device(hidden)
    N, H = hidden.shape
    V = weight.shape[0]
    dev = hidden.device
    grad = grad_logp.reshape(-1).to(torch.float32).contiguous()
    lse = lse.reshape(-1).to(torch.float32).contiguous()
    inv_t = 1.0 / temperature
    dh = torch.zeros((N, H), dtype=torch.float32, device=dev) if need_hidden else None
    dw = torch.zeros((V, H), dtype=torch.float32, device=dev) if need_weight else None
    db = torch.zeros((V,), dtype=torch.float32, device=dev) if need_bias and bias is not None else None
    b = bias if bias is not None else weight
    if N > 0 and dh is not None:
        p = dict(_params(_BWD_DH))
        _linear_bwd_dh[(triton.cdiv(N, p["BLOCK_N"]),)](
            hidden, weight, b, labels, grad, lse, dh, N, V, H,
            *hidden.stride(), *weight.stride(), inv_t, HAS_BIAS=bias is not None, **p,
        )
    if N > 0 and (dw is not None or db is not None):
        p = dict(_params(_BWD_DW))
        _linear_bwd_dw[(triton.cdiv(V, p["BLOCK_V"]),)](
            hidden, weight, b, labels, grad, lse, dw if dw is not None else grad, db if db is not None else grad,
            N, V, H, *hidden.stride(), *weight.stride(), inv_t,
            HAS_BIAS=bias is not None, WANT_DW=dw is not None, WANT_DB=db is not None, **p,
        )
    return (None if dh is None else dh.to(hidden.dtype), None if dw is None else dw.to(weight.dtype),
            None if db is None else db.to(bias.dtype))


# Every kernel of this module by name with its compiled-mode tiles, for the ahead-of-time compile test
# (tests/backends/aot_compile.py).
KERNELS = {"linear_fwd": _linear_fwd, "linear_bwd_dh": _linear_bwd_dh, "linear_bwd_dw": _linear_bwd_dw}
TILES = {"linear_fwd": _FWD, "linear_bwd_dh": _BWD_DH, "linear_bwd_dw": _BWD_DW}
