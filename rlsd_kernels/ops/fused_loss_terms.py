"""``rlsd_loss`` with the section 2c terms on (KL to a reference, rollout importance sampling, GSPO, entropy bonus,
distillation), on every backend.

With every term off ``rlsd_loss`` never comes here (``fused_loss.py`` runs, bit for bit as before). With terms on and
a gradient wanted (not in place, not under torch.compile), the backends with fused rows (``ops/fused_rows.py``: C++
and Triton) form the loss's forward and its whole gradient in one visit of each row for every token-local term.
Otherwise (GSPO, rollout IS without ``old_logprobs``, in place, compiled, the reference backend) the composed path:

- the scoring op ``rlsd_kernels::fused_logprobs`` of the device's backend runs its vocabulary statistics pass (one
  read of the student and teacher logits), differentiable through the student log-probs;
- the O(N) algebra of ``loss.py`` (``loss_with_terms``) runs under autograd on the per-token vectors: loss, metrics,
  and, in the backward, each token's ``d loss / d logp_S``;
- the scoring op's backward turns that factor into the logits gradient in one sweep (into the logits themselves
  with ``inplace_backward=True``). KL, rollout IS and GSPO therefore cost no extra pass over the vocabulary.

The two terms that need whole rows, the entropy bonus and the distillation divergence, go through
``rlsd_kernels::fused_logprobs_terms`` instead: its statistics pass also gives the entropy and, with a divergence,
the teacher's log-sum-exp and ``D_t`` (the C++ backend in the same read of both rows; JSD one more sweep per row,
over the row its first sweep left in cache; on CPU the entropy only when the loss or the output uses it),
and its backward writes the whole gradient, ``coef (onehot - p) - e p (log p + H) + f dD/dz``, in one sweep that
also reads the teacher for a divergence (C++: ``csrc/rlsd_row_terms.h``; Triton: ``backends/logits/triton_terms.py``).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from .. import dispatch
from .._inputs import device_input_errors, prepare
from .._layout import as_rows3d
from ..backends.logits import DIV_MODES
from ..dispatch import get_backend
from ..hyper import Hyper
from .._output import RLSDOutput
from ..loss_terms import EXTRA_METRIC_NAMES, Terms, loss_with_terms, masked_mean
from . import fused_rows
from .fused_logprobs import fused_logprobs

_EMPTY = (0,)
# dtypes of fused_logprobs_terms' outputs (logp_s, logp_t, lse_s, entropy, lse_t, div, aux)
TERMS_DTYPES = (torch.float32, torch.float32, torch.float64, torch.float32, torch.float64, torch.float32, torch.float32)


@torch.library.custom_op("rlsd_kernels::fused_logprobs_terms", mutates_args=())
def fused_logprobs_terms(student: Tensor, teacher: Optional[Tensor], labels: Tensor, temperature: float,
                         ignore_index: int, div_mode: int, beta: float, want_entropy: bool = True,
                         inplace_backward: bool = False
                         ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """-> (logp_s, logp_t, lse_s, entropy, lse_t, div, aux), flat ``[N]``, float32 but the float64 log-sum-exps
    (``logp_t`` / ``lse_t`` / ``div`` / ``aux`` empty when not produced, ``entropy`` without ``want_entropy``);
    differentiable through ``logp_s``, ``entropy`` and ``div``. With ``inplace_backward`` the backward writes the
    gradient into ``student`` itself (each backend reads every element before it writes it)."""
    backend = get_backend(student.device)
    out = backend.forward_terms(as_rows3d(student), None if teacher is None else as_rows3d(teacher),
                                labels.reshape(-1).to(torch.int64).contiguous(), temperature, ignore_index,
                                want_entropy, div_mode, beta)
    if not want_entropy:  # backends that have it for free still return it
        out = out[:3] + (None,) + out[4:]
    return tuple(student.new_empty(_EMPTY, dtype=dt) if t is None else t.reshape(-1)
                 for t, dt in zip(out, TERMS_DTYPES))


@fused_logprobs_terms.register_fake
def _(student, teacher, labels, temperature, ignore_index, div_mode, beta, want_entropy=True, inplace_backward=False):
    n = (labels.numel(),)
    f32 = lambda shape: student.new_empty(shape, dtype=torch.float32)  # noqa: E731
    t = n if teacher is not None else _EMPTY
    d = n if div_mode else _EMPTY
    f64 = lambda shape: f32(shape).to(torch.float64)  # noqa: E731  (the log-sum-exps are float64)
    return f32(n), f32(t), f64(n), f32(n if want_entropy else _EMPTY), f64(d), f32(d), f32(d)


def _backward_terms(coef, ent_coef, div_coef, student, teacher, labels, lse, entropy, lse_t, div, aux, temperature,
                    div_mode, beta, out3) -> None:
    """The backend's gradient sweep into ``out3`` (a ``[B, T, V]`` view with the rows of ``as_rows3d(student)``)."""
    get_backend(student.device).backward_terms(
        coef.contiguous(), None if ent_coef is None else ent_coef.contiguous(),
        None if div_coef is None else div_coef.contiguous(), as_rows3d(student),
        None if teacher is None else as_rows3d(teacher), labels.reshape(-1).to(torch.int64).contiguous(), lse,
        entropy, lse_t, div, aux, temperature, div_mode, beta, out3)


