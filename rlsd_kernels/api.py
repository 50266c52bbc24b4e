"""Public API of the fused op (docs/math.md section 5): ``rlsd_loss``, ``RLSDLoss``, ``token_logprobs``,
``opsd_loss``."""
from __future__ import annotations


import dataclasses
from typing import Optional

import torch

from . import dispatch, ops
from ._inputs import check_logits, check_loss_inputs, check_scoring, check_terms, check_terms_call
from ._output import RLSDOutput
from .hyper import LOSS_TYPES, Hyper
from .loss_terms import Terms, check_divergence, hyper_and_terms
from .ops.fused_logprobs import fused_logprobs_autograd
from .ops.fused_loss import fused_rlsd_loss_autograd
from .ops.fused_loss_terms import loss_with_terms_fused, values_on_device
from . import vocab_parallel


def rlsd_loss(student_logits, teacher_logits, labels, advantages, old_logprobs=None, mask=None, *,
              teacher_logprobs=None, lam=1.0, eps_w=0.2, clip_low=0.2, clip_high=0.28, clip_dual=3.0,
              loss_type="ppo", loss_agg_mode="token", norm=None, cu_seqlens=None, temperature=1.0,
              ignore_index=-100, return_entropy=False, inplace_backward=False,
              ref_logprobs=None, kl_coef=0.0, kl_type="k3",
              rollout_logprobs=None, rollout_is=None, rollout_is_threshold=2.0, rollout_is_mode="truncate",
              entropy_coef=0.0, distill_coef=0.0, distill_divergence="forward_kl", distill_beta=0.5,
              distill_clip=None, vocab_parallel_group=None, vocab_start=None) -> RLSDOutput:
    """Fused RLSD loss (GRPO/PPO with teacher-gap evidence weights), differentiable w.r.t. ``student_logits``.

    student_logits, teacher_logits: ``[..., V]`` float32/bfloat16/float16, any strides. ``teacher_logits=None`` and
    ``teacher_logprobs=None`` is plain GRPO; ``teacher_logprobs`` (shape of labels) replaces the teacher's logits
    when it was scored elsewhere. labels: integer ``[...]``; advantages: ``[...]`` per token or ``[B]`` per
    sequence. With ``inplace_backward=True`` the gradient is written into ``student_logits`` itself, which must
    then not be used after the backward. docs/math.md has the math and the meaning of every hyper-parameter.

    On the Triton backend the label range is checked on the device (no host sync): out-of-range labels are left
    out of the loss and reading ``out.metrics`` (or ``out.check_inputs()``) raises the ValueError.

    The docs/math.md section 2c terms (``ref_logprobs``/``kl_coef``/``kl_type``, ``rollout_logprobs``/``rollout_is``
    and its threshold and mode, ``loss_type="gspo"``, ``entropy_coef``, ``distill_*``) are all off by default; with
    all of them off the op is exactly section 2; on the Triton backend their values are checked on the device too, as
    above (on the CPU backends on the host).

    ``vocab_parallel_group`` (a ``torch.distributed`` group): the logits are this rank's vocabulary shard
    ``[..., V_local]`` starting at global id ``vocab_start`` (default ``rank * V_local``); labels are global ids
    (docs/math.md section 2d, ``rlsd_kernels/vocab_parallel.py``; the section 2c terms too).
    """
    entry = _settings(lam, eps_w, clip_low, clip_high, clip_dual, loss_type, loss_agg_mode, norm, temperature,
                      ignore_index, kl_coef, kl_type, rollout_is, rollout_is_threshold, rollout_is_mode, entropy_coef,
                      distill_coef, distill_divergence, distill_beta, distill_clip)
    return _rlsd_loss(entry.h, student_logits, teacher_logits, labels, advantages, old_logprobs, mask,
                      teacher_logprobs, cu_seqlens, return_entropy, inplace_backward, entry.x, ref_logprobs,
                      rollout_logprobs, vocab_parallel_group, vocab_start, entry)


class _Settings:
    """One set of hyper-parameter / term arguments of :func:`rlsd_loss`: its ``Hyper`` and ``Terms`` (the terms
    validated), and, once the ``Hyper`` passed the input checks of one call, the op's scalar arguments."""

    __slots__ = ("h", "x", "scalars")

    def __init__(self, h: Hyper, x: Terms):
        self.h, self.x, self.scalars = h, x, None


# Calls repeat the same arguments: (values, their types) -> _Settings, so that a call only re-derives and
# re-validates them when they change. Types are part of the key (``lam=True`` must still be rejected after
# ``lam=1``); only plain Python scalars are cached.
_SETTINGS: dict = {}
_PLAIN = frozenset((int, float, str, bool, type(None)))


