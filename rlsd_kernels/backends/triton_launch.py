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
}

SWEEP = [
    {"fwd_block_v": 4096, "fwd_warps": 4, "bwd_block_v": 2048, "bwd_warps": 4},
    {"fwd_block_v": 4096, "fwd_warps": 8, "bwd_block_v": 4096, "bwd_warps": 8},
    {"fwd_block_v": 8192, "fwd_warps": 8, "bwd_block_v": 4096, "bwd_warps": 4},
    {"fwd_block_v": 2048, "fwd_warps": 4, "bwd_block_v": 1024, "bwd_warps": 4},
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