@torch.library.custom_op("rlsd_kernels::fused_logprobs_terms_backward", mutates_args=())
def fused_logprobs_terms_backward(coef: Tensor, ent_coef: Optional[Tensor], div_coef: Optional[Tensor],
                                  student: Tensor, teacher: Optional[Tensor], labels: Tensor, lse: Tensor,
                                  entropy: Tensor, lse_t: Optional[Tensor], div: Optional[Tensor],
                                  aux: Optional[Tensor], temperature: float, div_mode: int, beta: float) -> Tensor:
    out = torch.empty(student.shape, dtype=student.dtype, device=student.device)
    _backward_terms(coef, ent_coef, div_coef, student, teacher, labels, lse, entropy, lse_t, div, aux, temperature,
                    div_mode, beta, out.view(as_rows3d(student).shape))
    return out


@torch.library.custom_op("rlsd_kernels::fused_logprobs_terms_backward_inplace_", mutates_args=("student",))
def fused_logprobs_terms_backward_inplace_(coef: Tensor, ent_coef: Optional[Tensor], div_coef: Optional[Tensor],
                                           student: Tensor, teacher: Optional[Tensor], labels: Tensor, lse: Tensor,
                                           entropy: Tensor, lse_t: Optional[Tensor], div: Optional[Tensor],
                                           aux: Optional[Tensor], temperature: float, div_mode: int,
                                           beta: float) -> None:
    """The same gradient written into ``student``: every backend reads each element (chunk, row block) before it
    writes it, so input and output may alias."""
    _backward_terms(coef, ent_coef, div_coef, student, teacher, labels, lse, entropy, lse_t, div, aux, temperature,
                    div_mode, beta, as_rows3d(student))


@fused_logprobs_terms_backward.register_fake
def _(coef, ent_coef, div_coef, student, teacher, labels, lse, entropy, lse_t, div, aux, temperature, div_mode,
      beta):
    return torch.empty_like(student)


@fused_logprobs_terms_backward_inplace_.register_fake
def _(coef, ent_coef, div_coef, student, teacher, labels, lse, entropy, lse_t, div, aux, temperature, div_mode,
      beta):
    return None


def _setup_context(ctx, inputs, output):
    ctx.forced = dispatch.forced_by_context()
    # unused outputs get None, not zeros: an entropy nobody differentiates costs the CPU backward nothing
    ctx.set_materialize_grads(False)
    student, teacher, labels, temperature, _, div_mode, beta = inputs[:7]
    ctx.inplace = bool(inputs[8]) if len(inputs) > 8 else False
    ctx.save_for_backward(student, teacher, labels, output[2], output[3], output[4], output[5], output[6])
    ctx.temperature, ctx.div_mode, ctx.beta = temperature, div_mode, beta
    ctx.mark_non_differentiable(output[1], output[2], output[4], output[6])


def _backward(ctx, g_logp, _g_logp_t, _g_lse, g_ent, _g_lse_t, g_div, _g_aux):
    student, teacher, labels, lse, ent, lse_t, div, aux = ctx.saved_tensors
    zeros = lambda: torch.zeros(lse.shape, dtype=torch.float32, device=lse.device)  # noqa: E731
    coef = zeros() if g_logp is None else g_logp.to(torch.float32)
    if g_ent is not None:
        e = g_ent.to(torch.float32)
    else:  # CPU: no entropy term in the gradient sweep (the CUDA kernels keep their zero coefficient)
        e = None if student.device.type == "cpu" else zeros()
    f = None
    if ctx.div_mode:
        f = zeros() if g_div is None else g_div.to(torch.float32)
    args = (coef, e, f, student, teacher if ctx.div_mode else None, labels, lse, ent,
            lse_t if ctx.div_mode else None, div if ctx.div_mode else None, aux if ctx.div_mode else None,
            ctx.temperature, ctx.div_mode, ctx.beta)
    with dispatch.force_backend(ctx.forced):
        if ctx.inplace:
            fused_logprobs_terms_backward_inplace_(*args)
            grad = student
        else:
            grad = fused_logprobs_terms_backward(*args)
    return grad, None, None, None, None, None, None, None, None