def _settings(*args) -> _Settings:
    types = tuple(map(type, args))
    try:
        key = args + types
        entry = _SETTINGS.get(key)
    except TypeError:  # an unhashable argument: rejected by the checks below
        key, entry = None, None
    if entry is None:
        entry = _Settings(*hyper_and_terms(*args))  # ValueError for bad terms / loss_type, never cached
        if key is not None and _PLAIN.issuperset(types):
            if len(_SETTINGS) >= 256:
                _SETTINGS.clear()
            _SETTINGS[key] = entry
    return entry


def _op_scalars(h: Hyper) -> tuple:
    """The op's scalar arguments of ``h`` (schema order, lam ... ignore_index)."""
    return (float(h.lam), float(h.eps_w), float(h.clip_low), float(h.clip_high), float(h.clip_dual), h.loss_type,
            h.loss_agg_mode, float(h.norm or 0.0), float(h.temperature), int(h.ignore_index))


def _rlsd_loss(h: Hyper, student_logits, teacher_logits, labels, advantages, old_logprobs, mask, teacher_logprobs,
               cu_seqlens, return_entropy, inplace_backward, x: Terms = Terms(), ref_logprobs=None,
               rollout_logprobs=None, group=None, vocab_start=None, entry: Optional[_Settings] = None
               ) -> RLSDOutput:
    if vocab_parallel.check_vocab_parallel(group, vocab_start, x) is not None:  # docs/math.md section 2d
        return vocab_parallel.rlsd_loss_sharded(h, student_logits, teacher_logits, labels, advantages, old_logprobs,
                                                mask, teacher_logprobs, cu_seqlens, return_entropy, inplace_backward,
                                                group, vocab_start, x, ref_logprobs, rollout_logprobs)
    if (ref_logprobs is not None or rollout_logprobs is not None) and isinstance(labels, torch.Tensor):
        # given, even if unused: they must still be the right tensors
        check_terms(x, labels.shape, True, student_logits.device, teacher_logits, teacher_logprobs, ref_logprobs,
                    rollout_logprobs)
    if x.on:
        return _rlsd_loss_terms(h, x, student_logits, teacher_logits, labels, advantages, old_logprobs, mask,
                                teacher_logprobs, cu_seqlens, return_entropy, inplace_backward, ref_logprobs,
                                rollout_logprobs)
    # The Triton backend checks label / cu_seqlens values on the device; the CPU backends check them here (a host
    # read is free there). Under torch.compile value checks are skipped (they would break the graph).
    check_logits("student_logits", student_logits)
    compiling = torch.compiler.is_compiling()
    values = not compiling and dispatch.select_backend(student_logits.device) != "triton"
    scalars = entry.scalars if entry is not None else None  # set: h passed the checks before
    layout = check_loss_inputs(student_logits, teacher_logits, labels, advantages, old_logprobs, mask,
                               teacher_logprobs, cu_seqlens, h, values=values, hyper_checked=scalars is not None,
                               student_checked=True)
    if scalars is None:
        scalars = _op_scalars(h)
        if entry is not None:
            entry.scalars = scalars
    want_grad = torch.is_grad_enabled() and student_logits.requires_grad
    # teacher, advantages, old log-probs: the op's backward returns no gradient for them (no detach op needed)
    args = (student_logits, teacher_logits, teacher_logprobs, labels, advantages, old_logprobs, mask, cu_seqlens,
            *scalars, layout.adv_per_seq, layout.num_seqs, layout.seq_len, bool(return_entropy), want_grad,
            bool(inplace_backward))
    if want_grad and not compiling:  # the op's own autograd, without torch.library's per-call argument rebuild
        outs = fused_rlsd_loss_autograd(ops.fused_rlsd_loss, *args)
    else:
        outs = ops.fused_rlsd_loss(*args)
    loss, logp_s, logp_t, g, ent, metrics, errors = outs[:7]
    return RLSDOutput(
        loss=loss, logprobs=logp_s,
        teacher_logprobs=logp_t if teacher_logits is not None else teacher_logprobs,
        weights=g, entropy=ent if return_entropy else None, metric_values=metrics,
        input_errors=errors, vocab=student_logits.shape[-1], ignore_index=h.ignore_index)


