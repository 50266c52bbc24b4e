"""Split-row variant of the fused loss's rows kernel: each row is cut into segments of ``SEG`` columns, so that a
gradient sweep re-reads a student segment from L2 shortly after its statistics sweep read it from HBM.

Why: with one program per row (``triton_loss._loss_rows``) a row of 152k bf16 logits is 300 KB and the GPU keeps
~1000 rows in flight, so the gradient sweep's re-read of the student row misses L2 (measured on an H200: 4 passes
of HBM traffic for RLSD, not 3). Bounding the rows in flight instead leaves too few loads in flight per SM. Here
every program handles one segment, so many programs stream in parallel while few *rows* are open at a time.

Work items are taken in the order of a ticket (one atomic per program, so that every smaller ticket belongs to a
program that is running or done), laid out as

    stats(row 0..LAG-1) | stats(row k), grad(row k - LAG) for k = LAG..N-1 | grad(row N-LAG..N-1)

with ``NSEG`` segment items per row and phase. A *stats* item sweeps its segment once (online log-sum-exp of the
student and teacher, entropy sum) and stores the partials; the last of a row's NSEG stats items to arrive merges
them, runs the row's epilogue (``row_epilogue``: log-probs, weights, loss partials, ``coef``) and publishes the row.
A *grad* item waits until its row is published (it only ever waits on smaller tickets: no deadlock, whatever the
occupancy) and writes ``coef / T * (onehot - softmax)`` over its segment, re-reading the student from L2 (the row
was read LAG rows earlier; LAG keeps those rows within ``LAUNCH["loss_split_lag_mib"]``).

Under the CPU interpreter programs run one after another in ticket order, so no item ever waits.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..triton_common import col_offsets, row_pointer, row_stats, target_logits
from ..triton_epilogue import row_epilogue
from ..triton_launch import LAUNCH

N_SEGSTATS = 5  # per segment: m_s, d_s, e_s, m_t, d_t


@triton.jit
def _ticket_work(t, N, n_seg, lag, WRITE_GRAD: tl.constexpr):
    """Ticket -> (is_grad, row, seg) in the order of the module docstring (stats only without a gradient)."""
    if WRITE_GRAD:
        head = lag * n_seg
        body = (N - lag) * 2 * n_seg
        u = tl.maximum(t - head, 0)
        in_head = t < head
        in_tail = u >= body
        step = u // (2 * n_seg)
        w = u % (2 * n_seg)
        v = tl.maximum(u - body, 0)
        is_grad = (~in_head) & (in_tail | (w >= n_seg))
        row = tl.where(in_head, t // n_seg,
                       tl.where(in_tail, N - lag + v // n_seg, tl.where(w >= n_seg, step, step + lag)))
        seg = tl.where(in_head, t % n_seg, tl.where(in_tail, v % n_seg, w % n_seg))
    else:
        is_grad = t < 0
        row = t // n_seg
        seg = t % n_seg
    return is_grad, row, seg


@triton.jit
def _merge(ms, ds, es):
    """Merge per-segment (running max, sum of exp relative to it, entropy sum relative to it) into the row's, as
    one sweep over all segments would have left them. Segments of only -inf (sum 0) drop out; a NaN sum stays NaN."""
    m = tl.max(ms, axis=0)
    shift = tl.where(m == float("-inf"), 0.0, m)
    live = ds != 0.0
    a = tl.where(live, tl.exp(ms - shift), 0.0)
    d = tl.sum(ds * a, axis=0)
    e = tl.sum(tl.where(live, a * (es + (ms - shift) * ds), 0.0), axis=0)
    return m, d, e


@triton.jit
def _split_item(
    ticket, S, TCH, GRAD, LABELS, AGG, ADV, OLD, TLP,
    LOGP_S, LOGP_T, WEIGHT, ENT, LSE, COEF, PARTS, SEGS, SYNC,
    N, seq_len, t_seq_len, g_seq_len, V, n_seg, lag,
    s_sb, s_st, s_sv, t_sb, t_st, t_sv, g_sb, g_st, g_sv,
    inv_temp, ignore_index, lam, eps_w, log_lo, log_hi, clip_dual,
    TEACHER: tl.constexpr, HAS_OLD: tl.constexpr, WANT_ENT: tl.constexpr, CISPO: tl.constexpr,
    WRITE_GRAD: tl.constexpr, CONTIG: tl.constexpr, SEG: tl.constexpr, BLOCK_V: tl.constexpr,
    NSEG_P2: tl.constexpr,
):
    """One work item (the module docstring): a segment's statistics, or its gradient."""
    is_grad, row, seg = _ticket_work(ticket, N, n_seg, lag, WRITE_GRAD)
    start = seg * SEG
    seg_len = tl.minimum(V - start, SEG)
    s_row = row_pointer(S, row, seq_len, s_sb, s_st)
    arrived = SYNC + 1 + row
    if is_grad:
        seen = tl.atomic_add(arrived, 0, sem="acquire")
        while seen <= n_seg:  # the row's stats items hold smaller tickets: they are running or done
            seen = tl.atomic_add(arrived, 0, sem="acquire")
        lse = tl.load(LSE + row, cache_modifier=".cg")
        scale = tl.load(COEF + row, cache_modifier=".cg") * inv_temp
        label = tl.load(LABELS + row).to(tl.int64)
        # masked rows and rows of only -inf get exactly 0 (0 * nan would be nan); NaN rows stay NaN
        live = (scale != 0) & (lse != float("-inf"))
        g_row = row_pointer(GRAD, row, g_seq_len, g_sb, g_st)
        cols0 = tl.arange(0, BLOCK_V)
        for c0 in range(0, seg_len, BLOCK_V):
            cols = start + c0 + cols0
            inb = cols < V
            x = tl.load(s_row + col_offsets(cols, s_sv, CONTIG), mask=inb, other=float("-inf"),
                        eviction_policy="evict_first").to(tl.float32)
            p = tl.exp(x * inv_temp - lse)
            # the target term 1 - p[y] is formed in float32 before the cast (bf16 cancellation near p = 1)
            grad = tl.where(live, scale * tl.where(cols == label, 1.0 - p, -p), 0.0)
            tl.store(g_row + col_offsets(cols, g_sv, CONTIG), grad.to(GRAD.dtype.element_ty), mask=inb,
                     eviction_policy="evict_first")
    else:
        t_row = row_pointer(TCH, row, t_seq_len, t_sb, t_st)
        m_s, d_s, e_s, m_t, d_t, _, _ = row_stats(s_row + start * s_sv, t_row + start * t_sv, seg_len, s_sv, t_sv,
                                                  inv_temp, TEACHER == 1, WANT_ENT, CONTIG, BLOCK_V, False,
                                                  WRITE_GRAD, 0)
        base = SEGS + (row * n_seg + seg) * 5
        tl.store(base, m_s)
        tl.store(base + 1, d_s)
        tl.store(base + 2, e_s)
        tl.store(base + 3, m_t)
        tl.store(base + 4, d_t)
        tl.debug_barrier()  # every thread's stores before the release below
        done = tl.atomic_add(arrived, 1, sem="acq_rel")
        if done == n_seg - 1:  # the row's last stats item: merge, epilogue, publish
            k = tl.arange(0, NSEG_P2)
            km = k < n_seg
            rb = SEGS + row * n_seg * 5 + k * 5
            ms, ds, es = _merge(tl.load(rb, mask=km, other=float("-inf"), cache_modifier=".cg"),
                                tl.load(rb + 1, mask=km, other=0.0, cache_modifier=".cg"),
                                tl.load(rb + 2, mask=km, other=0.0, cache_modifier=".cg"))
            mt, dt, _ = _merge(tl.load(rb + 3, mask=km, other=float("-inf"), cache_modifier=".cg"),
                               tl.load(rb + 4, mask=km, other=0.0, cache_modifier=".cg"),
                               tl.zeros((NSEG_P2,), tl.float32))
            label = tl.load(LABELS + row).to(tl.int64)
            agg = tl.load(AGG + row)
            tgt_s, tgt_t = target_logits(s_row, t_row, label, V, s_sv, t_sv, inv_temp, TEACHER == 1)
            row_epilogue(row, N, ms, ds, es, mt, dt, tgt_s, tgt_t, label, agg, V, ignore_index, lam, eps_w, log_lo,
                         log_hi, clip_dual, ADV, OLD, TLP, LOGP_S, LOGP_T, WEIGHT, ENT, LSE, COEF, PARTS,
                         TEACHER, HAS_OLD, WANT_ENT, CISPO)
            if WRITE_GRAD:
                tl.debug_barrier()
                tl.atomic_add(arrived, 1, sem="release")


