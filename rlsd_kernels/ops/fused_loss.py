"""``rlsd_kernels::fused_rlsd_loss``: the whole RLSD loss of docs/math.md sections 2-3 as one ``torch.library`` op.

The op returns the loss, the per-token outputs and the metrics, and, when the student needs a gradient, that
gradient too, formed in the forward by a second sweep over each row (Triton) or in the same call (CPU). Its
autograd backward only scales the stored gradient by ``grad_output`` on the device (free when it is 1), so a
forward+backward is a handful of launches and no host synchronisation on CUDA. With ``inplace=True`` no gradient
buffer is allocated: the backward writes the gradient into the student logits from the saved per-row factors.

A gradient formed in the forward can be consumed once: a second backward through the same graph
(``retain_graph=True``) raises.

Backends (``dispatch.get_loss_backend``): Triton runs ``backends/logits/triton_loss.py`` (three kernels); the C++
backend forms the gradient in one visit of each row (``ops/fused_rows.py``), and its in-place backward is one sweep
on the same arithmetic (``fused_rows_inplace_``); the eager reference backend runs its vocabulary pass, the O(N)
algebra of ``loss.py`` in eager torch and its gradient sweep.
"""
from __future__ import annotations

import contextlib
from typing import Optional, Tuple

import torch
from torch import Tensor

from .. import loss as loss_math
from .._layout import as_rows3d
from .. import dispatch
from ..backends.logits import row_stats_size
from ..dispatch import get_backend, get_loss_backend
from ..hyper import Hyper
from .fused_logprobs import fused_logprobs_backward_inplace
from . import fused_rows
from ._eager_autograd import eager_autograd

_EMPTY = (0,)
N_METRICS = 7


_HYPERS: dict = {}  # the op's scalar arguments -> Hyper (a training run uses a handful of settings)


def _hyper(lam, eps_w, clip_low, clip_high, clip_dual, loss_type, loss_agg_mode, norm, temperature, ignore_index):
    key = (lam, eps_w, clip_low, clip_high, clip_dual, loss_type, loss_agg_mode, norm, temperature, ignore_index)
    h = _HYPERS.get(key)
    if h is None:
        h = Hyper(lam, eps_w, clip_low, clip_high, clip_dual, loss_type, loss_agg_mode,
                  norm if loss_agg_mode == "sum" else None, temperature, ignore_index)
        if len(_HYPERS) >= 64:
            _HYPERS.clear()
        _HYPERS[key] = h
    return h


_TRITON_LOSS = []  # the Triton loss module, imported on first use


def _loss_backend(device):
    """``dispatch.get_loss_backend(device)`` without importing the module on every call."""
    if dispatch.select_backend(device) != "triton":
        return None
    if not _TRITON_LOSS:
        _TRITON_LOSS.append(get_loss_backend(device))
    return _TRITON_LOSS[0]


def _eager_loss(student, teacher, teacher_logprobs, labels, advantages, old_logprobs, mask, cu_seqlens, h,
                adv_per_seq, want_entropy, want_grad, row_stats=None):
    """CPU backends: their vocabulary pass, ``loss.py`` in eager torch, their gradient sweep. ``row_stats``
    (in-place backward on the C++ backend): receives each student row's statistics."""
    backend = get_backend(student.device)
    n = labels.numel()
    flat = labels.reshape(n).to(torch.int64)
    acc = torch.float64 if student.dtype == torch.float64 else torch.float32
    valid = _valid(flat, student.shape[-1], h, mask)
    one_visit = hasattr(backend, "fused_rows")  # C++: forward and gradient in one visit of each row
    grad = None
    if want_grad and one_visit:
        (logp_s, logp_t, lse, ent, *_), grad = _fused_rows(student, teacher, teacher_logprobs, flat, labels.shape,
                                                           advantages, adv_per_seq, old_logprobs, valid, cu_seqlens,
                                                           h, acc, want_entropy)
    else:
        stats = dict(row_stats=row_stats) if row_stats is not None and one_visit else {}
        logp_s, logp_t, lse, ent = backend.forward(as_rows3d(student), as_rows3d(teacher) if teacher is not None
                                                   else None, flat, h.temperature, h.ignore_index, want_entropy,
                                                   **stats)
    loss, coef, g, metrics = loss_math.loss_and_coef_of_batch(
        logp_s.to(acc), logp_t if teacher is not None else teacher_logprobs, labels.shape, advantages, adv_per_seq,
        old_logprobs, valid, cu_seqlens, h)
    if want_grad and grad is None:
        grad = torch.empty(student.shape, dtype=student.dtype, device=student.device)
        s3 = as_rows3d(student)
        backend.backward(coef.to(torch.float32), s3, flat, lse, h.temperature, grad.view(s3.shape))
    errors = torch.zeros(3, dtype=torch.int64, device=student.device)  # values were checked before the call
    return loss, logp_s, logp_t, g.to(torch.float32), ent, metrics, errors, lse, coef.to(torch.float32), grad