def _rlsd_loss_terms(h: Hyper, x: Terms, student_logits, teacher_logits, labels, advantages, old_logprobs, mask,
                     teacher_logprobs, cu_seqlens, return_entropy, inplace_backward, ref_logprobs,
                     rollout_logprobs) -> RLSDOutput:
    """``rlsd_loss`` with section 2c terms on: validation (the label / ``cu_seqlens`` values on the host, or on the
    device where the Triton fused rows run: no host sync), then ``ops/fused_loss_terms.py``."""
    check_logits("student_logits", student_logits)
    on_device = values_on_device(student_logits)
    check_loss_inputs(student_logits, teacher_logits, labels, advantages, old_logprobs, mask, teacher_logprobs,
                      cu_seqlens, h, values=not torch.compiler.is_compiling() and not on_device)
    check_terms_call(x, labels, cu_seqlens, student_logits.device, teacher_logits, teacher_logprobs, ref_logprobs,
                     rollout_logprobs)
    return loss_with_terms_fused(h, x, student_logits, teacher_logits, labels, advantages, old_logprobs, mask,
                                 teacher_logprobs, cu_seqlens, return_entropy, inplace_backward, ref_logprobs,
                                 rollout_logprobs)


def token_logprobs(logits, labels, temperature: float = 1.0, return_entropy: bool = False, *,
                   ignore_index: int = -100, inplace_backward: bool = False, vocab_parallel_group=None,
                   vocab_start=None):
    """Fused ``log_softmax(logits / T)[labels]`` (float32, shape of labels, 0 at ``ignore_index``), differentiable.

    With ``return_entropy=True`` returns ``(logprobs, entropy)``; the entropy is detached. ``vocab_parallel_group``
    / ``vocab_start``: vocabulary-sharded logits, as in :func:`rlsd_loss`.
    """
    if vocab_parallel.check_vocab_parallel(vocab_parallel_group, vocab_start) is not None:
        return vocab_parallel.token_logprobs_sharded(logits, labels, temperature, return_entropy, ignore_index,
                                                     inplace_backward, vocab_parallel_group, vocab_start)
    check_scoring(logits, labels, temperature, ignore_index)
    args = (logits, None, labels, float(temperature), int(ignore_index), bool(return_entropy), bool(inplace_backward))
    if torch.is_grad_enabled() and logits.requires_grad and not torch.compiler.is_compiling():
        logp, _, _, ent = fused_logprobs_autograd(ops.fused_logprobs, *args)  # see ops/fused_loss.py
    else:
        logp, _, _, ent = ops.fused_logprobs(*args)
    return (logp, ent.detach()) if return_entropy else logp


def opsd_loss(student_logits, teacher_logits, labels, mask=None, *, divergence="forward_kl", beta=0.5, clip=None,
              loss_agg_mode="token", norm=None, cu_seqlens=None, temperature=1.0, ignore_index=-100,
              return_entropy=False, vocab_parallel_group=None, vocab_start=None) -> RLSDOutput:
    """Fused on-policy self-distillation (docs/math.md section 2b): the aggregated per-token divergence ``D_t``
    between the teacher's and the student's full distributions, gradient into ``student_logits`` only.

    The same output object as :func:`rlsd_loss` (``weights`` are all 1); ``metrics`` holds ``distill_mean``. The
    eager ground truth is :func:`rlsd_kernels.reference.opsd_loss`. ``vocab_parallel_group`` / ``vocab_start``:
    vocabulary-sharded student and teacher logits, as in :func:`rlsd_loss`.
    """
    beta, clip = check_divergence(divergence, beta, clip)
    if teacher_logits is None:
        raise ValueError("teacher_logits is required for OPSD (the teacher's full distribution)")
    x = Terms(distill_coef=1.0, distill_divergence=divergence, distill_beta=beta, distill_clip=clip).validate()
    h = Hyper(lam=0.0, loss_agg_mode=loss_agg_mode, norm=norm, temperature=temperature, ignore_index=ignore_index)
    h.validate()
    check_logits("student_logits", student_logits)
    if not isinstance(labels, torch.Tensor):
        raise ValueError(f"labels must be a torch.Tensor, got {type(labels).__name__}")
    zeros = torch.zeros(labels.shape, dtype=torch.float32, device=student_logits.device)  # no policy-gradient part
    if vocab_parallel.check_vocab_parallel(vocab_parallel_group, vocab_start) is not None:
        out = vocab_parallel.rlsd_loss_sharded(h, student_logits, teacher_logits, labels, zeros, None, mask, None,
                                               cu_seqlens, return_entropy, False, vocab_parallel_group, vocab_start, x)
    else:
        out = _rlsd_loss_terms(h, x, student_logits, teacher_logits, labels, zeros, None, mask, None, cu_seqlens,
                               return_entropy, False, None, None)
    return out._replace(metric_values=out.metric_values[-1:], base_metric_names=())