@triton.jit
def _loss_split(
    S, TCH, GRAD, LABELS, AGG, ADV, OLD, TLP,
    LOGP_S, LOGP_T, WEIGHT, ENT, LSE, COEF, PARTS, SEGS, SYNC,
    N, seq_len, t_seq_len, g_seq_len, V, n_seg, lag, n_tickets,
    s_sb, s_st, s_sv, t_sb, t_st, t_sv, g_sb, g_st, g_sv,
    inv_temp, ignore_index, lam, eps_w, log_lo, log_hi, clip_dual,
    TEACHER: tl.constexpr, HAS_OLD: tl.constexpr, WANT_ENT: tl.constexpr, CISPO: tl.constexpr,
    WRITE_GRAD: tl.constexpr, CONTIG: tl.constexpr, SEG: tl.constexpr, BLOCK_V: tl.constexpr,
    NSEG_P2: tl.constexpr,
):
    # SYNC[0]: the ticket counter; SYNC[1 + row]: the row's arrived stats items (n_seg + 1 once published).
    # Both zeroed by the prologue kernel. Each program takes tickets until they run out: one per program with a
    # grid of n_tickets programs, many with a persistent grid (no block launch per item).
    ticket = tl.atomic_add(SYNC, 1).to(tl.int64)
    while ticket < n_tickets:
        _split_item(ticket, S, TCH, GRAD, LABELS, AGG, ADV, OLD, TLP, LOGP_S, LOGP_T, WEIGHT, ENT, LSE, COEF, PARTS,
                    SEGS, SYNC, N, seq_len, t_seq_len, g_seq_len, V, n_seg, lag,
                    s_sb, s_st, s_sv, t_sb, t_st, t_sv, g_sb, g_st, g_sv,
                    inv_temp, ignore_index, lam, eps_w, log_lo, log_hi, clip_dual,
                    TEACHER, HAS_OLD, WANT_ENT, CISPO, WRITE_GRAD, CONTIG, SEG, BLOCK_V, NSEG_P2)
        ticket = tl.atomic_add(SYNC, 1).to(tl.int64)


