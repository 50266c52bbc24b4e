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

Fused loss (``rlsd_loss`` forward+backward with a teacher, bf16), the GPU check's sweep on one H200, ms at
N = 16384, two runs (2026-11-26 | 2026-11-27: ``bench/results/gpu-check-cuda-nvidia-h200-2026-11-26.json`` and
``gpu-check-cuda-nvidia-h200-2026-11-27-0247.json``):

| sweep entry | V = 32000 | 151936 | 262144 |
|---|---|---|---|
| defaults: one program per row, 4096 cols, 4 warps | 1.50 / 1.55 | **5.30 / 5.32** | **9.06 / 9.05** |
| one program per row, 8192 cols, 8 warps | 1.54 / **1.13** | 5.39 / 5.40 | 9.18 / 9.19 |
| persistent, 1 row per SM in L2, 16384 cols, 16 warps, prefetch | 1.55 / 1.56 | 9.81 / 9.75 | 11.13 / 10.40 |
| persistent, 1 row per SM in L2, 8192 cols, 16 warps, prefetch | 1.76 / 1.77 | 11.47 / 11.42 | 13.21 / 13.29 |
| persistent, >= 2 per SM, 8192 cols, 8 warps, prefetch | 2.21 / 2.23 | 9.98 / 10.01 | 17.38 / 17.55 |
| persistent, >= 4 per SM, 4096 cols, 4 warps, prefetch | **1.27** / 1.27 | 6.00 / 5.98 | 10.19 / 10.23 |
| persistent, >= 4 per SM, 4096 cols, 4 warps | 1.30 / 1.31 | 6.34 / 6.34 | 10.79 / 10.86 |
| persistent, >= 8 per SM, 4096 cols, 4 warps | 1.51 / 1.35 | 6.13 / - | 10.97 / 10.53 |
| one program per row, 2048 cols, 4 warps | 1.61 / 1.53 | 5.65 / - | 9.68 / 9.57 |
| row in registers (V <= 32768), 16 / 32 / 8 warps | - / 2.07, 2.21, 2.27 | (not used) | (not used) |

At 16384 x 151936 the defaults move 5.32 ms x 4201 GB/s = 22.3 GB, i.e. 4.5 passes of ``N x V`` bf16 where 3 are
needed: the gradient sweep's re-read of the student row misses L2 (~1000 rows of 300 KB in flight). Keeping few
rows in flight (the persistent entries) leaves too few loads in flight per SM and loses more than the re-read
costs; registers hold a row only up to ~32k columns and spill.

A split-row kernel was built and measured (2026-11-27, H200, two targeted GPU-check calls:
``bench/results/split-rows-sweep-h200-call1.md`` and ``-call2.md``, where SWEEP[2..7] are the split entries of
those commits; removed since): each
row cut into segments, one program per segment and phase, items ordered by an atomic ticket so that a gradient
item re-reads its segment from L2 a bounded number of rows (``lag``) after its statistics item, the last
statistics item of a row merging the segments' partials (correct: the GPU tests compared it with one program per
row at 4096 x 151936). It was slower everywhere (ms, RLSD / GRPO forward+backward, N = 16384):

| variant | V = 151936 | 262144 |
|---|---|---|
| one program per row (defaults) | **5.32 / 3.75** | **9.13 / 6.37** |
| split, 16384-column segments, one program per item, lag 16 MiB | 5.63 / 3.94 | 9.35 / 6.56 |
| same, 8192-column segments | 6.39 / 4.36 | 10.81 / 7.32 |
| same, 32768-column segments, 8192 per step, 8 warps | 6.66 / 4.09 | 11.08 / 6.84 |
| same, lag 32 MiB / 6 MiB | 6.11 / 4.19, 6.75 / 4.55 | 10.26 / 7.06, 11.11 / 7.36 |
| persistent grids, 4 / 8 / 16 programs per SM (second call) | 7.86 / 4.61-5.25 | 13.15 / 7.69-8.74 |

(The second call timed the one-program-per-item split again at 8.44 / 4.99 and 14.13 / 8.29 ms, and the defaults at
5.36 / 3.74 and 9.13 / 6.33 ms: the split kernel also varies more from call to call.)

The defaults already stream at 88% (RLSD, 4 passes) and 94% (GRPO, 3 passes) of the copy bandwidth, so the only
way left to speed them up is fewer bytes, and neither L2 scheme delivered them on this card.
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
    # gradient (exactly 3 passes, no re-read), with loss_row_warps warps per row. 0 = off: slower in the 2026-11-27
    # sweep (2.07 ms against 1.13 ms at 16384 x 32000, the table above).
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
    {"loss_block_v": 8192, "loss_warps": 8},  # fastest at V = 32000 on 2026-11-27 (1.13 vs 1.55 ms)
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