fused_logprobs_terms.register_autograd(_backward, setup_context=_setup_context)


def terms_output(h: Hyper, x: Terms, prep, logp_s, logp_t, ent, div, teacher_logprobs, ref_logprobs,
                 rollout_logprobs, return_entropy, vocab: int):
    """The section 2c loss and output from the scoring op's per-token tensors (``logp_s``, ``ent``, ``div``
    differentiable; ``logp_t`` None without teacher logits / hidden states): shared by the logits and the
    fused-linear paths."""
    shape = prep.label_shape
    n = prep.labels.numel()
    acc = prep.advantages.dtype
    lt = logp_t.reshape(n).to(acc) if logp_t is not None else prep.teacher_logprobs
    flat = lambda t: None if t is None else t.detach().reshape(n).to(acc)  # noqa: E731
    entropy_t = ent.reshape(n).to(acc) if x.entropy_coef > 0 else None
    distill_t = None
    if x.distill_coef > 0:
        distill_t = div.reshape(n).to(acc)
        if x.distill_clip is not None:  # beyond the clip: the value is capped, the gradient zero
            distill_t = torch.clamp(distill_t, max=float(x.distill_clip))
    out = loss_with_terms(logp_s.reshape(n).to(acc), lt, prep, h, x, ref=flat(ref_logprobs),
                          rollout=flat(rollout_logprobs), entropy_t=entropy_t, distill_t=distill_t,
                          entropy=ent.detach().reshape(shape) if return_entropy else None)
    return out._replace(loss=out.loss.to(torch.float32), logprobs=logp_s.detach().reshape(shape),
                        teacher_logprobs=(logp_t.detach().reshape(shape) if logp_t is not None
                                          else teacher_logprobs),
                        weights=out.weights.to(torch.float32), vocab=vocab, ignore_index=h.ignore_index)


def loss_with_terms_fused(h: Hyper, x: Terms, student_logits, teacher_logits, labels, advantages, old_logprobs, mask,
                          teacher_logprobs, cu_seqlens, return_entropy, inplace_backward, ref_logprobs,
                          rollout_logprobs):
    """The loss and output of ``rlsd_loss`` with ``x.on``; inputs already validated (values included)."""
    teacher = None if teacher_logits is None else teacher_logits.detach()
    if fused_rows.serves(student_logits, x, old_logprobs, inplace_backward):
        return _terms_fused_rows(h, x, student_logits, teacher, labels, advantages, old_logprobs, mask,
                                 teacher_logprobs, cu_seqlens, return_entropy, ref_logprobs, rollout_logprobs)
    div = None
    if x.needs_full_distribution:  # the row terms' op: entropy and divergence differentiable
        # CPU: the entropy only where it is used (the CUDA kernels have it for free and their backward reads it)
        want_ent = x.entropy_coef > 0 or bool(return_entropy) or student_logits.device.type != "cpu"
        logp_s, logp_t, _, ent, _, div, _ = fused_logprobs_terms(student_logits, teacher, labels,
                                                                 float(h.temperature), int(h.ignore_index),
                                                                 div_mode(x), float(x.distill_beta), want_ent,
                                                                 bool(inplace_backward))
    else:
        logp_s, logp_t, _, ent = fused_logprobs(student_logits, teacher, labels, float(h.temperature),
                                                int(h.ignore_index), bool(return_entropy),
                                                bool(inplace_backward))
    prep = prepare(student_logits, teacher_logits, labels, advantages, old_logprobs, mask, teacher_logprobs,
                   cu_seqlens, h, values=False)
    out = terms_output(h, x, prep, logp_s, logp_t if teacher_logits is not None else None, ent, div,
                       teacher_logprobs, ref_logprobs, rollout_logprobs, return_entropy, student_logits.shape[-1])
    return _with_device_checks(out, student_logits, prep, h, cu_seqlens)


def _with_device_checks(out, student_logits, prep, h: Hyper, cu_seqlens):
    """``out`` with the label / ``cu_seqlens`` value checks as device flags where the caller left them to the device
    (``values_on_device``): bad tokens are already out of ``prep.valid``; reading the metrics raises."""
    if not values_on_device(student_logits):
        return out
    with torch.no_grad():
        errors = device_input_errors(prep.labels, student_logits.shape[-1], h.ignore_index, cu_seqlens)
    return out._replace(input_errors=errors)


