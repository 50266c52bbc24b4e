"""Fused *linear* RLSD loss: final hidden states + LM-head weight in, loss out, logits never materialised.

``rlsd_linear_loss`` is :func:`rlsd_kernels.rlsd_loss` with ``student_logits = student_hidden @ W^T (+ b)``, as
one op (``ops/fused_linear.py``) that walks the rows in chunks (``backends/linear/chunked.py``): neither the
``N x V`` logits nor their gradient ever exist whole (the largest tensors of an RL step at 128k-256k vocabularies),
and the gradients of hidden states, weight and bias are complete when the forward ends. The thin twin of
``api.py``: validate (``_inputs``), compute the batch's aggregation weights, run the op.
"""
from __future__ import annotations

import torch

from . import dispatch, vocab_parallel
from ._inputs import check_hyper, check_labels, check_linear, check_terms, logits_stand_in, prepare
from ._output import RLSDOutput
from .hyper import Hyper
from .loss import agg_weights
from .loss_terms import hyper_and_terms
from .ops.fused_linear import fused_linear_logprobs, fused_linear_logprobs_terms, fused_linear_rlsd_loss
from .backends.linear import chunked
from .ops import fused_rows
from .ops.fused_loss_terms import div_mode, terms_output
from .vocab_parallel_linear import rlsd_linear_loss_sharded

__all__ = ["rlsd_linear_loss", "token_logprobs_linear", "linear_backend"]

# The token-local section 2c terms in one walk over the chunks (``_terms_one_walk``); False: two walks, as GSPO
# (the A/B switch of ``python -m bench.linear``'s fused_linear_terms rows).
ONE_WALK_TERMS = True


def linear_backend(device) -> str:
    """The logits backend that the fused linear op runs its row chunks on (``dispatch.chunk_backend``): its GEMMs
    are torch's (cuBLAS / CPU BLAS) on every device."""
    return dispatch.chunk_backend(device)


def _rows(x, H):
    return x.reshape(-1, H)


