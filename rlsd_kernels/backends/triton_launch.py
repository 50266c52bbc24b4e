"""Launch parameters of the Triton kernels, with the measurements behind them, and the sweep that re-measures them.

Every kernel reads :data:`LAUNCH` at call time, so :func:`override` (the GPU check's sweep, ``bench/``) can time
other settings without touching the kernels. ``SWEEP`` lists the settings the GPU check re-measures on each new
card; keep the table below in step with what it reports.

Scoring kernels, measured on one H200 (2026-11-26, bf16, the kernels alone; % of the measured 4273 GB/s copy
bandwidth):

| kernel | shape | setting | time | % of copy BW |
|---|---|---|---|---|
| forward (reads student + teacher) | 16384 x 151936 | 4096 cols, 8 warps | 2.90 ms | 80% |
| | | **4096 cols, 4 warps** | 2.55 ms | 92% |
| | | 8192 cols, 8 warps | 2.71 ms | 86% |
| | 16384 x 32000 | 4096 cols, 8 warps | 0.64 ms | 77% |
| | | **4096 cols, 4 warps** | 0.54 ms | 91% |
| backward (reads student, writes grad) | 16384 x 151936 | 4096 cols, 8 warps | 2.59 ms | 90% |
| | | **2048 cols, 4 warps** | 2.53 ms | 92% |
| | 16384 x 32000 | 4096 cols, 8 warps | 0.53-0.54 ms | 91-92% |

Fused loss (``rlsd_loss`` forward+backward with a teacher, bf16), the GPU check's sweep on one H200 (2026-11-26,
``bench/results/gpu-check-cuda-nvidia-h200-2026-11-26.json``; the sweep's own timing, ms, at N = 16384):

| SWEEP entry | V = 32000 | 151936 | 262144 |
|---|---|---|---|
| [0] defaults: one program per row, 4096 cols, 4 warps | 1.50 | **5.30** | **9.06** |
| [1] one program per row, 8192 cols, 8 warps | 1.54 | 5.39 | 9.18 |
| [2] persistent, 1 row per SM in L2, 16384 cols, 16 warps, prefetch | 1.55 | 9.81 | 11.13 |
| [3] persistent, 1 row per SM in L2, 8192 cols, 16 warps, prefetch | 1.76 | 11.47 | 13.21 |
| [4] persistent, >= 2 per SM, 8192 cols, 8 warps, prefetch | 2.21 | 9.98 | 17.38 |
| [5] persistent, >= 4 per SM, 4096 cols, 4 warps, prefetch | **1.27** | 6.00 | 10.19 |
| [6] persistent, >= 4 per SM, 4096 cols, 4 warps | 1.30 | 6.34 | 10.79 |
| [7] persistent, >= 8 per SM, 4096 cols, 4 warps | 1.51 | 6.13 | 10.97 |
| [8] one program per row, 2048 cols, 4 warps | 1.61 | 5.65 | 9.68 |

Keeping few rows in flight (so that the gradient sweep re-reads the student row from L2) leaves too few loads in
flight per SM: it loses more bandwidth than the re-read costs at V >= 128k. One program per row wins there and
is the default; the grid of the same run (timed with it) is in that results file.
"""
from __future__ import annotations

import contextlib

LAUNCH = {
    # forward stats pass (logits/triton.py): one program per row, BLOCK_V columns per step of the online log-sum-exp
    "fwd_block_v": 4096,
    "fwd_warps": 4,
    # gradient pass: 2-D grid (row, chunk of BLOCK_V columns)
    "bwd_block_v": 2048,
    "bwd_warps": 4,
    # fused loss (logits/triton_loss.py): programs walk rows (persistent: ``loss_l2_budget_mib`` > 0 bounds the rows in
    # flight so that their student rows stay in L2 until the gradient sweep re-reads them, never fewer than
    # loss_min_programs_per_sm per SM; 0 = one program per row). The table above: one program per row.
    "loss_block_v": 4096,
    "loss_warps": 4,
    "loss_l2_budget_mib": 0,
    "loss_min_programs_per_sm": 1,
    "loss_prefetch": 0,  # 1: load the next chunk while reducing this one (more bytes in flight per program)
    # Rows of at most this many columns (power of two) are loaded once as one block and kept in registers for the
    # gradient (exactly 3 passes, no re-read), with loss_row_warps warps per row. 0 = off. NOT YET MEASURED: the
    # next GPU check's sweep times it ("row in registers" entries) and adopts it for the grid if it is fastest.
    "loss_row_in_regs_max": 0,
    "loss_row_warps": 16,
    "loss_interpreter_programs": 3,  # CPU interpreter: exercise the persistent loop on small inputs
    # single-program O(N) kernels: wide blocks keep their serial loops short (N = 16384: 4 steps per pass)
    "prologue_block": 4096,
    "prologue_tile_t": 256,
    "finalize_block": 1024,
    "small_warps": 8,
    "scale_block": 4096,
}

SWEEP = [
    {},  # the defaults above
    {"loss_block_v": 8192, "loss_warps": 8},
    {"loss_l2_budget_mib": 48, "loss_block_v": 16384, "loss_warps": 16, "loss_prefetch": 1},
    {"loss_l2_budget_mib": 48, "loss_block_v": 8192, "loss_warps": 16, "loss_prefetch": 1},
    {"loss_l2_budget_mib": 32, "loss_min_programs_per_sm": 2, "loss_block_v": 8192, "loss_warps": 8,
     "loss_prefetch": 1},
    {"loss_l2_budget_mib": 32, "loss_min_programs_per_sm": 4, "loss_prefetch": 1},
    {"loss_l2_budget_mib": 32, "loss_min_programs_per_sm": 4},
    {"loss_l2_budget_mib": 32, "loss_min_programs_per_sm": 8},
    {"loss_block_v": 2048},
    {"loss_row_in_regs_max": 32768, "loss_row_warps": 16},  # row in registers up to V = 32768
    {"loss_row_in_regs_max": 32768, "loss_row_warps": 32},
    {"loss_row_in_regs_max": 32768, "loss_row_warps": 8},
]


@contextlib.contextmanager
def override(**params):
    """Use other launch parameters inside the block (unknown names are a ValueError)."""
    unknown = set(params) - set(LAUNCH)
    if unknown:
        raise ValueError(f"unknown launch parameters {sorted(unknown)}; known: {sorted(LAUNCH)}")
    saved = dict(LAUNCH)
    LAUNCH.update(params)
    try:
        yield
    finally:
        LAUNCH.clear()
        LAUNCH.update(saved)