def _terms_fused_rows(h: Hyper, x: Terms, student_logits, teacher, labels, advantages, old_logprobs, mask,
                      teacher_logprobs, cu_seqlens, return_entropy, ref_logprobs, rollout_logprobs):
    """The C++ and Triton backends: forward and gradient in one visit of each row (``ops/fused_rows.py``); the loss
    and the metrics summed on the device where the backend does (Triton), else by the Python algebra."""
    prep = prepare(student_logits, teacher, labels, advantages, old_logprobs, mask, teacher_logprobs, cu_seqlens, h,
                   values=False)
    n, acc = prep.labels.numel(), prep.advantages.dtype
    flat = lambda t: None if t is None else t.detach().reshape(n).to(acc)  # noqa: E731
    tokens, ris = fused_rows.token_inputs(prep.valid, prep.seq_ids, prep.num_seqs, prep.advantages, prep.old_logprobs,
                                          prep.teacher_logprobs, h, x, flat(ref_logprobs), flat(rollout_logprobs),
                                          with_ris=True)
    on_device = fused_rows.sums_on_device(get_backend(student_logits.device))
    outs, grad = fused_rows.forward_and_grad(student_logits.detach(), teacher, prep.labels, h, tokens,
                                             bool(return_entropy), x, with_loss=on_device)
    logp_s, logp_t, _, ent, _, div, _ = outs[:7]
    with torch.no_grad():
        if on_device:
            out = _summed_output(h, x, prep, logp_s, logp_t, ent, *outs[7:], ris, teacher_logprobs, return_entropy,
                                 student_logits.shape[-1])
        else:
            out = terms_output(h, x, prep, logp_s, logp_t, ent, div, teacher_logprobs, ref_logprobs,
                               rollout_logprobs, return_entropy, student_logits.shape[-1])
    out = _with_device_checks(out, student_logits, prep, h, cu_seqlens)
    return out._replace(loss=fused_rows.with_stored_gradient(out.loss, student_logits, grad))


def _summed_output(h: Hyper, x: Terms, prep, logp_s, logp_t, ent, loss, weights, metrics, ris, teacher_logprobs,
                   return_entropy, vocab: int) -> RLSDOutput:
    """The output from the kernel's sums (``triton_rows.fused_rows(with_loss=True)``: ``metrics`` holds
    ``METRIC_NAMES``' 7 means, then the KL, entropy and clipped-divergence means), as ``loss_with_terms`` builds it;
    the rollout IS metrics (over the section 2 mask, before rejection) from ``ris``."""
    shape = prep.label_shape
    extra = {}
    if x.kl_coef > 0:
        extra["kl_mean"] = metrics[7]
    if x.entropy_coef > 0:
        extra["entropy_mean"] = metrics[8]
    if ris is not None:
        extra["rollout_is_mean"] = masked_mean(ris.rho, prep.valid)
        extra["rollout_is_clipfrac"] = masked_mean(ris.flagged, prep.valid)
    if x.distill_coef > 0:
        extra["distill_mean"] = metrics[9]
    names = tuple(k for k in EXTRA_METRIC_NAMES if k in extra)
    values = metrics[:7]
    if names:
        values = torch.cat([values, torch.stack([extra[k].to(torch.float32) for k in names])])
    return RLSDOutput(loss=loss, logprobs=logp_s.reshape(shape),
                      teacher_logprobs=(logp_t.reshape(shape) if logp_t is not None
                                        else None if teacher_logprobs is None else teacher_logprobs.detach()),
                      weights=weights.reshape(shape), entropy=ent.reshape(shape) if return_entropy else None,
                      metric_values=values, extra_metric_names=names, vocab=vocab, ignore_index=h.ignore_index)


def values_on_device(student_logits) -> bool:
    """Whether the label and ``cu_seqlens`` values of a call are checked on the device (``RLSDOutput.input_errors``,
    no host sync) rather than on the host before it: on the Triton backend, as for the plain op. Every kernel there
    masks an out-of-range label (``triton_common.target_logits``) and ``prepare(values=False)`` leaves it out of the
    loss. Never while ``torch.compile`` traces (values are not checked then, and the backend is chosen at run time)."""
    return not torch.compiler.is_compiling() and dispatch.select_backend(student_logits.device) == "triton"


def div_mode(x: Terms) -> int:
    """The backends' integer divergence mode of the terms (0: no distillation term)."""
    return DIV_MODES[x.distill_divergence] if x.distill_coef > 0 else 0
