"""The fused linear ops: hidden states + LM-head weight in, logits never materialised whole
(``backends/linear/chunked.py`` implements them on every device).

- ``fused_linear_rlsd_loss(hidden [N, H], weight [V, H], bias?, teacher_hidden?, teacher_logprobs?, labels, valid,
  advantages, old?, agg, <section 2 hyper-parameters>, want_entropy, need_hidden, need_weight, need_bias) ->
  (loss, logp_s, logp_t, weights, entropy, metrics[7], d_hidden, d_weight, d_bias)``: the whole loss
  (``rlsd_linear_loss``), gradients formed in the forward; the autograd backward scales them by ``grad_output``
  (``scale_grad_``: free when it is 1, no host sync on CUDA). ``agg`` holds the aggregation weight of every token
  of the batch (``loss.agg_weights``), so each row chunk is independent.
- ``fused_linear_logprobs(hidden [N, H], weight [V, H], bias? [V], teacher_hidden? [N, H], labels [N], temperature,
  ignore_index, want_entropy) -> (logp_s, logp_t, lse_s, entropy)`` (float32 ``[N]``; ``logp_t``/``entropy`` empty
  when not asked for). The teacher is projected with the same weight and bias, and is never differentiated.
- ``fused_linear_logprobs_backward(grad_logp, hidden, weight, bias?, labels, lse, temperature, need_hidden,
  need_weight, need_bias) -> (d_hidden, d_weight, d_bias)`` (empty tensors for gradients not asked).

``fused_linear_logprobs`` (``token_logprobs_linear``) recomputes each chunk's logits in its backward: the gradient
of its log-probs is only known then.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from .. import dispatch
from ..backends.linear import chunked
from ..hyper import Hyper
from .fused_loss import N_METRICS, scale_grad_
from .fused_loss_terms import TERMS_DTYPES

_EMPTY = (0,)


@torch.library.custom_op("rlsd_kernels::fused_linear_logprobs", mutates_args=())
def fused_linear_logprobs(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], teacher_hidden: Optional[Tensor],
                          labels: Tensor, temperature: float, ignore_index: int, want_entropy: bool
                          ) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    logp_s, logp_t, lse, ent = chunked.forward(hidden, weight, bias, teacher_hidden, labels.to(torch.int64).contiguous(),
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
    dh, dw, db = chunked.backward(grad_logp, hidden, weight, bias, labels.to(torch.int64).contiguous(), lse,
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


# ------------------------------------------------------------------------------------------ the whole loss
@torch.library.custom_op("rlsd_kernels::fused_linear_rlsd_loss", mutates_args=())
def fused_linear_rlsd_loss(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], teacher_hidden: Optional[Tensor],
                           teacher_logprobs: Optional[Tensor], labels: Tensor, valid: Tensor, advantages: Tensor,
                           old_logprobs: Optional[Tensor], agg: Tensor, lam: float, eps_w: float, clip_low: float,
                           clip_high: float, clip_dual: float, loss_type: str, temperature: float, ignore_index: int,
                           want_entropy: bool, need_hidden: bool, need_weight: bool, need_bias: bool
                           ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    h = Hyper(lam, eps_w, clip_low, clip_high, clip_dual, loss_type, temperature=temperature,
              ignore_index=ignore_index)
    loss, logp_s, logp_t, g, ent, metrics, dh, dw, db = chunked.loss_forward(
        hidden, weight, bias, teacher_hidden, labels, valid, advantages, old_logprobs, teacher_logprobs, agg, h,
        want_entropy, need_hidden, need_weight, need_bias)
    empty = lambda: hidden.new_empty(_EMPTY, dtype=torch.float32)  # noqa: E731
    none = lambda: hidden.new_empty(_EMPTY)  # noqa: E731
    return (loss.to(torch.float32), logp_s, empty() if logp_t is None else logp_t, g.to(torch.float32),
            empty() if ent is None else ent, metrics.to(torch.float32), none() if dh is None else dh,
            none() if dw is None else dw, none() if db is None else db)


@fused_linear_rlsd_loss.register_fake
def _(hidden, weight, bias, teacher_hidden, teacher_logprobs, labels, valid, advantages, old_logprobs, agg, lam,
      eps_w, clip_low, clip_high, clip_dual, loss_type, temperature, ignore_index, want_entropy, need_hidden,
      need_weight, need_bias):
    f32 = lambda shape: hidden.new_empty(shape, dtype=torch.float32)  # noqa: E731
    n = labels.shape
    return (f32(()), f32(n), f32(n if teacher_hidden is not None else _EMPTY), f32(n),
            f32(n if want_entropy else _EMPTY), f32((N_METRICS,)),
            torch.empty_like(hidden) if need_hidden else hidden.new_empty(_EMPTY),
            torch.empty_like(weight) if need_weight else hidden.new_empty(_EMPTY),
            torch.empty_like(bias) if (need_bias and bias is not None) else hidden.new_empty(_EMPTY))


def _loss_setup_context(ctx, inputs, output):
    ctx.forced = dispatch.forced_by_context()
    ctx.set_materialize_grads(False)
    ctx.mark_non_differentiable(*output[1:])
    need_h, need_w, need_b = inputs[19], inputs[20], inputs[21] and inputs[2] is not None
    ctx.grads = (need_h, need_w, need_b)
    ctx.used = False
    ctx.save_for_backward(output[6], output[7], output[8])


def _loss_backward(ctx, grad_loss, *_):
    nones = (None,) * 19
    if grad_loss is None:
        return (None, None, None) + nones
    if ctx.used:
        raise RuntimeError("rlsd_linear_loss: the gradients were formed in the forward and can be used by one "
                           "backward only; call rlsd_linear_loss again instead of backward(retain_graph=True) twice")
    ctx.used = True
    out = []
    with dispatch.force_backend(ctx.forced):
        for need, grad in zip(ctx.grads, ctx.saved_tensors):
            if need:
                scale_grad_(grad, grad_loss)
            out.append(grad if need else None)
    return tuple(out) + nones


fused_linear_rlsd_loss.register_autograd(_loss_backward, setup_context=_loss_setup_context)



# ------------------------------------------------------------------------------ the section 2c terms
@torch.library.custom_op("rlsd_kernels::fused_linear_logprobs_terms", mutates_args=())
def fused_linear_logprobs_terms(hidden: Tensor, weight: Tensor, bias: Optional[Tensor],
                                teacher_hidden: Optional[Tensor], labels: Tensor, temperature: float,
                                ignore_index: int, div_mode: int, beta: float
                                ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``fused_logprobs_terms`` on ``hidden @ weight^T + bias``: (logp_s, logp_t, lse_s, entropy, lse_t, div, aux),
    differentiable through logp_s, entropy and div w.r.t. hidden, weight and bias."""
    out = chunked.forward_terms(hidden, weight, bias, teacher_hidden, labels.to(torch.int64).contiguous(),
                                temperature, ignore_index, div_mode, beta)
    return tuple(hidden.new_empty(_EMPTY, dtype=dt) if t is None else t for t, dt in zip(out, TERMS_DTYPES))


