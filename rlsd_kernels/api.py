"""Public API of the fused op (docs/math.md section 5): ``rlsd_loss``, ``RLSDLoss``, ``token_logprobs``."""
from __future__ import annotations


import torch

from . import dispatch, ops
from ._inputs import check_logits, check_loss_inputs, check_scoring
from ._output import RLSDOutput
from .hyper import Hyper
from . import vocab_parallel


def rlsd_loss(student_logits, teacher_logits, labels, advantages, old_logprobs=None, mask=None, *,
              teacher_logprobs=None, lam=1.0, eps_w=0.2, clip_low=0.2, clip_high=0.28, clip_dual=3.0,
              loss_type="ppo", loss_agg_mode="token", norm=None, cu_seqlens=None, temperature=1.0,
              ignore_index=-100, return_entropy=False, inplace_backward=False, vocab_parallel_group=None,
              vocab_start=None) -> RLSDOutput:
    """Fused RLSD loss (GRPO/PPO with teacher-gap evidence weights), differentiable w.r.t. ``student_logits``.

    student_logits, teacher_logits: ``[..., V]`` float32/bfloat16/float16, any strides. ``teacher_logits=None`` and
    ``teacher_logprobs=None`` is plain GRPO; ``teacher_logprobs`` (shape of labels) replaces the teacher's logits
    when it was scored elsewhere. labels: integer ``[...]``; advantages: ``[...]`` per token or ``[B]`` per
    sequence. With ``inplace_backward=True`` the gradient is written into ``student_logits`` itself, which must
    then not be used after the backward. docs/math.md has the math and the meaning of every hyper-parameter.

    On the Triton backend the label range is checked on the device (no host sync): out-of-range labels are left
    out of the loss and reading ``out.metrics`` (or ``out.check_inputs()``) raises the ValueError.

    ``vocab_parallel_group`` (a ``torch.distributed`` group): the logits are this rank's vocabulary shard
    ``[..., V_local]`` starting at global id ``vocab_start`` (default ``rank * V_local``); labels are global ids
    (docs/math.md section 2d, ``rlsd_kernels/vocab_parallel.py``).
    """
    h = Hyper(lam, eps_w, clip_low, clip_high, clip_dual, loss_type, loss_agg_mode, norm, temperature, ignore_index)
    return _rlsd_loss(h, student_logits, teacher_logits, labels, advantages, old_logprobs, mask, teacher_logprobs,
                      cu_seqlens, return_entropy, inplace_backward, vocab_parallel_group, vocab_start)


def _rlsd_loss(h: Hyper, student_logits, teacher_logits, labels, advantages, old_logprobs, mask, teacher_logprobs,
               cu_seqlens, return_entropy, inplace_backward, group=None, vocab_start=None) -> RLSDOutput:
    if vocab_parallel.check_vocab_parallel(group, vocab_start) is not None:  # docs/math.md section 2d
        return vocab_parallel.rlsd_loss_sharded(h, student_logits, teacher_logits, labels, advantages, old_logprobs,
                                                mask, teacher_logprobs, cu_seqlens, return_entropy, inplace_backward,
                                                group, vocab_start)
    # The Triton backend checks label / cu_seqlens values on the device; the CPU backends check them here (a host
    # read is free there). Under torch.compile value checks are skipped (they would break the graph).
    check_logits("student_logits", student_logits)
    values = not torch.compiler.is_compiling() and dispatch.select_backend(student_logits.device) != "triton"
    layout = check_loss_inputs(student_logits, teacher_logits, labels, advantages, old_logprobs, mask,
                               teacher_logprobs, cu_seqlens, h, values=values)
    want_grad = torch.is_grad_enabled() and student_logits.requires_grad
    # teacher, advantages, old log-probs: the op's backward returns no gradient for them (no detach op needed)
    loss, logp_s, logp_t, g, ent, metrics, errors, _, _, _ = ops.fused_rlsd_loss(
        student_logits, teacher_logits, teacher_logprobs, labels, advantages, old_logprobs, mask, cu_seqlens,
        float(h.lam), float(h.eps_w), float(h.clip_low), float(h.clip_high), float(h.clip_dual), h.loss_type,
        h.loss_agg_mode, float(h.norm or 0.0), float(h.temperature), int(h.ignore_index), layout.adv_per_seq,
        layout.num_seqs, layout.seq_len, bool(return_entropy), want_grad, bool(inplace_backward))
    return RLSDOutput(
        loss=loss, logprobs=logp_s,
        teacher_logprobs=logp_t if teacher_logits is not None else teacher_logprobs,
        weights=g, entropy=ent if return_entropy else None, metric_values=metrics,
        input_errors=errors, vocab=student_logits.shape[-1], ignore_index=h.ignore_index)


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
    logp, _, _, ent = ops.fused_logprobs(logits, None, labels, float(temperature), int(ignore_index),
                                         bool(return_entropy), bool(inplace_backward))
    return (logp, ent.detach()) if return_entropy else logp


class RLSDLoss(torch.nn.Module):
    """``nn.Module`` holding a :class:`~rlsd_kernels.hyper.Hyper` for :func:`rlsd_loss`; ``lam`` (or any
    hyper-parameter) may be changed between steps by assigning the attribute."""

    def __init__(self, lam=1.0, eps_w=0.2, clip_low=0.2, clip_high=0.28, clip_dual=3.0, loss_type="ppo",
                 loss_agg_mode="token", norm=None, temperature=1.0, ignore_index=-100, return_entropy=False,
                 inplace_backward=False, vocab_parallel_group=None, vocab_start=None):
        super().__init__()
        self.hyper = Hyper(lam, eps_w, clip_low, clip_high, clip_dual, loss_type, loss_agg_mode, norm, temperature,
                           ignore_index).validate()
        self.return_entropy, self.inplace_backward = return_entropy, inplace_backward
        self.vocab_parallel_group = vocab_parallel.check_vocab_parallel(vocab_parallel_group, vocab_start)
        self.vocab_start = vocab_start

    def __getattr__(self, name):
        if name in Hyper.names():
            return getattr(self.__dict__["hyper"], name)
        return super().__getattr__(name)

    def __setattr__(self, name, value):
        if name in Hyper.names():
            self.__dict__["hyper"] = self.hyper.replace(**{name: value})
        else:
            super().__setattr__(name, value)

    def forward(self, student_logits, teacher_logits, labels, advantages, old_logprobs=None, mask=None, *,
                teacher_logprobs=None, cu_seqlens=None) -> RLSDOutput:
        return _rlsd_loss(self.hyper, student_logits, teacher_logits, labels, advantages, old_logprobs, mask,
                          teacher_logprobs, cu_seqlens, self.return_entropy, self.inplace_backward,
                          self.vocab_parallel_group, self.vocab_start)

    def extra_repr(self) -> str:
        h = self.hyper
        return (f"lam={h.lam}, eps_w={h.eps_w}, clip=({h.clip_low}, {h.clip_high}, dual={h.clip_dual}),"
                f" loss_type={h.loss_type!r}, loss_agg_mode={h.loss_agg_mode!r}")
