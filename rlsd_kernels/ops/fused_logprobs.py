"""The scoring pass (``token_logprobs``: the caller's own loss differentiates the log-probs) as ``torch.library``
ops with autograd and fake kernels; the backward never builds an ``N x V`` temporary.

- ``rlsd_kernels::fused_logprobs(student, teacher?, labels, temperature, ignore_index, want_entropy,
  inplace_backward) -> (logp_s, logp_t, lse_s, entropy)``; ``logp_t``/``entropy`` are empty when not asked for.
- ``rlsd_kernels::fused_logprobs_backward(grad_logp, student, labels, lse, temperature) -> grad_student``
- ``rlsd_kernels::fused_logprobs_backward_inplace(...)``: the same, written into ``student`` (declared mutated).

"""
from __future__ import annotations

import contextlib
from typing import Optional, Tuple

import torch
from torch import Tensor

from .._layout import as_rows3d
from .. import dispatch
from ..dispatch import get_backend
from ._eager_autograd import eager_autograd

_EMPTY = (0,)


def _flat_labels(labels: Tensor) -> Tensor:
    return labels.reshape(-1).to(torch.int64).contiguous()


@torch.library.custom_op("rlsd_kernels::fused_logprobs", mutates_args=())
def fused_logprobs(student: Tensor, teacher: Optional[Tensor], labels: Tensor, temperature: float,
                   ignore_index: int, want_entropy: bool, inplace_backward: bool
                   ) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    backend = get_backend(student.device)
    s3 = as_rows3d(student)
    t3 = as_rows3d(teacher) if teacher is not None else None
    logp_s, logp_t, lse, ent = backend.forward(s3, t3, _flat_labels(labels), temperature, ignore_index, want_entropy)
    shape = labels.shape
    empty = logp_s.new_empty(_EMPTY)
    return (logp_s.view(shape), empty if logp_t is None else logp_t.view(shape), lse.view(shape),
            empty.clone() if ent is None else ent.view(shape))


@fused_logprobs.register_fake
def _(student, teacher, labels, temperature, ignore_index, want_entropy, inplace_backward):
    out = lambda: student.new_empty(labels.shape, dtype=torch.float32)  # noqa: E731
    none = lambda: student.new_empty(_EMPTY, dtype=torch.float32)  # noqa: E731
    return out(), (out() if teacher is not None else none()), out(), (out() if want_entropy else none())


def _run_backward(grad_logp, student, labels, lse, temperature, out):
    backend = get_backend(student.device)
    s3 = as_rows3d(student)
    # ``out`` is either ``student`` (in place) or a fresh contiguous buffer: give it the same [B, T, V] split.
    o3 = s3 if out is student else out.view(s3.shape)
    backend.backward(grad_logp.reshape(-1).to(torch.float32).contiguous(), s3, _flat_labels(labels),
                     lse.reshape(-1).contiguous(), temperature, o3)


@torch.library.custom_op("rlsd_kernels::fused_logprobs_backward", mutates_args=())
def fused_logprobs_backward(grad_logp: Tensor, student: Tensor, labels: Tensor, lse: Tensor,
                            temperature: float) -> Tensor:
    grad = torch.empty(student.shape, dtype=student.dtype, device=student.device)
    _run_backward(grad_logp, student, labels, lse, temperature, grad)
    return grad


@fused_logprobs_backward.register_fake
def _(grad_logp, student, labels, lse, temperature):
    return torch.empty(student.shape, dtype=student.dtype, device=student.device)


@torch.library.custom_op("rlsd_kernels::fused_logprobs_backward_inplace", mutates_args=("student",))
def fused_logprobs_backward_inplace(grad_logp: Tensor, student: Tensor, labels: Tensor, lse: Tensor,
                                    temperature: float) -> None:
    # Each element is read before it is overwritten by the same program, so aliasing input and output is safe.
    _run_backward(grad_logp, student, labels, lse, temperature, student)


def _setup_context(ctx, inputs, output):
    ctx.forced = dispatch.forced_by_context()  # the backward runs on the forward's backend
    student, teacher, labels, temperature, ignore_index, want_entropy, inplace_backward = inputs
    ctx.save_for_backward(student, labels, output[2])
    ctx.temperature = temperature
    ctx.ignore_index = ignore_index
    ctx.inplace = inplace_backward


def _backward_on_backend(ctx, grad_logp, grad_logp_t, grad_lse, grad_ent):
    student, labels, lse = ctx.saved_tensors
    if grad_logp is None:
        return None, None, None, None, None, None, None
    # log-probs at ignore_index labels are the constant 0: no gradient, whatever the caller weighted them with
    grad_logp = torch.where(labels == ctx.ignore_index, 0.0, grad_logp)
    # Nothing to record unless create_graph=True: then skip the ops' (Python) autograd kernels.
    below = contextlib.nullcontext() if torch.is_grad_enabled() else torch._C._AutoDispatchBelowAutograd()
    with below:
        if ctx.inplace:
            fused_logprobs_backward_inplace(grad_logp, student, labels, lse, ctx.temperature)
            grad = student
        else:
            grad = fused_logprobs_backward(grad_logp, student, labels, lse, ctx.temperature)
    return grad, None, None, None, None, None, None



def _backward(ctx, grad_logp, grad_logp_t, grad_lse, grad_ent):
    if ctx.forced == dispatch.forced_by_context():  # already on the forward's backend (the usual case)
        return _backward_on_backend(ctx, grad_logp, grad_logp_t, grad_lse, grad_ent)
    with dispatch.force_backend(ctx.forced):
        return _backward_on_backend(ctx, grad_logp, grad_logp_t, grad_lse, grad_ent)

fused_logprobs.register_autograd(_backward, setup_context=_setup_context)


# eager calls that need a gradient: the same autograd without torch.library's per-call overhead
fused_logprobs_autograd = eager_autograd(_setup_context, _backward)