class RLSDLoss(torch.nn.Module):
    """``nn.Module`` holding a :class:`~rlsd_kernels.hyper.Hyper` and the section 2c :class:`~rlsd_kernels.loss_terms.Terms`
    for :func:`rlsd_loss`; ``lam`` (or any hyper-parameter or term setting, e.g. ``kl_coef``) may be changed between
    steps by assigning the attribute. ``ref_logprobs`` / ``rollout_logprobs`` are passed per call."""

    def __init__(self, lam=1.0, eps_w=0.2, clip_low=0.2, clip_high=0.28, clip_dual=3.0, loss_type="ppo",
                 loss_agg_mode="token", norm=None, temperature=1.0, ignore_index=-100, return_entropy=False,
                 inplace_backward=False, *, kl_coef=0.0, kl_type="k3", rollout_is=None, rollout_is_threshold=2.0,
                 rollout_is_mode="truncate", entropy_coef=0.0, distill_coef=0.0, distill_divergence="forward_kl",
                 distill_beta=0.5, distill_clip=None, vocab_parallel_group=None, vocab_start=None):
        super().__init__()
        if loss_type not in LOSS_TYPES + ("gspo",):
            raise ValueError(f"loss_type must be one of {LOSS_TYPES + ('gspo',)}, got {loss_type!r}")
        self.__dict__["terms"] = Terms(kl_coef, kl_type, rollout_is, rollout_is_threshold, rollout_is_mode,
                                       loss_type == "gspo", entropy_coef, distill_coef, distill_divergence,
                                       distill_beta, distill_clip).validate()
        self.__dict__["hyper"] = Hyper(lam, eps_w, clip_low, clip_high, clip_dual,
                                       "ppo" if loss_type == "gspo" else loss_type, loss_agg_mode, norm,
                                       temperature, ignore_index).validate()
        self.return_entropy, self.inplace_backward = return_entropy, inplace_backward
        self.vocab_parallel_group = vocab_parallel.check_vocab_parallel(vocab_parallel_group, vocab_start)
        self.vocab_start = vocab_start

    def __getattr__(self, name):
        if name == "loss_type":
            return "gspo" if self.__dict__["terms"].gspo else self.__dict__["hyper"].loss_type
        if name in Hyper.names():
            return getattr(self.__dict__["hyper"], name)
        if name in _TERM_FIELDS:
            return getattr(self.__dict__["terms"], name)
        return super().__getattr__(name)

    def __setattr__(self, name, value):
        if name == "loss_type":
            if value not in LOSS_TYPES + ("gspo",):
                raise ValueError(f"loss_type must be one of {LOSS_TYPES + ('gspo',)}, got {value!r}")
            self.__dict__["terms"] = dataclasses.replace(self.terms, gspo=value == "gspo")
            self.__dict__["hyper"] = self.hyper.replace(loss_type="ppo" if value == "gspo" else value)
        elif name in Hyper.names():
            self.__dict__["hyper"] = self.hyper.replace(**{name: value})
        elif name in _TERM_FIELDS:
            self.__dict__["terms"] = dataclasses.replace(self.terms, **{name: value}).validate()
        else:
            super().__setattr__(name, value)

    def forward(self, student_logits, teacher_logits, labels, advantages, old_logprobs=None, mask=None, *,
                teacher_logprobs=None, cu_seqlens=None, ref_logprobs=None, rollout_logprobs=None) -> RLSDOutput:
        return _rlsd_loss(self.hyper, student_logits, teacher_logits, labels, advantages, old_logprobs, mask,
                          teacher_logprobs, cu_seqlens, self.return_entropy, self.inplace_backward, self.terms,
                          ref_logprobs, rollout_logprobs, self.vocab_parallel_group, self.vocab_start)

    def extra_repr(self) -> str:
        h, x = self.hyper, self.terms
        on = {f: getattr(x, f) for f in _TERM_FIELDS if getattr(x, f) != getattr(Terms(), f)}
        return (f"lam={h.lam}, eps_w={h.eps_w}, clip=({h.clip_low}, {h.clip_high}, dual={h.clip_dual}),"
                f" loss_type={self.loss_type!r}, loss_agg_mode={h.loss_agg_mode!r}"
                + "".join(f", {k}={v!r}" for k, v in on.items()))


_TERM_FIELDS = tuple(f.name for f in dataclasses.fields(Terms) if f.name != "gspo")