KERNELS = {"loss_split": _loss_split}
_SM_COUNT = {}


def layout(V: int, elem_bytes: int, n_rows: int, write_grad: bool):
    """``(seg, n_seg, lag, block_v)`` of a split launch: segment width (power of two), segments per row, rows
    between a row's stats and its gradient items, columns per step."""
    seg = min(LAUNCH["loss_split_seg"], triton.next_power_of_2(V))
    n_seg = triton.cdiv(V, seg)
    lag = max(1, min(n_rows, int(LAUNCH["loss_split_lag_mib"] * 2 ** 20 // max(V * elem_bytes, 1))))
    return seg, n_seg, lag if write_grad else 0, min(LAUNCH["loss_split_block_v"], seg)


def launch(args, scalars, *, n, V, elem_bytes, segs, sync, constexprs, write_grad):
    """Launch ``_loss_split`` over every ticket; ``args``/``scalars`` as for ``_loss_rows`` (before/after the
    vocabulary-size block), ``segs`` float32 ``[n * n_seg * 5]``, ``sync`` int64 ``[n + 1]`` zeroed."""
    seg, n_seg, lag, block = layout(V, elem_bytes, n, write_grad)
    tickets = n * n_seg * (2 if write_grad else 1)
    programs = tickets
    dev = args[0].device
    if LAUNCH["loss_split_programs_per_sm"] > 0 and dev.type == "cuda":
        if dev.index not in _SM_COUNT:
            _SM_COUNT[dev.index] = torch.cuda.get_device_properties(dev).multi_processor_count
        programs = min(tickets, _SM_COUNT[dev.index] * LAUNCH["loss_split_programs_per_sm"])
    elif dev.type != "cuda":  # the interpreter: a few programs exercise the ticket loop
        programs = min(tickets, LAUNCH["loss_interpreter_programs"])
    _loss_split[(programs,)](
        *args, segs, sync, *scalars[:5], n_seg, lag, tickets, *scalars[5:],
        **constexprs, SEG=seg, BLOCK_V=block, NSEG_P2=triton.next_power_of_2(n_seg),
        num_warps=LAUNCH["loss_split_warps"],
    )
