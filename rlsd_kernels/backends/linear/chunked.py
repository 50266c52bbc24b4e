"""Token-chunked fused linear log-prob pass (CPU, float64, and any device Triton does not serve).

The rows are processed ``rows_per_chunk`` at a time: one matmul ``hidden[chunk] @ weight^T (+ bias)`` gives the
chunk's logits (in the input dtype, as eager PyTorch would compute them), which go through the existing
logits-level op ``rlsd_kernels::fused_logprobs`` (C++ or reference backend). The backward recomputes each chunk's
logits, turns them *in place* into ``d logits`` with ``rlsd_kernels::fused_logprobs_backward_inplace`` and
contracts them with the weight and the hidden chunk. Peak extra memory is O(rows_per_chunk x V) (the student and,
with a teacher, the teacher logit chunk) plus the float32 ``d weight`` accumulator for low-precision weights.
"""
from __future__ import annotations


import torch
import torch.nn.functional as F

from ..logits import alloc_row_outputs

# 64 MiB of float32 logits per chunk: large enough for efficient GEMMs, small next to any real model.
CHUNK_BUDGET_BYTES = 64 * 1024 * 1024


# A chunk also holds at most 1/64 of the rows, so its float32 logits stay under ~3% of the N x V logits they replace
# (bf16), whatever N is; 16 rows at least keep the chunk matmuls efficient (their logits are tiny anyway).
MAX_CHUNK_FRACTION = 64
MIN_CHUNK_ROWS = 16


def rows_per_chunk(N: int, V: int) -> int:
    by_budget = max(1, CHUNK_BUDGET_BYTES // (4 * max(V, 1)))  # read at call time (tests shrink it)
    return max(1, min(by_budget, max(MIN_CHUNK_ROWS, -(-N // MAX_CHUNK_FRACTION))))


def _logits_backend(device):
    """Run the chunks on ``dispatch.chunk_backend`` (never the Triton interpreter)."""
    from ... import dispatch

    return dispatch.force_backend(dispatch.chunk_backend(device))


def _chunks(n: int, V: int):
    step = rows_per_chunk(n, V)
    for r0 in range(0, n, step):
        yield r0, min(n, r0 + step)


def forward(hidden, weight, bias, teacher, labels, temperature, ignore_index, want_entropy):
    from ... import ops

    N = hidden.shape[0]
    V = weight.shape[0]
    dev = hidden.device
    logp_s, logp_t, lse_s, ent = alloc_row_outputs(N, dev, teacher is not None, want_entropy)
    with torch.no_grad(), _logits_backend(dev):
        for r0, r1 in _chunks(N, V):
            z_s = F.linear(hidden[r0:r1], weight, bias)
            z_t = F.linear(teacher[r0:r1], weight, bias) if teacher is not None else None
            ls, lt, lse, e = ops.fused_logprobs(z_s, z_t, labels[r0:r1], temperature, ignore_index, want_entropy,
                                                False)
            del z_s, z_t
            logp_s[r0:r1] = ls
            lse_s[r0:r1] = lse
            if teacher is not None:
                logp_t[r0:r1] = lt
            if want_entropy:
                ent[r0:r1] = e
    return logp_s, logp_t, lse_s, ent


def backward(grad_logp, hidden, weight, bias, labels, lse, temperature, need_hidden, need_weight, need_bias):
    from ... import ops

    N = hidden.shape[0]
    V = weight.shape[0]
    chunks = list(_chunks(N, V))
    need_bias = need_bias and bias is not None
    acc_dtype = weight.dtype if weight.dtype in (torch.float32, torch.float64) else torch.float32
    dh = torch.empty_like(hidden, memory_format=torch.contiguous_format) if need_hidden else None
    dw = None
    if need_weight:
        # one chunk: the product is the gradient; several: accumulate (in float32 for low-precision weights)
        dw = torch.zeros(weight.shape, dtype=acc_dtype, device=weight.device) if len(chunks) > 1 else None
    db = torch.zeros(V, dtype=torch.float32, device=weight.device) if need_bias else None
    grad = grad_logp.reshape(-1).to(torch.float32)
    lse = lse.reshape(-1).to(torch.float32)
    with torch.no_grad(), _logits_backend(hidden.device):
        for r0, r1 in chunks:
            h = hidden[r0:r1]
            z = F.linear(h, weight, bias).contiguous()
            ops.fused_logprobs_backward_inplace(grad[r0:r1].contiguous(), z, labels[r0:r1], lse[r0:r1].contiguous(),
                                                temperature)
            if need_hidden:
                torch.matmul(z, weight, out=dh[r0:r1])
            if need_weight:
                if dw is None:  # a single chunk: the product is the gradient
                    dw = z.t() @ h
                else:  # accumulate in place: `dw += z.t() @ h` would allocate a V x H temporary per chunk
                    dw.addmm_(z.t().to(acc_dtype), h.to(acc_dtype))
            if need_bias:
                db += z.sum(0, dtype=torch.float32)
        if need_weight and dw is None:  # N == 0
            dw = torch.zeros_like(weight)
    return (dh, None if dw is None else dw.to(weight.dtype), None if db is None else db.to(bias.dtype))
