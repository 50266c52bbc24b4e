"""``rlsd_kernels::fused_linear_logprobs``: hidden states + LM-head weight in, per-token log-probs out, logits never
materialised, with its backward op, fake kernels and autograd (the twin of ``fused_logprobs`` for logits).

- ``fused_linear_logprobs(hidden [N, H], weight [V, H], bias? [V], teacher_hidden? [N, H], labels [N], temperature,
  ignore_index, want_entropy) -> (logp_s, logp_t, lse_s, entropy)`` (float32 ``[N]``; ``logp_t``/``entropy`` empty
  when not asked for). The teacher is projected with the same weight and bias, and is never differentiated.
- ``fused_linear_logprobs_backward(grad_logp, hidden, weight, bias?, labels, lse, temperature, need_hidden,
  need_weight, need_bias) -> (d_hidden, d_weight, d_bias)`` (empty tensors for gradients not asked).

The implementation is the module ``dispatch.get_linear_backend`` picks: ``backends/linear/triton.py`` or
``backends/linear/chunked.py``.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from .. import dispatch

_EMPTY = (0,)


@torch.library.custom_op("rlsd_kernels::fused_linear_logprobs", mutates_args=())
def fused_linear_logprobs(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], teacher_hidden: Optional[Tensor],
                          labels: Tensor, temperature: float, ignore_index: int, want_entropy: bool
                          ) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    impl = dispatch.get_linear_backend(hidden.device, hidden.dtype)
    logp_s, logp_t, lse, ent = impl.forward(hidden, weight, bias, teacher_hidden, labels.to(torch.int64).contiguous(),
                                            temperature, ignore_index, want_entropy)
    empty = logp_s.new_empty(_EMPTY)
    return logp_s, (empty if logp_t is None else logp_t), lse, (empty.clone() if ent is None else ent)


@fused_linear_logprobs.register_fake
def _(hidden, weight, bias, teacher_hidden, labels, temperature, ignore_index, want_entropy):
    out = lambda: hidden.new_empty(labels.shape, dtype=torch.float32)  # noqa: E731
    none = lambda: hidden.new_empty(_EMPTY, dtype=torch.float32)  # noqa: E731
    return out(), (out() if teacher_hidden is not None else none()), out(), (out() if want_entropy else none())


@torch.library.custom_op("rlsd_kernels::fused_linear_logprobs_backward", mutates_args=())
def fused_linear_logprobs_backward(grad_logp: Tensor, hidden: Tensor, weight: Tensor, bias: Optional[Tensor],
                                   labels: Tensor, lse: Tensor, temperature: float, need_hidden: bool,
                                   need_weight: bool, need_bias: bool) -> Tuple[Tensor, Tensor, Tensor]:
    impl = dispatch.get_linear_backend(hidden.device, hidden.dtype)
    dh, dw, db = impl.backward(grad_logp, hidden, weight, bias, labels.to(torch.int64).contiguous(), lse,
                               temperature, need_hidden, need_weight, need_bias and bias is not None)
    empty = hidden.new_empty(_EMPTY)
    return (empty if dh is None else dh), (empty.clone() if dw is None else dw), (empty.clone() if db is None else db)


@fused_linear_logprobs_backward.register_fake
def _(grad_logp, hidden, weight, bias, labels, lse, temperature, need_hidden, need_weight, need_bias):
    e = lambda: hidden.new_empty(_EMPTY)  # noqa: E731
    return (torch.empty_like(hidden) if need_hidden else e(), torch.empty_like(weight) if need_weight else e(),
            torch.empty_like(bias) if (need_bias and bias is not None) else e())


def _setup_context(ctx, inputs, output):
    ctx.forced = dispatch.forced_by_context()  # the backward runs on the forward's backend
    hidden, weight, bias, teacher_hidden, labels, temperature, ignore_index, want_entropy = inputs
    ctx.save_for_backward(hidden, weight, bias, labels, output[2])
    ctx.temperature = temperature
    ctx.ignore_index = ignore_index
    ctx.has_bias = bias is not None


def _backward_on_backend(ctx, grad_logp, grad_logp_t, grad_lse, grad_ent):
    hidden, weight, bias, labels, lse = ctx.saved_tensors
    need_h, need_w, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]
    if grad_logp is None or not (need_h or need_w or need_b):
        return None, None, None, None, None, None, None, None
    # log-probs at ignore_index labels are the constant 0: no gradient, whatever the caller weighted them with
    grad_logp = torch.where(labels.reshape(grad_logp.shape) == ctx.ignore_index, 0.0, grad_logp)
    dh, dw, db = fused_linear_logprobs_backward(grad_logp, hidden, weight, bias, labels, lse, ctx.temperature,
                                                bool(need_h), bool(need_w), bool(need_b and ctx.has_bias))
    return (dh if need_h else None, dw if need_w else None, db if (need_b and ctx.has_bias) else None,
            None, None, None, None, None)



def _backward(ctx, grad_logp, grad_logp_t, grad_lse, grad_ent):
    with dispatch.force_backend(ctx.forced):
        return _backward_on_backend(ctx, grad_logp, grad_logp_t, grad_lse, grad_ent)

fused_linear_logprobs.register_autograd(_backward, setup_context=_setup_context)
