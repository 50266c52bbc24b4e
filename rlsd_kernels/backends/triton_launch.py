"""Launch parameters of the Triton kernels, with the measurements behind them, and the sweep that re-measures them.

Every kernel reads :data:`LAUNCH` at call time, so :func:`override` (the GPU check's sweep, ``bench/``) can time
other settings without touching the kernels. ``SWEEP`` lists the settings the GPU check re-measures on each new
card; keep the table below in step with what it reports.

Measured on one H200 (2026-11-26, bf16, the kernels alone; % of the measured 4273 GB/s copy bandwidth):

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
"""
from __future__ import annotations

import contextlib

LAUNCH = {
    # forward stats pass: one program per row, BLOCK_V columns per step of the online log-sum-exp
    "fwd_block_v": 4096,
    "fwd_warps": 4,
    # gradient pass: 2-D grid (row, chunk of BLOCK_V columns)
    "bwd_block_v": 2048,
    "bwd_warps": 4,
    # fused loss (triton_loss.py): persistent programs, one row at a time, two sweeps per row. Rows in flight are
    # sized so that their student rows fit in this much L2 (H100: 50 MB, H200: 60 MB) until the gradient sweep
    # re-reads them, but never fewer than loss_min_programs_per_sm per SM; 0 MiB = one program per row.
    # NOT YET MEASURED on a GPU: the first GPU check's sweep decides these.
    # One row per program in flight means few loads in flight per SM at V >= 128k (one program per SM fits L2), so
    # each step loads long chunks: 8192 columns x 16 warps (16 values per thread per tensor).
    "loss_block_v": 8192,
    "loss_warps": 16,
    "loss_l2_budget_mib": 32,
    "loss_min_programs_per_sm": 1,
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
    {"loss_block_v": 4096, "loss_warps": 8},
    {"loss_block_v": 16384, "loss_warps": 16},
    {"loss_block_v": 8192, "loss_warps": 8},
    {"loss_min_programs_per_sm": 2},
    {"loss_min_programs_per_sm": 2, "loss_block_v": 4096, "loss_warps": 8},
    {"loss_l2_budget_mib": 0, "loss_block_v": 4096, "loss_warps": 4},  # one program per row: no L2 scheduling
    {"loss_l2_budget_mib": 48},
    {"fwd_warps": 8, "fwd_block_v": 4096, "bwd_block_v": 4096, "bwd_warps": 8},
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
