"""Public API of the fused op (SPEC section 5): ``rlsd_loss``, ``RLSDLoss``, ``token_logprobs``."""
from __future__ import annotations


import torch

from . import ops
from ._inputs import Hyper, check_hyper, check_scoring, prepare
from ._output import RLSDOutput
from .reference import loss_from_logprobs


def rlsd_loss(student_logits, teacher_logits, labels, advantages, old_logprobs=None, mask=None, *,
              teacher_logprobs=None, lam=1.0, eps_w=0.2, clip_low=0.2, clip_high=0.28, clip_dual=3.0,
              loss_type="ppo", loss_agg_mode="token", norm=None, cu_seqlens=None, temperature=1.0,
              ignore_index=-100, return_entropy=False, inplace_backward=False) -> RLSDOutput:
    """Fused RLSD loss (GRPO/PPO with teacher-gap evidence weights), differentiable w.r.t. ``student_logits``.

    student_logits, teacher_logits: ``[..., V]`` float32/bfloat16/float16, any strides. ``teacher_logits=None`` and
    ``teacher_logprobs=None`` is plain GRPO; ``teacher_logprobs`` (shape of labels) replaces the teacher's logits
    when it was scored elsewhere. labels: integer ``[...]``; advantages: ``[...]`` per token or ``[B]`` per
    sequence. With ``inplace_backward=True`` the gradient is written into ``student_logits`` itself, which must
    then not be used after the backward. See SPEC.md for the math and the meaning of every hyper-parameter.
    """
    h = Hyper(lam, eps_w, clip_low, clip_high, clip_dual, loss_type, loss_agg_mode, norm, temperature, ignore_index)
    prep = prepare(student_logits, teacher_logits, labels, advantages, old_logprobs, mask, teacher_logprobs,
                   cu_seqlens, h)
    teacher = teacher_logits.detach() if teacher_logits is not None else None
    # prep.labels is the flat int64 [N] copy validation already made: the op's outputs come back flat, as the
    # loss algebra wants them
    logp_s, logp_t, _, ent = ops.fused_logprobs(student_logits, teacher, prep.labels, float(temperature),
                                                int(ignore_index), bool(return_entropy), bool(inplace_backward))
    acc = prep.advantages.dtype
    logp_s = logp_s.to(acc)
    if teacher is not None:
        logp_t = logp_t.to(acc)
    else:
        logp_t = prep.teacher_logprobs
    return loss_from_logprobs(logp_s, logp_t, prep, h, ent if return_entropy else None)


def token_logprobs(logits, labels, temperature: float = 1.0, return_entropy: bool = False, *,
                   ignore_index: int = -100, inplace_backward: bool = False):
    """Fused ``log_softmax(logits / T)[labels]`` (float32, shape of labels, 0 at ``ignore_index``), differentiable.

    With ``return_entropy=True`` returns ``(logprobs, entropy)``; the entropy is detached.
    """
    check_scoring(logits, labels, temperature, ignore_index)
    logp, _, _, ent = ops.fused_logprobs(logits, None, labels, float(temperature), int(ignore_index),
                                         bool(return_entropy), bool(inplace_backward))
    return (logp, ent.detach()) if return_entropy else logp


class RLSDLoss(torch.nn.Module):
    """``nn.Module`` holding the hyper-parameters of :func:`rlsd_loss`; ``lam`` may be changed between steps."""

    def __init__(self, lam=1.0, eps_w=0.2, clip_low=0.2, clip_high=0.28, clip_dual=3.0, loss_type="ppo",
                 loss_agg_mode="token", norm=None, temperature=1.0, ignore_index=-100, return_entropy=False,
                 inplace_backward=False):
        super().__init__()
        check_hyper(Hyper(lam, eps_w, clip_low, clip_high, clip_dual, loss_type, loss_agg_mode, norm, temperature,
                          ignore_index))
        self.lam, self.eps_w = lam, eps_w
        self.clip_low, self.clip_high, self.clip_dual = clip_low, clip_high, clip_dual
        self.loss_type, self.loss_agg_mode, self.norm = loss_type, loss_agg_mode, norm
        self.temperature, self.ignore_index = temperature, ignore_index
        self.return_entropy, self.inplace_backward = return_entropy, inplace_backward

    def forward(self, student_logits, teacher_logits, labels, advantages, old_logprobs=None, mask=None, *,
                teacher_logprobs=None, cu_seqlens=None) -> RLSDOutput:
        return rlsd_loss(student_logits, teacher_logits, labels, advantages, old_logprobs, mask,
                         teacher_logprobs=teacher_logprobs, lam=self.lam, eps_w=self.eps_w,
                         clip_low=self.clip_low, clip_high=self.clip_high, clip_dual=self.clip_dual,
                         loss_type=self.loss_type, loss_agg_mode=self.loss_agg_mode, norm=self.norm,
                         cu_seqlens=cu_seqlens, temperature=self.temperature, ignore_index=self.ignore_index,
                         return_entropy=self.return_entropy, inplace_backward=self.inplace_backward)

    def extra_repr(self) -> str:
        return (f"lam={self.lam}, eps_w={self.eps_w}, clip=({self.clip_low}, {self.clip_high}, dual={self.clip_dual}),"
                f" loss_type={self.loss_type!r}, loss_agg_mode={self.loss_agg_mode!r}")