def _valid(flat, vocab: int, h: Hyper, mask):
    valid = (flat != h.ignore_index) & (flat >= 0) & (flat < vocab)
    return valid if mask is None else valid & (mask.reshape(flat.numel()) != 0)


def _plain_tokens(teacher, teacher_logprobs, flat, label_shape, advantages, adv_per_seq, old_logprobs, valid,
                  cu_seqlens, h, acc):
    """``ops/fused_rows.py``'s per-token inputs of the plain loss, from the call's own tensors."""
    from .._inputs import token_seq_ids

    n = flat.numel()
    seq_ids, num_seqs = token_seq_ids(label_shape, cu_seqlens, n, flat.device)
    adv = (advantages[seq_ids] if adv_per_seq else advantages.reshape(n)).to(acc)
    old = None if old_logprobs is None else old_logprobs.reshape(n).to(acc)
    tl = None if teacher is not None or teacher_logprobs is None else teacher_logprobs.reshape(n).to(acc)
    return fused_rows.token_inputs(valid, seq_ids, num_seqs, adv, old, tl, h)


def _fused_rows(student, teacher, teacher_logprobs, flat, label_shape, advantages, adv_per_seq, old_logprobs, valid,
                cu_seqlens, h, acc, want_entropy):
    tokens = _plain_tokens(teacher, teacher_logprobs, flat, label_shape, advantages, adv_per_seq, old_logprobs,
                           valid, cu_seqlens, h, acc)
    return fused_rows.forward_and_grad(student, teacher, flat, h, tokens, want_entropy)