@fused_linear_logprobs_terms.register_fake
def _(hidden, weight, bias, teacher_hidden, labels, temperature, ignore_index, div_mode, beta):
    n = (labels.numel(),)
    f32 = lambda shape: hidden.new_empty(shape, dtype=torch.float32)  # noqa: E731
    t = n if teacher_hidden is not None else _EMPTY
    d = n if div_mode else _EMPTY
    f64 = lambda shape: f32(shape).to(torch.float64)  # noqa: E731  (the log-sum-exps are float64)
    return f32(n), f32(t), f64(n), f32(n), f64(d), f32(d), f32(d)


@torch.library.custom_op("rlsd_kernels::fused_linear_logprobs_terms_backward", mutates_args=())
def fused_linear_logprobs_terms_backward(coef: Tensor, ent_coef: Tensor, div_coef: Optional[Tensor], hidden: Tensor,
                                         weight: Tensor, bias: Optional[Tensor], teacher_hidden: Optional[Tensor],
                                         labels: Tensor, lse: Tensor, entropy: Tensor, lse_t: Optional[Tensor],
                                         div: Optional[Tensor], aux: Optional[Tensor], temperature: float,
                                         div_mode: int, beta: float, need_hidden: bool, need_weight: bool,
                                         need_bias: bool) -> Tuple[Tensor, Tensor, Tensor]:
    dh, dw, db = chunked.backward_terms(coef, ent_coef, div_coef, hidden, weight, bias, teacher_hidden,
                                        labels.to(torch.int64).contiguous(), lse, entropy, lse_t, div, aux,
                                        temperature, div_mode, beta, need_hidden, need_weight, need_bias)
    empty = hidden.new_empty(_EMPTY)
    return (empty if dh is None else dh), (empty.clone() if dw is None else dw), (empty.clone() if db is None else db)


@fused_linear_logprobs_terms_backward.register_fake
def _(coef, ent_coef, div_coef, hidden, weight, bias, teacher_hidden, labels, lse, entropy, lse_t, div, aux,
      temperature, div_mode, beta, need_hidden, need_weight, need_bias):
    e = lambda: hidden.new_empty(_EMPTY)  # noqa: E731
    return (torch.empty_like(hidden) if need_hidden else e(), torch.empty_like(weight) if need_weight else e(),
            torch.empty_like(bias) if (need_bias and bias is not None) else e())


def _terms_setup_context(ctx, inputs, output):
    ctx.forced = dispatch.forced_by_context()
    hidden, weight, bias, teacher_hidden, labels, temperature, _, div_mode, beta = inputs
    ctx.save_for_backward(hidden, weight, bias, teacher_hidden, labels, output[2], output[3], output[4], output[5],
                          output[6])
    ctx.temperature, ctx.div_mode, ctx.beta, ctx.has_bias = temperature, div_mode, beta, bias is not None
    ctx.mark_non_differentiable(output[1], output[2], output[4], output[6])


def _terms_backward(ctx, g_logp, _g_logp_t, _g_lse, g_ent, _g_lse_t, g_div, _g_aux):
    hidden, weight, bias, teacher, labels, lse, ent, lse_t, div, aux = ctx.saved_tensors
    need_h, need_w, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]
    if not (need_h or need_w or need_b):
        return (None,) * 9
    zeros = lambda: torch.zeros_like(lse)  # noqa: E731
    coef = zeros() if g_logp is None else g_logp.to(torch.float32)
    e = zeros() if g_ent is None else g_ent.to(torch.float32)
    f = (zeros() if g_div is None else g_div.to(torch.float32)) if ctx.div_mode else None
    mode = ctx.div_mode
    with dispatch.force_backend(ctx.forced):
        dh, dw, db = fused_linear_logprobs_terms_backward(
            coef, e, f, hidden, weight, bias, teacher if mode else None, labels, lse, ent,
            lse_t if mode else None, div if mode else None, aux if mode else None, ctx.temperature, mode, ctx.beta,
            bool(need_h), bool(need_w), bool(need_b and ctx.has_bias))
    return (dh if need_h else None, dw if need_w else None, db if (need_b and ctx.has_bias) else None,
            None, None, None, None, None, None)


fused_linear_logprobs_terms.register_autograd(_terms_backward, setup_context=_terms_setup_context)
