"""The loss's forward and its whole gradient in one visit of each row: the C++ backend (``csrc/rlsd_fused_rows.h``,
described here) and the Triton one (``backends/logits/triton_rows.py``: the fused loss kernel with the token-local
terms in its epilogue).

The two-pass CPU path reads every row twice: the statistics pass, then (after the O(N) algebra has turned the
per-token log-probs into gradient factors) the gradient sweep, which recomputes every exp. On a CPU both passes are
bound by their exps, not by memory, so the gradient sweep is most of a term's cost: forward KL's sweep needs ``p_T``
as well as ``p_S``, four exps per element against plain RLSD's three. Here the kernel keeps each row in cache with
its exps stored, computes the row's gradient factors itself from its log-probs (``csrc/rlsd_token_coef.h``: the
algebra of ``loss.py`` / ``loss_terms.py`` per token, in float64), and writes the gradient right away: two exps per
element for plain RLSD and for every term but JSD's log.

What the factors need beyond the row's own log-probs comes in per token, computed here by the Python algebra itself:
the aggregation weight (over the mask, less rollout rejection), the rollout importance weight, the advantage, and the
old / teacher / reference log-probs. So the path serves every configuration whose factors are token-local: all but
GSPO (a sequence ratio of the log-probs) and rollout IS without ``old_logprobs`` (its ratio is then the log-probs'
own). The loss value and the metrics still come from the Python algebra on the kernel's per-token outputs; tests
check the gradient against the reference and against the two-pass path (``tests/backends/test_cpp_fused_rows.py``).

The gradient is formed in the forward; the backward scales it by ``grad_output`` (free when that is 1), as the
plain fused op does, and a second backward through the same graph raises.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from .. import dispatch
from .._layout import as_rows3d
from ..backends.logits import DIV_MODES
from ..loss import agg_weights
from ..loss_terms import KL_TYPES, Terms, rollout_is_of

_OFF = Terms()


def serves(student, x: Terms, old_logprobs, inplace: bool) -> bool:
    """Whether this path runs the call: a gradient is wanted and not in place, eager mode, every gradient factor is
    token-local, and the device's backend takes it (``backend_takes``)."""
    if inplace or not (torch.is_grad_enabled() and student.requires_grad) or torch.compiler.is_compiling():
        return False
    return token_local(x, old_logprobs) and backend_takes(dispatch.get_backend(student.device), x)


def token_local(x: Terms, old_logprobs) -> bool:
    """Whether every gradient factor of the terms ``x`` is token-local (see the module docstring): all but GSPO and
    rollout IS without ``old_logprobs``."""
    return not x.gspo and not (x.rollout_is is not None and old_logprobs is None)


def backend_takes(backend, x: Optional[Terms] = None) -> bool:
    """Whether the logits ``backend`` has fused rows (C++, Triton) taking the terms ``x``' divergence
    (``FUSED_ROWS_DIV_MODES``); ``x`` None: the plain loss."""
    if not hasattr(backend, "fused_rows"):
        return False
    return x is None or x.distill_coef <= 0 or DIV_MODES[x.distill_divergence] in backend.FUSED_ROWS_DIV_MODES


def token_inputs(valid, seq_ids, num_seqs, advantages, old, teacher_logprobs, h, x: Terms = _OFF, ref=None,
                 rollout=None, with_ris: bool = False):
    """The per-token float64 inputs of the kernel (flat ``[N]`` tensors in; ``valid`` the section 2 mask): each is
    computed as ``loss_with_terms`` computes it, in the same dtype (the advantages' ``acc``), so that the gradient
    and the loss value see the same mask and weights. ``with_ris``: ``(tokens, rollout IS weights | None)``."""
    acc = advantages.dtype
    f64 = lambda t: None if t is None else t.detach().to(torch.float64).contiguous()  # noqa: E731
    w_is = in_mask = None
    if x.rollout_is is not None:
        ris = rollout_is_of(x, torch.where(valid, old, 0.0), rollout, valid, seq_ids, num_seqs)
        if x.rollout_is_mode == "mask":  # the inputs stay masked with the section 2 mask (Triton: INMASK)
            in_mask = valid
        valid, w_is = ris.keep, ris.weight
    agg = agg_weights(valid, h, seq_ids, num_seqs, dtype=acc)
    tokens = dict(adv=f64(advantages), agg=f64(agg), old=f64(old), teacher_lp=f64(teacher_logprobs),
                  ref=f64(ref) if x.kl_coef > 0 else None, w_is=f64(w_is))
    if in_mask is not None:
        tokens["in_mask"] = in_mask.contiguous()
    return (tokens, ris if x.rollout_is is not None else None) if with_ris else tokens