@torch.library.custom_op("rlsd_kernels::fused_rlsd_loss", mutates_args=())
def fused_rlsd_loss(student: Tensor, teacher: Optional[Tensor], teacher_logprobs: Optional[Tensor], labels: Tensor,
                    advantages: Tensor, old_logprobs: Optional[Tensor], mask: Optional[Tensor],
                    cu_seqlens: Optional[Tensor], lam: float, eps_w: float, clip_low: float, clip_high: float,
                    clip_dual: float, loss_type: str, loss_agg_mode: str, norm: float, temperature: float,
                    ignore_index: int, adv_per_seq: bool, num_seqs: int, seq_len: int, want_entropy: bool,
                    want_grad: bool, inplace: bool
                    ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """-> (loss, logp_s, logp_t, weights, entropy, metrics[7], errors[3], grad, lse, coef, row_stats); per-token
    outputs have the shape of ``labels``; ``logp_t`` (teacher logits only), ``entropy``, ``grad`` (``want_grad``
    and not ``inplace``) are empty when not produced; ``lse``/``coef`` feed the in-place backward, and on the CPU
    ``row_stats`` too (``backends.logits.row_stats_size``: each student row's max, sum and running max after each
    chunk when the C++ backend ran, for its in-place backward on the fused rows' arithmetic; empty unless in place on
    the CPU)."""
    h = _hyper(lam, eps_w, clip_low, clip_high, clip_dual, loss_type, loss_agg_mode, norm, temperature, ignore_index)
    write_grad = want_grad and not inplace
    shape = labels.shape
    fused = _loss_backend(student.device)
    # the shape rule of register_fake below (by device only); filled by the C++ backend
    on_cpu_inplace = want_grad and inplace and student.device.type == "cpu"
    row_stats = student.new_zeros((row_stats_size(labels.numel(), student.shape[-1]),) if on_cpu_inplace else _EMPTY,
                                  dtype=torch.float32)
    if fused is not None:
        grad = torch.empty(student.shape, dtype=student.dtype, device=student.device) if write_grad else None
        loss, logp_s, logp_t, g, ent, metrics, errors, lse, coef = fused.fused_loss(
            as_rows3d(student), as_rows3d(teacher) if teacher is not None else None, teacher_logprobs,
            labels.contiguous(), advantages.contiguous(), adv_per_seq,
            None if old_logprobs is None else old_logprobs.contiguous(),
            None if mask is None else mask.contiguous(), cu_seqlens, num_seqs, seq_len, h, want_entropy,
            None if grad is None else as_rows3d(grad))
    else:
        loss, logp_s, logp_t, g, ent, metrics, errors, lse, coef, grad = _eager_loss(
            student, teacher, teacher_logprobs, labels, advantages, old_logprobs, mask, cu_seqlens, h, adv_per_seq,
            want_entropy, write_grad, row_stats if row_stats.numel() else None)
        loss = loss.to(torch.float32)
    empty = lambda: student.new_empty(_EMPTY, dtype=torch.float32)  # noqa: E731
    return (loss, logp_s.view(shape), empty() if logp_t is None else logp_t.view(shape), g.view(shape),
            empty() if ent is None else ent.view(shape),
            metrics if metrics.dtype == torch.float32 else metrics.to(torch.float32), errors,
            student.new_empty(_EMPTY) if grad is None else grad, lse, coef, row_stats)


@fused_rlsd_loss.register_fake
def _(student, teacher, teacher_logprobs, labels, advantages, old_logprobs, mask, cu_seqlens, lam, eps_w, clip_low,
      clip_high, clip_dual, loss_type, loss_agg_mode, norm, temperature, ignore_index, adv_per_seq, num_seqs, seq_len,
      want_entropy, want_grad, inplace):
    f32 = lambda shape: student.new_empty(shape, dtype=torch.float32)  # noqa: E731
    n = labels.numel()
    grad = student.new_empty(student.shape) if want_grad and not inplace else student.new_empty(_EMPTY)
    return (f32(()), f32(labels.shape), f32(labels.shape if teacher is not None else _EMPTY), f32(labels.shape),
            f32(labels.shape if want_entropy else _EMPTY), f32((N_METRICS,)),
            student.new_empty((3,), dtype=torch.int64), grad, f32((n,)), f32((n,)),
            f32((row_stats_size(n, student.shape[-1]),) if want_grad and inplace and student.device.type == "cpu"
                else _EMPTY))


@torch.library.custom_op("rlsd_kernels::scale_grad_", mutates_args=("grad",))
def scale_grad_(grad: Tensor, grad_output: Tensor) -> None:
    """``grad *= grad_output`` (a 0-d tensor) without a host sync on CUDA, free when grad_output is 1."""
    fused = _loss_backend(grad.device)
    if fused is not None:
        fused.scale_(grad, grad_output)
    elif grad_output.item() != 1.0:  # CPU: reading the scalar costs nothing
        grad.mul_(grad_output.to(grad.dtype))


@torch.library.custom_op("rlsd_kernels::fused_rows_inplace_", mutates_args=("student",))
def fused_rows_inplace_(student: Tensor, labels: Tensor, logp_s: Tensor, row_stats: Tensor,
                        teacher_logprobs: Optional[Tensor], advantages: Tensor, old_logprobs: Optional[Tensor],
                        mask: Optional[Tensor], cu_seqlens: Optional[Tensor], grad_output: Tensor, lam: float,
                        eps_w: float, clip_low: float, clip_high: float, clip_dual: float, loss_type: str,
                        loss_agg_mode: str, norm: float, temperature: float, ignore_index: int,
                        adv_per_seq: bool) -> None:
    """The C++ backend's in-place backward of the plain loss: its gradient written into ``student``, bit for bit the
    out-of-place fused rows' (``csrc/rlsd_fused_rows.h``, ``fused_inplace_rows``), times ``grad_output``. From the
    forward's ``logp_s`` and ``row_stats``; ``teacher_logprobs``: the teacher's (from its logits or given)."""
    h = _hyper(lam, eps_w, clip_low, clip_high, clip_dual, loss_type, loss_agg_mode, norm, temperature, ignore_index)
    n = labels.numel()
    flat = labels.reshape(n).to(torch.int64)
    acc = torch.float64 if student.dtype == torch.float64 else torch.float32
    tokens = _plain_tokens(None, teacher_logprobs, flat, labels.shape, advantages, adv_per_seq, old_logprobs,
                           _valid(flat, student.shape[-1], h, mask), cu_seqlens, h, acc)
    get_backend(student.device).fused_inplace(as_rows3d(student), flat, logp_s.reshape(n).contiguous(), row_stats,
                                              h.temperature, tokens, fused_rows.hyper_args(h))
    scale_grad_(student, grad_output)  # as the out-of-place gradient is scaled


@fused_rows_inplace_.register_fake
def _(student, labels, logp_s, row_stats, teacher_logprobs, advantages, old_logprobs, mask, cu_seqlens, grad_output,
      lam, eps_w, clip_low, clip_high, clip_dual, loss_type, loss_agg_mode, norm, temperature, ignore_index,
      adv_per_seq):
    return None


def _setup_context(ctx, inputs, output):
    ctx.forced = dispatch.forced_by_context()  # the backward runs on the forward's backend
    ctx.set_materialize_grads(False)
    ctx.mark_non_differentiable(*output[1:])  # only the loss is differentiable; log-probs etc. are detached
    student, labels = inputs[0], inputs[3]
    temperature, want_grad, inplace = inputs[16], inputs[22], inputs[23]
    ctx.inplace = inplace
    ctx.temperature = temperature
    ctx.used = False
    if not want_grad:
        ctx.save_for_backward()
    elif inplace and output[10].numel() and hasattr(get_backend(student.device), "fused_inplace"):
        # C++: fused_rows_inplace_, from the forward's log-probs and row statistics
        teacher_lp = output[2] if inputs[1] is not None else inputs[2]
        ctx.rows_args = inputs[8:19]  # lam ... ignore_index, adv_per_seq
        ctx.save_for_backward(student, labels, output[1], output[10], teacher_lp, *inputs[4:8])
    elif inplace:
        ctx.rows_args = None
        ctx.save_for_backward(student, labels, output[8], output[9])
    else:
        ctx.save_for_backward(output[7])


def _backward_on_backend(ctx, grad_loss, *_):
    nones = (None,) * 23
    if grad_loss is None or not ctx.saved_tensors:
        return (None,) + nones
    if ctx.used:
        raise RuntimeError("rlsd_loss: the gradient was formed in the forward and can be used by one backward only;"
                           " call rlsd_loss again instead of backward(retain_graph=True) twice")
    ctx.used = True
    # Nothing to record unless create_graph=True: then skip the ops' (Python) autograd kernels.
    below = contextlib.nullcontext() if torch.is_grad_enabled() else torch._C._AutoDispatchBelowAutograd()
    if ctx.inplace and ctx.rows_args is not None:
        student, labels, logp_s, row_stats, teacher_lp, adv, old, mask, cu_seqlens = ctx.saved_tensors
        with below:
            fused_rows_inplace_(student, labels, logp_s, row_stats, teacher_lp, adv, old, mask, cu_seqlens, grad_loss,
                                *ctx.rows_args)
        return (student,) + nones
    if ctx.inplace:
        student, labels, lse, coef = ctx.saved_tensors
        # coef is 0 for tokens outside the mask; grad_loss * coef keeps the device-side scalar (no sync)
        scaled = coef * grad_loss
        with below:
            fused_logprobs_backward_inplace(scaled, student, labels, lse, ctx.temperature)
        return (student,) + nones
    (grad,) = ctx.saved_tensors
    with below:
        scale_grad_(grad, grad_loss)
    return (grad,) + nones



def _backward(ctx, grad_loss, *_):
    if ctx.forced == dispatch.forced_by_context():  # already on the forward's backend (the usual case)
        return _backward_on_backend(ctx, grad_loss, *_)
    with dispatch.force_backend(ctx.forced):
        return _backward_on_backend(ctx, grad_loss, *_)

fused_rlsd_loss.register_autograd(_backward, setup_context=_setup_context)


# eager calls that need a gradient: the same autograd without torch.library's per-call overhead
fused_rlsd_loss_autograd = eager_autograd(_setup_context, _backward)