# ------------------------------------------------------------------------------------------------------ API
def rlsd_linear_loss(student_hidden, lm_head_weight, labels, advantages, old_logprobs=None, mask=None, *,
                     teacher_hidden=None, teacher_logprobs=None, lm_head_bias=None, lam=1.0, eps_w=0.2,
                     clip_low=0.2, clip_high=0.28, clip_dual=3.0, loss_type="ppo", loss_agg_mode="token", norm=None,
                     cu_seqlens=None, temperature=1.0, ignore_index=-100, return_entropy=False,
                     ref_logprobs=None, kl_coef=0.0, kl_type="k3", rollout_logprobs=None, rollout_is=None,
                     rollout_is_threshold=2.0, rollout_is_mode="truncate", entropy_coef=0.0, distill_coef=0.0,
                     distill_divergence="forward_kl", distill_beta=0.5, distill_clip=None, vocab_parallel_group=None,
                     vocab_start=None) -> RLSDOutput:
    """:func:`rlsd_kernels.rlsd_loss` on ``logits = student_hidden @ lm_head_weight.T + lm_head_bias``, fused.

    student_hidden: ``[..., H]`` final hidden states (after the final norm), differentiable; lm_head_weight:
    ``[V, H]`` (the tied input embedding works), differentiable; lm_head_bias: ``[V]`` or None. The teacher is
    given as ``teacher_hidden`` (``[..., H]``, projected with the SAME weight and bias in the same GEMM, never
    differentiated) or as per-token ``teacher_logprobs`` (e.g. from :func:`token_logprobs_linear` with the
    teacher's own LM head); neither is plain GRPO. All other arguments as in ``rlsd_loss`` (docs/math.md section 5),
    the section 2c terms included (the distillation term needs ``teacher_hidden``). The token-local terms take one
    walk over the rows (four GEMMs, as the plain loss) where the chunk backend has fused rows for them (C++, Triton:
    all but GSPO and rollout IS without ``old_logprobs``); those two are walked twice (statistics,
    then the gradient in the backward: five or six GEMMs).

    ``vocab_parallel_group`` / ``vocab_start``: ``lm_head_weight`` (and bias) hold this rank's vocabulary rows
    (docs/math.md section 2d): ``d hidden`` is all-reduced over the group, ``d weight`` stays local
    (``vocab_parallel_linear.py``; materialises the shard's logits; the section 2c terms too).
    """
    h, x = hyper_and_terms(lam, eps_w, clip_low, clip_high, clip_dual, loss_type, loss_agg_mode, norm, temperature,
                           ignore_index, kl_coef, kl_type, rollout_is, rollout_is_threshold, rollout_is_mode,
                           entropy_coef, distill_coef, distill_divergence, distill_beta, distill_clip)
    check_hyper(h)
    if vocab_parallel.check_vocab_parallel(vocab_parallel_group, vocab_start, x) is not None:
        return rlsd_linear_loss_sharded(h, student_hidden, lm_head_weight, lm_head_bias, labels, advantages,
                                        old_logprobs, mask, teacher_hidden, teacher_logprobs, cu_seqlens,
                                        return_entropy, vocab_parallel_group, vocab_start, x, ref_logprobs,
                                        rollout_logprobs)
    H, V = check_linear(student_hidden, lm_head_weight, lm_head_bias, teacher_hidden)
    if teacher_hidden is not None and teacher_logprobs is not None:
        raise ValueError("pass teacher_hidden or teacher_logprobs, not both")
    prep = prepare(logits_stand_in(student_hidden, V), None, labels, advantages, old_logprobs, mask,
                   teacher_logprobs, cu_seqlens, h)
    if x.on or ref_logprobs is not None or rollout_logprobs is not None:
        check_terms(x, prep.label_shape, prep.seq_ids is not None, student_hidden.device,
                    teacher_hidden, teacher_logprobs, ref_logprobs, rollout_logprobs, "teacher_hidden")
    grad_on = torch.is_grad_enabled()
    need = [grad_on and x is not None and x.requires_grad for x in (student_hidden, lm_head_weight, lm_head_bias)]
    if x.on:
        th = None if teacher_hidden is None else _rows(teacher_hidden.detach(), H)
        if (ONE_WALK_TERMS and any(need) and not torch.compiler.is_compiling()
                and fused_rows.token_local(x, prep.old_logprobs)
                and chunked.takes_fused_rows(student_hidden.device, x)):
            return _terms_one_walk(h, x, prep, _rows(student_hidden, H), lm_head_weight, lm_head_bias, th,
                                   teacher_logprobs, ref_logprobs, rollout_logprobs, return_entropy, need, V)
        logp_s, logp_t, _, ent, _, div, _ = fused_linear_logprobs_terms(
            _rows(student_hidden, H), lm_head_weight, lm_head_bias, th, prep.labels, float(h.temperature),
            int(h.ignore_index), div_mode(x), float(x.distill_beta))
        return terms_output(h, x, prep, logp_s, logp_t if th is not None else None, ent, div, teacher_logprobs,
                            ref_logprobs, rollout_logprobs, return_entropy, V)
    acc = prep.advantages.dtype
    agg = agg_weights(prep.valid, h, prep.seq_ids, prep.num_seqs, dtype=acc)
    # teacher and weight enter the op detached where no gradient flows to them (the op returns none for them)
    loss, logp_s, logp_t, g, ent, metrics, _, _, _ = fused_linear_rlsd_loss(
        _rows(student_hidden, H), lm_head_weight, lm_head_bias,
        None if teacher_hidden is None else _rows(teacher_hidden.detach(), H), prep.teacher_logprobs, prep.labels,
        prep.valid, prep.advantages, prep.old_logprobs, agg, float(h.lam), float(h.eps_w), float(h.clip_low),
        float(h.clip_high), float(h.clip_dual), h.loss_type, float(h.temperature), int(h.ignore_index),
        bool(return_entropy), *need)
    shape = prep.label_shape
    return RLSDOutput(loss=loss, logprobs=logp_s.view(shape),
                      teacher_logprobs=(logp_t.view(shape) if teacher_hidden is not None
                                        else None if teacher_logprobs is None else teacher_logprobs.detach()),
                      weights=g.view(shape), entropy=ent.view(shape) if return_entropy else None,
                      metric_values=metrics)


def _terms_one_walk(h, x, prep, hidden, weight, bias, teacher_hidden, teacher_logprobs, ref_logprobs, rollout_logprobs,
                    return_entropy, need, V):
    """The section 2c terms whose gradient factors are token-local, in one walk over the row chunks (four GEMMs, as
    the plain loss): the per-token inputs of the whole batch first (``fused_rows.token_inputs``: aggregation weights
    less rollout rejection, IS weights, ...), then ``chunked.fused_walk``, then the loss value and metrics from the
    Python algebra on the walk's per-token outputs. The gradients are complete when the forward ends; the backward
    scales them by ``grad_output``."""
    n, acc = prep.labels.numel(), prep.advantages.dtype
    flat = lambda t: None if t is None else t.detach().reshape(n).to(acc)  # noqa: E731
    tokens = fused_rows.token_inputs(prep.valid, prep.seq_ids, prep.num_seqs, prep.advantages, prep.old_logprobs,
                                     prep.teacher_logprobs, h, x, flat(ref_logprobs), flat(rollout_logprobs))
    chunk = lambda r0, r1: {k: None if t is None else t[r0:r1] for k, t in tokens.items()}  # noqa: E731
    detached = [None if t is None else t.detach() for t in (hidden, weight, bias)]
    logp_s, logp_t, ent, div, *grads = chunked.fused_walk(*detached, teacher_hidden, prep.labels, h,
                                                           bool(return_entropy), *need, chunk, x)
    with torch.no_grad():
        out = terms_output(h, x, prep, logp_s, logp_t, ent, div, teacher_logprobs, ref_logprobs, rollout_logprobs,
                           return_entropy, V)
    inputs = [t if want else None for t, want in zip((hidden, weight, bias), need)]
    return out._replace(loss=fused_rows.with_stored_gradients(out.loss, inputs, grads))


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
