"""The fused loss's prologue (``triton_loss.py``, launch 1 of 3): one program over the O(N) per-token inputs.

The label range check (device-side error flags instead of a host sync), the mask count, the per-token aggregation
weight ``a_t`` of every mode (docs/math.md section 2.5), per-sequence advantages broadcast to tokens, and the
``cu_seqlens`` checks.
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _token_flags(LABELS, MASK, r, inb, ignore_index, V, HAS_MASK: tl.constexpr):
    """For the rows ``r`` (where ``inb``): (taking part in the loss, label out of range and not ignore_index)."""
    lab = tl.load(LABELS + r, mask=inb, other=ignore_index).to(tl.int64)
    kept = inb & (lab != ignore_index)
    bad = kept & ((lab < 0) | (lab >= V))
    valid = kept & (lab >= 0) & (lab < V)
    if HAS_MASK:
        valid = valid & (tl.load(MASK + r, mask=inb, other=0).to(tl.float32) != 0)
    return valid, bad


@triton.jit
def prologue(LABELS, MASK, CU, ADV, AGG, ADV_ROW, SEQ_CNT, ERR,
              N, V, T, num_seqs, ignore_index, inv_norm,
              HAS_MASK: tl.constexpr, HAS_CU: tl.constexpr, AGG_MODE: tl.constexpr, ADV_PER_SEQ: tl.constexpr,
              BLOCK: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_T: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    count = tl.zeros((), tl.float32)
    n_bad = tl.zeros((), tl.int64)
    first_bad = tl.zeros((), tl.int64) + N
    for start in range(0, N, BLOCK):
        r = start + offs
        inb = r < N
        v, bad = _token_flags(LABELS, MASK, r, inb, ignore_index, V, HAS_MASK)
        count += tl.sum(v.to(tl.float32), axis=0)
        n_bad += tl.sum(bad.to(tl.int64), axis=0)
        first_bad = tl.minimum(first_bad, tl.min(tl.where(bad, r.to(tl.int64), N), axis=0))
    first_label = tl.load(LABELS + first_bad, mask=first_bad < N, other=0).to(tl.int64)
    cu_bad = tl.zeros((), tl.int64)
    if HAS_CU:
        s_offs = tl.arange(0, BLOCK_S)
        cu_bad = (tl.load(CU).to(tl.int64) != 0).to(tl.int64) | (tl.load(CU + num_seqs).to(tl.int64) != N).to(tl.int64)
        for s0 in range(0, num_seqs, BLOCK_S):
            s = s0 + s_offs
            sin = s < num_seqs
            a = tl.load(CU + s, mask=sin, other=0).to(tl.int64)
            b = tl.load(CU + s + 1, mask=sin, other=0).to(tl.int64)
            cu_bad = cu_bad | tl.max((sin & (b < a)).to(tl.int64), axis=0)
    tl.store(ERR, n_bad)
    tl.store(ERR + 1, first_label)
    tl.store(ERR + 2, cu_bad)

    if AGG_MODE != 1 and not ADV_PER_SEQ:
        if AGG_MODE == 0:
            scale = 1.0 / tl.maximum(count, 1.0)
        else:
            scale = inv_norm + tl.zeros((), tl.float32)
        for start in range(0, N, BLOCK):
            r = start + offs
            inb = r < N
            v, bad = _token_flags(LABELS, MASK, r, inb, ignore_index, V, HAS_MASK)
            tl.store(AGG + r, v.to(tl.float32) * scale, mask=inb)
    else:
        # Sequence-aware pass: tiles of [BLOCK_S sequences, BLOCK_T tokens]. Sequence s spans rows
        # [cu[s], cu[s+1]) (packed) or [s*T, (s+1)*T).
        s_offs = tl.arange(0, BLOCK_S)
        t_offs = tl.arange(0, BLOCK_T)
        n_seq = tl.zeros((), tl.float32)
        for phase in tl.static_range(2):  # 0: count tokens per sequence, 1: write a_t (and advantages)
            for s0 in range(0, num_seqs, BLOCK_S):
                s = s0 + s_offs
                sin = s < num_seqs
                if HAS_CU:
                    a = tl.minimum(tl.maximum(tl.load(CU + s, mask=sin, other=0).to(tl.int64), 0), N)
                    b = tl.minimum(tl.maximum(tl.load(CU + s + 1, mask=sin, other=0).to(tl.int64), a), N)
                else:
                    a = s.to(tl.int64) * T
                    b = a + T
                longest = tl.max(tl.where(sin, b - a, 0), axis=0)
                if phase == 0:
                    cnt = tl.zeros((BLOCK_S,), tl.float32)
                else:
                    cnt = tl.load(SEQ_CNT + s, mask=sin, other=0.0)
                    adv_s = tl.zeros((BLOCK_S,), tl.float32)
                    if ADV_PER_SEQ:
                        adv_s = tl.load(ADV + s, mask=sin, other=0.0).to(tl.float32)
                for t0 in range(0, longest, BLOCK_T):
                    r = a[:, None] + t0 + t_offs[None, :]
                    inb = sin[:, None] & (r < b[:, None])
                    v, bad = _token_flags(LABELS, MASK, r, inb, ignore_index, V, HAS_MASK)
                    vf = v.to(tl.float32)
                    if phase == 0:
                        cnt += tl.sum(vf, axis=1)
                    else:
                        if AGG_MODE == 1:
                            agg = vf / (tl.maximum(cnt, 1.0) * tl.maximum(n_seq, 1.0))[:, None]
                        elif AGG_MODE == 0:
                            agg = vf / tl.maximum(count, 1.0)
                        else:
                            agg = vf * inv_norm
                        tl.store(AGG + r, agg, mask=inb)
                        if ADV_PER_SEQ:
                            tl.store(ADV_ROW + r, tl.broadcast_to(adv_s[:, None], (BLOCK_S, BLOCK_T)), mask=inb)
                if phase == 0:
                    tl.store(SEQ_CNT + s, cnt, mask=sin)
                    n_seq += tl.sum((sin & (cnt > 0)).to(tl.float32), axis=0)