def token_slice(r0: int, r1: int, advantages, agg, old, teacher_logprobs) -> dict:
    """The kernel's per-token inputs for rows ``[r0, r1)`` of the plain loss, from whole-batch ``[N]`` vectors
    (``agg``: the batch's aggregation weights, 0 outside the mask): a row chunk of the fused-linear op."""
    f64 = lambda t: None if t is None else t[r0:r1].to(torch.float64).contiguous()  # noqa: E731
    return dict(adv=f64(advantages), agg=f64(agg), old=f64(old), teacher_lp=f64(teacher_logprobs), ref=None,
                w_is=None)


def hyper_args(h, x: Terms = _OFF) -> dict:
    return dict(lam=float(h.lam), eps_w=float(h.eps_w), clip_low=float(h.clip_low), clip_high=float(h.clip_high),
                clip_dual=float(h.clip_dual), cispo=h.loss_type == "cispo", kl_coef=float(x.kl_coef),
                kl_type=KL_TYPES.index(x.kl_type) + 1, entropy_coef=float(x.entropy_coef),
                distill_coef=float(x.distill_coef),
                distill_clip=math.inf if x.distill_clip is None else float(x.distill_clip))


def sums_on_device(backend) -> bool:
    """Whether the backend's fused rows also sum the loss and the metrics (Triton: ``with_loss``); the C++ ones leave
    them to the Python algebra (``fused_loss_terms.terms_output``)."""
    return getattr(backend, "FUSED_ROWS_LOSS", False)


def forward_and_grad(student, teacher, flat_labels, h, tokens, want_entropy: bool, x: Terms = _OFF, out=None,
                     with_loss: bool = False):
    """``forward_terms``' outputs (flat ``[N]``; ``lse_t`` / ``div`` / ``aux`` None without a divergence), with
    ``with_loss`` (``sums_on_device`` backends) also the loss, weights and metrics of ``triton_rows.fused_rows``, and
    the gradient of the loss: a new tensor shaped like ``student``, or ``out`` (which may be ``student`` itself: each
    row is read whole before its gradient is written)."""
    backend = dispatch.get_backend(student.device)
    grad = torch.empty(student.shape, dtype=student.dtype, device=student.device) if out is None else out
    s3 = as_rows3d(student)
    div_mode = DIV_MODES[x.distill_divergence] if x.distill_coef > 0 else 0
    outs = backend.fused_rows(s3, None if teacher is None else as_rows3d(teacher), flat_labels.contiguous(),
                              h.temperature, h.ignore_index, want_entropy, div_mode, x.distill_beta, tokens,
                              hyper_args(h, x), grad.view(s3.shape), **({"with_loss": True} if with_loss else {}))
    return outs, grad


class _StoredGradients(torch.autograd.Function):
    """``loss`` (a value) made differentiable in ``inputs`` by their gradients ``grads``, formed in the forward."""

    @staticmethod
    def forward(ctx, loss, grads, *inputs):
        ctx.grads = list(grads)
        return loss.clone()

    @staticmethod
    def backward(ctx, grad_loss):
        grads = ctx.grads
        if grads is None:
            raise RuntimeError("rlsd_loss: the gradient was formed in the forward and can be used by one backward "
                               "only; call rlsd_loss again instead of backward(retain_graph=True) twice")
        ctx.grads = None
        from .fused_loss import scale_grad_  # (fused_loss imports this module)

        for g in grads:
            if g is not None:
                scale_grad_(g, grad_loss)
        return (None, None) + tuple(grads)


def with_stored_gradient(loss, student, grad: Optional[torch.Tensor]):
    return _StoredGradients.apply(loss.detach(), (grad,), student)


def with_stored_gradients(loss, inputs, grads):
    """``loss`` differentiable in each of ``inputs`` (None entries: no input) by its gradient in ``grads``."""
    pairs = [(i, g) for i, g in zip(inputs, grads) if i is not None]
    return _StoredGradients.apply(loss.detach(), tuple(g for _, g in pairs), *(i for i, _ in pairs))
