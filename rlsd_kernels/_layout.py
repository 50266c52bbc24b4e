"""Row layouts shared by every backend.

Kernels see logits as a 3-D strided view ``[B, T, V]``: row ``r`` is ``(r // T, r % T)``. Any leading shape
whose dimensions can be merged into two strided dimensions becomes such a view *without a copy*; this covers
contiguous tensors and the ubiquitous ``logits[:, :-1]`` shift of causal LMs, which a plain ``reshape(-1, V)``
would silently copy (an ``N x V`` temporary). Only exotic layouts fall back to a copy.
"""
from __future__ import annotations

import torch


def _merge_leading(sizes, strides):
    dims = [(s, st) for s, st in zip(sizes, strides) if s != 1]
    merged: list[list[int]] = []
    for s, st in dims:
        if merged and merged[-1][1] == s * st:
            merged[-1][0] *= s
            merged[-1][1] = st
        else:
            merged.append([s, st])
    return merged


def as_rows3d(x: torch.Tensor) -> torch.Tensor:
    """View ``x [..., V]`` as ``[B, T, V]`` with arbitrary strides (copying only if impossible)."""
    shape = x.shape
    if len(shape) == 3:  # the usual [B, T, V] (fast path: the general case below, unrolled; same view)
        B, T, V = shape
        sb, st, sv = x.stride()
        if B != 1 and T != 1:
            if sb != T * st:
                return x.as_strided(shape, (sb, st, sv), x.storage_offset())
            return x.as_strided((1, B * T, V), (0, st, sv), x.storage_offset())
        if B != 1:
            return x.as_strided((1, B, V), (0, sb, sv), x.storage_offset())
        return x.as_strided((1, T, V), (0, st if T != 1 else 0, sv), x.storage_offset())
    V = shape[-1]
    merged = _merge_leading(shape[:-1], x.stride()[:-1])
    if len(merged) > 2:
        x = x.contiguous()
        merged = _merge_leading(x.shape[:-1], x.stride()[:-1])
    while len(merged) < 2:
        merged.insert(0, [1, 0])
    (B, sb), (T, st) = merged
    return x.as_strided((B, T, V), (sb, st, x.stride(-1)), x.storage_offset())
