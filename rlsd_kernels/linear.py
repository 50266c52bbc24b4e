"""Fused *linear* RLSD loss: final hidden states + LM-head weight in, loss out, logits never materialised.

``rlsd_linear_loss`` is :func:`rlsd_kernels.rlsd_loss` with ``student_logits = student_hidden @ W^T (+ b)``:
the vocabulary projection, log-softmax and target gather run in one fused op, so neither the ``N x V`` logits nor
their gradient ever exist in memory (the largest tensors of an RL step at 128k-256k vocabularies). Everything after
the per-token log-probs is the shared O(N) algebra ``loss.loss_from_logprobs``.

Ops (``torch.library``, traceable by ``torch.compile``):
- ``rlsd_kernels::fused_linear_logprobs(hidden [N, H], weight [V, H], bias? [V], teacher_hidden? [N, H],
  labels [N], temperature, ignore_index, want_entropy) -> (logp_s, logp_t, lse_s, entropy)`` (float32 ``[N]``;
  ``logp_t``/``entropy`` empty when not asked for). The teacher is projected with the same weight and bias, and is
  never differentiated.
- ``rlsd_kernels::fused_linear_logprobs_backward(grad_logp, hidden, weight, bias?, labels, lse, temperature,
  need_hidden, need_weight, need_bias) -> (d_hidden, d_weight, d_bias)`` (empty tensors for gradients not asked).

Backend choice: ``dispatch.select_backend(op="linear")``:
- CUDA with the ``triton`` backend (the default there): ``backends/triton_linear.py``;
- CPU: Triton (interpreter) only when ``triton`` is *explicitly* forced, with ``force_backend("triton")`` or
  ``RLSD_BACKEND=triton``. ``TRITON_INTERPRET=1`` alone sends the logits op to Triton,
  but interpreting GEMM tiles is far too slow to be a default, so the token-chunked path is used instead;
- everything else (``cpp``/``reference`` backends, float64, other devices): ``backends/linear_chunked.py``.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from . import dispatch
from ._inputs import LOGIT_DTYPES, Hyper, check_hyper, check_labels, prepare
from ._output import RLSDOutput
from .loss import loss_from_logprobs

__all__ = ["rlsd_linear_loss", "token_logprobs_linear", "fused_linear_logprobs", "linear_backend"]

_EMPTY = (0,)


def linear_backend(device, dtype=torch.float32) -> str:
    """``"triton"`` or ``"chunked"``: which implementation serves the fused linear op (``dispatch.select_backend``)."""
    return dispatch.select_backend(device, op="linear", dtype=dtype)


def _impl(device, dtype):
    if linear_backend(device, dtype) == "triton":
        from .backends import triton_linear

        return triton_linear
    from .backends import linear_chunked

    return linear_chunked


# ------------------------------------------------------------------------------------------------------ ops
@torch.library.custom_op("rlsd_kernels::fused_linear_logprobs", mutates_args=())
def fused_linear_logprobs(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], teacher_hidden: Optional[Tensor],
                          labels: Tensor, temperature: float, ignore_index: int, want_entropy: bool
                          ) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    impl = _impl(hidden.device, hidden.dtype)
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
    impl = _impl(hidden.device, hidden.dtype)
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
    hidden, weight, bias, teacher_hidden, labels, temperature, ignore_index, want_entropy = inputs
    ctx.save_for_backward(hidden, weight, bias, labels, output[2])
    ctx.temperature = temperature
    ctx.ignore_index = ignore_index
    ctx.has_bias = bias is not None


def _backward(ctx, grad_logp, grad_logp_t, grad_lse, grad_ent):
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


fused_linear_logprobs.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------- validation
def _check_tensor(name, x):
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in LOGIT_DTYPES:
        raise ValueError(f"{name} must be float32, bfloat16, float16 or float64, got {x.dtype}")


def check_linear(hidden, weight, bias=None, teacher_hidden=None, *, hidden_name="student_hidden",
                 weight_name="lm_head_weight", bias_name="lm_head_bias") -> Tuple[int, int]:
    """Validate the hidden states / LM-head weight / bias trio; returns ``(H, V)``."""
    _check_tensor(hidden_name, hidden)
    _check_tensor(weight_name, weight)
    if hidden.dim() < 1 or hidden.shape[-1] < 1:
        raise ValueError(f"{hidden_name} must have shape [..., H] with H >= 1, got {tuple(hidden.shape)}")
    if weight.dim() != 2 or weight.shape[0] < 1:
        raise ValueError(f"{weight_name} must have shape [V, H] with V >= 1, got {tuple(weight.shape)}")
    H, V = hidden.shape[-1], weight.shape[0]
    if weight.shape[1] != H:
        raise ValueError(f"{weight_name} has H={weight.shape[1]} but {hidden_name} has H={H} "
                         f"(shapes {tuple(weight.shape)} and {tuple(hidden.shape)})")
    def same_dtype_device(name, x):
        if x.dtype != hidden.dtype:
            raise ValueError(f"{name} is {x.dtype} but {hidden_name} is {hidden.dtype}; cast one of them")
        if x.device != hidden.device:
            raise ValueError(f"{name} is on {x.device} but {hidden_name} is on {hidden.device}")

    same_dtype_device(weight_name, weight)
    if bias is not None:
        _check_tensor(bias_name, bias)
        if tuple(bias.shape) != (V,):
            raise ValueError(f"{bias_name} must have shape ({V},) (V of {weight_name}), got {tuple(bias.shape)}")
        same_dtype_device(bias_name, bias)
    if teacher_hidden is not None:
        _check_tensor("teacher_hidden", teacher_hidden)
        if tuple(teacher_hidden.shape) != tuple(hidden.shape):
            raise ValueError(f"teacher_hidden must have shape {tuple(hidden.shape)} (that of {hidden_name}), "
                             f"got {tuple(teacher_hidden.shape)}")
        same_dtype_device("teacher_hidden", teacher_hidden)
    return H, V


def _logits_stand_in(hidden, V):
    """A zero-stride ``[..., V]`` view with no storage of its own, so ``prepare`` can validate everything else."""
    return hidden.new_zeros(()).expand(*hidden.shape[:-1], V)


def _rows(x, H):
    return x.reshape(-1, H)


# ------------------------------------------------------------------------------------------------------ API
def rlsd_linear_loss(student_hidden, lm_head_weight, labels, advantages, old_logprobs=None, mask=None, *,
                     teacher_hidden=None, teacher_logprobs=None, lm_head_bias=None, lam=1.0, eps_w=0.2,
                     clip_low=0.2, clip_high=0.28, clip_dual=3.0, loss_type="ppo", loss_agg_mode="token", norm=None,
                     cu_seqlens=None, temperature=1.0, ignore_index=-100, return_entropy=False) -> RLSDOutput:
    """:func:`rlsd_kernels.rlsd_loss` on ``logits = student_hidden @ lm_head_weight.T + lm_head_bias``, fused.

    student_hidden: ``[..., H]`` final hidden states (after the final norm), differentiable; lm_head_weight:
    ``[V, H]`` (the tied input embedding works), differentiable; lm_head_bias: ``[V]`` or None. The teacher is
    given as ``teacher_hidden`` (``[..., H]``, projected with the SAME weight and bias in the same tile pass, never
    differentiated) or as per-token ``teacher_logprobs`` (e.g. from :func:`token_logprobs_linear` with the
    teacher's own LM head); neither is plain GRPO. All other arguments as in ``rlsd_loss`` (SPEC section 5).
    """
    h = Hyper(lam, eps_w, clip_low, clip_high, clip_dual, loss_type, loss_agg_mode, norm, temperature, ignore_index)
    check_hyper(h)
    H, V = check_linear(student_hidden, lm_head_weight, lm_head_bias, teacher_hidden)
    if teacher_hidden is not None and teacher_logprobs is not None:
        raise ValueError("pass teacher_hidden or teacher_logprobs, not both")
    prep = prepare(_logits_stand_in(student_hidden, V), None, labels, advantages, old_logprobs, mask,
                   teacher_logprobs, cu_seqlens, h)
    th = _rows(teacher_hidden.detach(), H) if teacher_hidden is not None else None
    logp_s, logp_t, _, ent = fused_linear_logprobs(_rows(student_hidden, H), lm_head_weight, lm_head_bias, th,
                                                   prep.labels, float(temperature), int(ignore_index),
                                                   bool(return_entropy))
    acc = prep.advantages.dtype
    logp_s = logp_s.to(acc)
    logp_t = logp_t.to(acc) if th is not None else prep.teacher_logprobs
    return loss_from_logprobs(logp_s, logp_t, prep, h, ent if return_entropy else None)


def token_logprobs_linear(hidden, weight, labels, bias=None, temperature: float = 1.0, return_entropy: bool = False,
                          *, ignore_index: int = -100):
    """Fused ``log_softmax((hidden @ weight.T + bias) / T)[labels]`` (float32, shape of labels, 0 at
    ``ignore_index``), differentiable w.r.t. hidden, weight and bias; with ``return_entropy=True`` returns
    ``(logprobs, entropy)`` (entropy detached). For old-policy / reference / teacher scoring without logits."""
    check_hyper(Hyper(temperature=temperature, ignore_index=ignore_index))
    H, V = check_linear(hidden, weight, bias, hidden_name="hidden", weight_name="weight", bias_name="bias")
    check_labels(labels, hidden.shape[:-1], V, ignore_index, hidden.device)
    logp, _, _, ent = fused_linear_logprobs(_rows(hidden, H), weight, bias, None, labels.reshape(-1),
                                            float(temperature), int(ignore_index), bool(return_entropy))
    logp = logp.view(labels.shape)
    return (logp, ent.detach().view(labels.shape)) if return_entropy else logp
