"""``rlsd_loss`` with the section 2c terms on (KL to a reference, rollout importance sampling, GSPO, entropy bonus,
distillation), on every backend.

With every term off ``rlsd_loss`` never comes here (``fused_loss.py`` runs, bit for bit as before). With terms on:

- the scoring op ``rlsd_kernels::fused_logprobs`` of the device's backend runs its vocabulary statistics pass (one
  read of the student and teacher logits), differentiable through the student log-probs;
- the O(N) algebra of ``loss.py`` (``loss_with_terms``) runs under autograd on the per-token vectors: loss, metrics,
  and, in the backward, each token's ``d loss / d logp_S``;
- the scoring op's backward turns that factor into the logits gradient in one sweep (into the logits themselves
  with ``inplace_backward=True``). KL, rollout IS and GSPO therefore cost no extra pass over the vocabulary.

The two terms that need whole rows, the entropy bonus and the distillation divergence, are not in the kernels yet:
:class:`RowTerms` evaluates them with the eager reference's row functions over blocks of ``ROW_BLOCK`` rows
(O(ROW_BLOCK x V) scratch) and recomputes each block under autograd in its backward. They cost two extra passes.
"""
from __future__ import annotations

import torch

from .._inputs import prepare
from ..hyper import Hyper
from ..loss import Terms, loss_with_terms
from ..reference import row_divergence, row_entropy
from .fused_logprobs import fused_logprobs

ROW_BLOCK = 256  # rows per block of the eager entropy / divergence pass


def _blocks(student, teacher, valid, temperature, cd):
    """``(r0, r1, z, log_softmax(teacher rows) | None)`` per block of rows, rows outside the mask zeroed first (so
    whatever they hold, nan or -inf, never reaches a value or a gradient)."""
    V = student.shape[-1]
    s2 = student.reshape(-1, V)
    t2 = None if teacher is None else teacher.reshape(-1, V)
    for r0 in range(0, s2.shape[0], ROW_BLOCK):
        r1 = min(s2.shape[0], r0 + ROW_BLOCK)
        rows = valid[r0:r1, None]
        z = torch.where(rows, s2[r0:r1].to(cd), 0.0)
        lt = None if t2 is None else torch.log_softmax(torch.where(rows, t2[r0:r1].to(cd), 0.0) / temperature, -1)
        yield r0, r1, z, lt


def _row_values(z, lt, x: Terms, temperature):
    ls = torch.log_softmax(z / temperature, -1)
    ent = row_entropy(ls) if x.entropy_coef > 0 else None
    div = (row_divergence(ls, lt, x.distill_divergence, float(x.distill_beta), x.distill_clip)
           if x.distill_coef > 0 else None)
    return ent, div


class RowTerms(torch.autograd.Function):
    """Per-token student entropy ``H_t`` and divergence ``D_t`` (section 2b) as flat ``[N]`` vectors (zeros where
    off or masked), differentiable w.r.t. the student logits; the teacher is never differentiated."""

    @staticmethod
    def forward(ctx, student, teacher, valid, x: Terms, temperature: float):
        cd = torch.float64 if student.dtype == torch.float64 else torch.float32
        n = valid.shape[0]
        ent = torch.zeros(n, dtype=cd, device=student.device)
        div = torch.zeros_like(ent)
        for r0, r1, z, lt in _blocks(student, teacher, valid, temperature, cd):
            e, d = _row_values(z, lt, x, temperature)
            if e is not None:
                ent[r0:r1] = e
            if d is not None:
                div[r0:r1] = d
        ctx.save_for_backward(student, teacher, valid)
        ctx.x, ctx.temperature, ctx.cd = x, temperature, cd
        return ent, div

    @staticmethod
    def backward(ctx, d_ent, d_div):
        student, teacher, valid = ctx.saved_tensors
        x, T = ctx.x, ctx.temperature
        grad = torch.zeros(student.shape, dtype=student.dtype, device=student.device)
        g2 = grad.reshape(-1, student.shape[-1])
        for r0, r1, z, lt in _blocks(student, teacher, valid, T, ctx.cd):
            with torch.enable_grad():
                z = z.detach().requires_grad_()
                e, d = _row_values(z, lt, x, T)
                total = z.new_zeros(())
                if e is not None and d_ent is not None:
                    total = total + (d_ent[r0:r1].to(z.dtype) * e).sum()
                if d is not None and d_div is not None:
                    total = total + (d_div[r0:r1].to(z.dtype) * d).sum()
                (gz,) = torch.autograd.grad(total, z, allow_unused=True)
            if gz is not None:
                g2[r0:r1] = gz.to(g2.dtype)
        return grad, None, None, None, None


def loss_with_terms_fused(h: Hyper, x: Terms, student_logits, teacher_logits, labels, advantages, old_logprobs, mask,
                          teacher_logprobs, cu_seqlens, return_entropy, inplace_backward, ref_logprobs,
                          rollout_logprobs):
    """The loss and output of ``rlsd_loss`` with ``x.on``; inputs already validated (values included)."""
    n = labels.numel()
    need_ent = return_entropy or x.entropy_coef > 0
    logp_s, logp_t, _, ent = fused_logprobs(student_logits, teacher_logits, labels, float(h.temperature),
                                            int(h.ignore_index), bool(need_ent), bool(inplace_backward))
    prep = prepare(student_logits, teacher_logits, labels, advantages, old_logprobs, mask, teacher_logprobs,
                   cu_seqlens, h, values=False)
    acc = prep.advantages.dtype
    lt = logp_t.reshape(n).to(acc) if teacher_logits is not None else prep.teacher_logprobs
    flat = lambda t: None if t is None else t.detach().reshape(n).to(acc)  # noqa: E731
    entropy_t = distill_t = None
    if x.needs_full_distribution:
        teacher = None if teacher_logits is None else teacher_logits.detach()
        ent_rows, div_rows = RowTerms.apply(student_logits, teacher, prep.valid, x, float(h.temperature))
        entropy_t = ent_rows.to(acc) if x.entropy_coef > 0 else None
        distill_t = div_rows.to(acc) if x.distill_coef > 0 else None
    out = loss_with_terms(logp_s.reshape(n).to(acc), lt, prep, h, x, ref=flat(ref_logprobs),
                          rollout=flat(rollout_logprobs), entropy_t=entropy_t, distill_t=distill_t,
                          entropy=ent.detach() if return_entropy else None)
    return out._replace(loss=out.loss.to(torch.float32), logprobs=logp_s.detach(),
                        teacher_logprobs=(logp_t.detach() if teacher_logits is not None else teacher_logprobs),
                        weights=out.weights.to(torch.float32), vocab=student_logits.shape[-1],
                        ignore_index=h.ignore_index)
