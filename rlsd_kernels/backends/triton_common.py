"""Triton helpers shared by every kernel of the package: the online log-sum-exp step over one vocabulary chunk,
NaN-propagating clamps, and the host-side device / layout checks."""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def lse_chunk(m, d, x):
    """One step of the online log-sum-exp over chunk ``x`` (float32, padded with -inf).

    Returns ``(m_new, shift, alpha, p)``: the new running max, the finite shift actually used (0 while everything
    seen is -inf, so exp() gives 0 rather than nan), the rescale ``exp(m - shift)`` of the old sum and
    ``p = exp(x - shift)``. A NaN logit makes ``p`` and so the running sum NaN: NaN rows stay NaN, as in IEEE.
    """
    m_new = tl.maximum(m, tl.max(x, axis=0))
    shift = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp(m - shift)
    p = tl.exp(x - shift)
    return m_new, shift, alpha, p


@triton.jit
def clamp_nan(x, low, high):
    """``clamp`` that keeps NaN (``tl.minimum``/``maximum`` return the bound for NaN, torch.clamp keeps NaN)."""
    return tl.where(x < low, low, tl.where(x > high, high, x))


@triton.jit
def row_pointer(BASE, row, seq_len, stride_b, stride_t):
    """Row ``row`` of a ``[B, T, V]`` strided view: ``b = row // T, t = row % T``, offsets in int64."""
    return BASE + (row // seq_len) * stride_b + (row % seq_len) * stride_t


def check_device(x: torch.Tensor) -> None:
    if x.device.type == "cpu" and not triton.knobs.runtime.interpret:
        raise RuntimeError(
            "the Triton backend got CPU tensors but TRITON_INTERPRET=1 was not set when rlsd_kernels was imported;"
            " set it, or use RLSD_BACKEND=cpp|reference"
        )


def unit_vocab_stride(*xs) -> bool:
    """All tensors have a contiguous vocabulary dimension (int32 column offsets are then enough)."""
    return all(x.stride(-1) == 1 for x in xs)
