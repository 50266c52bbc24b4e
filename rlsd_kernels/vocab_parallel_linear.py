"""``rlsd_linear_loss`` with a vocabulary-sharded LM head (docs/math.md section 2d, appendix A).

Each rank holds rows ``[vocab_start, vocab_start + V_local)`` of the LM-head weight (and bias): Megatron's
``VocabParallelEmbedding`` / ``ColumnParallelLinear`` layout of the output layer. The rank's logit shard is
``h @ W_local^T (+ b_local)``; the sharded logits op (``vocab_parallel.py``) gives every rank the unsharded loss.
Backward: ``d W_local`` (and ``d b_local``) stay on the rank; ``d h = sum_r G_r @ W_r`` is all-reduced over the group
(one collective), so every rank gets the full hidden-state gradient.

This path materialises the rank's ``N x V_local`` logits and their gradient (the matmuls are torch's): the
chunked, logits-free walk of ``ops/fused_linear.py`` does not yet run sharded, because the collective of the
per-row statistics would have to sit between its statistics and gradient passes in every chunk.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from ._inputs import check_linear
from .hyper import Hyper
from .vocab_parallel import rlsd_loss_sharded


class _AllReduceGrad(torch.autograd.Function):
    """Identity forward; the backward sums the gradient over the group (each rank's logit shard contributes its
    part of ``d hidden``)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


def rlsd_linear_loss_sharded(h: Hyper, student_hidden, lm_head_weight, lm_head_bias, labels, advantages,
                             old_logprobs, mask, teacher_hidden, teacher_logprobs, cu_seqlens, return_entropy,
                             group, vocab_start, terms=None, ref_logprobs=None, rollout_logprobs=None):
    """The section 2c ``terms`` run as in ``rlsd_loss`` (``vocab_parallel_terms.py``); the distillation term needs
    ``teacher_hidden``."""
    check_linear(student_hidden, lm_head_weight, lm_head_bias, teacher_hidden)
    if teacher_hidden is not None and teacher_logprobs is not None:
        raise ValueError("pass teacher_hidden or teacher_logprobs, not both")
    if terms is not None and terms.distill_coef > 0 and teacher_hidden is None:
        got = "only teacher_logprobs was given" if teacher_logprobs is not None else "no teacher was given"
        raise ValueError(f"distill_coef > 0 needs teacher_hidden (the teacher's full distribution); {got}")
    # the logits are this op's own temporaries: the gradient overwrites them (every term's sweep reads each element
    # before it writes it)
    inplace = True
    hidden = _AllReduceGrad.apply(student_hidden, group) if torch.is_grad_enabled() else student_hidden
    logits = torch.nn.functional.linear(hidden, lm_head_weight, lm_head_bias)
    teacher = None
    if teacher_hidden is not None:
        with torch.no_grad():
            teacher = torch.nn.functional.linear(teacher_hidden, lm_head_weight, lm_head_bias)
    return rlsd_loss_sharded(h, logits, teacher, labels, advantages, old_logprobs, mask, teacher_logprobs,
                             cu_seqlens, return_entropy, inplace, group, vocab_start, terms, ref_logprobs,
                             rollout_logprobs)
