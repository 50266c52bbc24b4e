"""Vocabulary-parallel (tensor-parallel) logits, docs/math.md section 2d.

Each rank of ``vocab_parallel_group`` holds a contiguous shard ``[..., V_local]`` of the logits, global ids
``[vocab_start, vocab_start + V_local)``. Per call:

1. one small collective checks that the shards tile ``[0, V)`` (and that every rank scores the same rows);
2. each rank runs its backend's existing per-row statistics pass on its shard, with the labels it does not own
   turned into "no target" (local label -1): local ``lse``, the owner's local log-prob, the entropy partial;
3. ONE all-gather of those per-row partials (packed in one ``[fields, N]`` float32 tensor per rank);
4. every rank combines the gathered table in rank order (identical bits on every rank) into the global
   log-sum-exp, log-probs and entropy, then runs the O(N) algebra of ``loss.py``;
5. the backward runs the backend's gradient sweep on the local shard only, with the GLOBAL ``lse`` and the
   one-hot term only where the rank owns the label. No collective in the backward.

An all-gather of the partials (instead of an all-reduce of max, then one of sums) makes step 3 a single
collective and makes the combination order fixed, so all ranks get bit-identical results. Its size is
``P * fields * N`` floats, small next to the ``N x V_local`` logits.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

import torch
import torch.distributed as dist

from . import dispatch
from . import loss as loss_math
from ._inputs import check_logits, check_loss_inputs, check_scoring
from ._layout import as_rows3d
from ._output import RLSDOutput
from .hyper import Hyper

CPP_RECOMPUTED_LSE = 32.0  # csrc/rlsd_chunks.h kPreciseLse
NOT_OWNED = -1  # local label of a row whose target lives on another rank (no backend matches it)


# ------------------------------------------------------------------------------------------ collectives
def _gather_rows(x: torch.Tensor, group, world: int) -> torch.Tensor:
    """All-gather a ``[k, N]`` tensor from every rank into ``[P, k, N]`` (one collective)."""
    x = x.contiguous()
    out = x.new_empty((world * x.shape[0],) + tuple(x.shape[1:]))
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(out, x, group=group)
    return out.view((world,) + tuple(x.shape))


@dataclass(frozen=True)
class Shard:
    """This rank's vocabulary shard and the global layout (every rank holds the same ``starts``/``sizes``)."""

    group: object
    rank: int
    world: int
    start: int
    size: int
    vocab: int            # global V
    starts: List[int]     # vocab_start of every rank, in rank order
    sizes: List[int]      # V_local of every rank


def resolve_shard(group, vocab_start, logits: torch.Tensor, *, name: str = "student_logits",
                  has_teacher: bool = False) -> Shard:
    """Validate the shard layout with one small all-gather; ValueError naming the argument on every rank alike
    (they all see the same gathered table, so no rank is left waiting in a later collective)."""
    if not dist.is_available() or not dist.is_initialized():
        raise ValueError("vocab_parallel_group needs torch.distributed to be initialised (init_process_group)")
    try:
        world = dist.get_world_size(group)
        rank = dist.get_rank(group)
    except (RuntimeError, ValueError, TypeError) as exc:
        raise ValueError(f"vocab_parallel_group must be a torch.distributed process group: {exc}") from None
    if rank < 0:
        raise ValueError("vocab_parallel_group does not contain this rank")
    check_logits(name, logits)
    size = logits.shape[-1]
    if vocab_start is None:
        start = rank * size
    else:
        if isinstance(vocab_start, bool) or not isinstance(vocab_start, int) or vocab_start < 0:
            raise ValueError(f"vocab_start must be a non-negative int or None, got {vocab_start!r}")
        start = int(vocab_start)
    rows = logits.numel() // size
    mine = torch.tensor([start, size, rows, int(has_teacher)], dtype=torch.int64, device=logits.device)
    table = _gather_rows(mine[:, None], group, world)[:, :, 0].tolist()
    starts, sizes = [r[0] for r in table], [r[1] for r in table]
    if len({r[2] for r in table}) != 1:
        raise ValueError(f"{name}: every rank of vocab_parallel_group must score the same rows; got "
                         f"{[r[2] for r in table]} rows per rank")
    if len({r[3] for r in table}) != 1:
        raise ValueError("teacher_logits must be given on every rank of vocab_parallel_group or on none")
    order = sorted(range(world), key=lambda r: starts[r])
    edge = 0
    for r in order:
        if starts[r] != edge:
            raise ValueError(f"vocab_start: the shards (start, size) per rank {list(zip(starts, sizes))} do not tile a "
                             f"global vocabulary [0, V) (rank {r} starts at {starts[r]}, expected {edge})")
        edge += sizes[r]
    return Shard(group, rank, world, start, size, edge, starts, sizes)


# ----------------------------------------------------------------------------------- per-row partials
def local_labels(flat_labels: torch.Tensor, shard: Shard) -> torch.Tensor:
    """Global ids -> ids inside this shard; ``NOT_OWNED`` where another rank owns the label (or it is ignored)."""
    local = flat_labels - shard.start
    own = (local >= 0) & (local < shard.size)
    return torch.where(own, local, NOT_OWNED)


def _shard_stats(backend, x3, lab, temperature, want_entropy):
    """The backend's statistics pass on one shard: ``(lse, owner's local log-prob or 0, entropy | None)``."""
    logp, _, lse, ent = backend.forward(x3, None, lab, temperature, NOT_OWNED, want_entropy)
    return lse, logp, ent


def _combine(lse, logp_local, owned, ent=None):
    """Global ``(lse, logp, entropy | None)`` per row from the gathered ``[P, N]`` partials, same order on every
    rank. The log-prob is the owner's local one (exact at large |logits|) less ``log sum_r exp(lse_r - lse_own)``.
    """
    top = lse.amax(0)
    shift = torch.where(torch.isfinite(top), top, 0.0)  # rows of only -inf: shift by 0, never inf - inf
    e = torch.exp(lse - shift)
    total = e.sum(0)
    lse_g = shift + torch.log(total)
    has_owner = owned.any(0)
    lse_own = torch.where(owned, lse, 0.0).sum(0)
    lp_own = torch.where(owned, logp_local, 0.0).sum(0)
    finite_own = torch.isfinite(lse_own)
    rel = torch.where(finite_own, lse_own, 0.0)
    correction = torch.logsumexp(lse - rel, dim=0)
    logp = torch.where(has_owner, torch.where(finite_own, lp_own - correction, lp_own), 0.0)
    entropy = None
    if ent is not None:
        # H = lse_g - sum_v p_v x_v = log(total) + sum_r e_r (shift - lse_r + H_r) / total (no cancellation)
        part = torch.where(e > 0, e * (shift - lse + ent), 0.0).sum(0)
        entropy = torch.log(total) + part / total
    return lse_g, logp, entropy


class RowStats:
    """Global per-row statistics of one sharded call: ``lse`` (student), ``logp``, ``logp_t``, ``entropy``."""

    def __init__(self, student3, teacher3, flat_labels, shard: Shard, temperature, want_entropy):
        backend = dispatch.get_backend(student3.device)
        self.local = local_labels(flat_labels, shard)
        lse_s, lp_s, ent = _shard_stats(backend, student3, self.local, temperature, want_entropy)
        owned = (self.local != NOT_OWNED).to(torch.float32)
        fields = [lse_s, lp_s, owned] + ([ent] if want_entropy else [])
        if teacher3 is not None:
            lse_t, lp_t, _ = _shard_stats(backend, teacher3, self.local, temperature, False)
            fields += [lse_t, lp_t]
        table = _gather_rows(torch.stack(fields), shard.group, shard.world)  # the one collective of the pass
        own = table[:, 2] != 0
        self.lse, self.logp, self.entropy = _combine(table[:, 0], table[:, 1], own,
                                                     table[:, 3] if want_entropy else None)
        self.logp_t = None
        if teacher3 is not None:
            k = 4 if want_entropy else 3
            _, self.logp_t, _ = _combine(table[:, k], table[:, k + 1], own)


def shard_backward(coef, student, local, lse, logp, temperature, out=None):
    """``coef[r] * (onehot_own(r) - softmax_global(r)) / T`` on this shard (into ``out``, a fresh buffer, or
    ``student`` itself for the in-place backward).

    The backend's sweep forms every element from the global ``lse``; the target element of the rows this rank owns
    is then rewritten as ``coef * (1 - p_y) / T`` with ``1 - p_y = -expm1(logp)`` from the global log-prob: a backend
    may form ``1 - p_y`` from its row's own sum of probabilities (the C++ one does, to avoid cancellation near
    ``p_y = 1``), which on a shard is only this rank's part of the row.
    """
    backend = dispatch.get_backend(student.device)
    if dispatch.select_backend(student.device) == "cpp" and bool((lse.abs() > CPP_RECOMPUTED_LSE).any()):
        # the C++ sweep recomputes a row's (max, sum) from the row itself above this |lse| (csrc/rlsd_chunks.h,
        # kPreciseLse): on a shard that would replace the global lse by the local one
        with dispatch.force_backend("reference"):
            backend = dispatch.get_backend(student.device)
    s3 = as_rows3d(student)
    if out is None:
        out = torch.empty(student.shape, dtype=student.dtype, device=student.device)
    o3 = s3 if out is student else out.view(s3.shape)
    coef = coef.reshape(-1).to(torch.float32).contiguous()
    backend.backward(coef, s3, local, lse.contiguous(), temperature, o3)
    rows = torch.nonzero((local != NOT_OWNED) & (coef != 0) & (lse != float("-inf"))).squeeze(1)
    if rows.numel():
        target = coef[rows] * -torch.expm1(logp[rows]) / temperature
        T = o3.shape[1]
        o3[rows // T, rows % T, local[rows]] = target.to(o3.dtype)
    return out


# ------------------------------------------------------------------------------------------ token_logprobs
class _ShardedLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, labels, shard, temperature, ignore_index, want_entropy, inplace):
        ctx.forced = dispatch.forced_by_context()
        flat = labels.reshape(-1).to(torch.int64)
        stats = RowStats(as_rows3d(logits), None, flat, shard, temperature, want_entropy)
        ignored = flat == ignore_index
        logp = torch.where(ignored, 0.0, stats.logp).view(labels.shape)
        ctx.save_for_backward(logits, stats.local, stats.lse, stats.logp, ignored)
        ctx.temperature, ctx.inplace = temperature, inplace
        ent = stats.entropy.view(labels.shape) if want_entropy else logp.new_empty((0,))
        ctx.mark_non_differentiable(ent)
        return logp, ent

    @staticmethod
    def backward(ctx, grad_logp, _grad_ent):
        logits, local, lse, logp, ignored = ctx.saved_tensors
        if grad_logp is None:
            return (None,) * 7
        coef = torch.where(ignored, 0.0, grad_logp.reshape(-1))
        with dispatch.force_backend(ctx.forced):
            grad = shard_backward(coef, logits, local, lse, logp, ctx.temperature, logits if ctx.inplace else None)
        return (grad,) + (None,) * 6


def token_logprobs_sharded(logits, labels, temperature, return_entropy, ignore_index, inplace_backward, group,
                           vocab_start):
    """``token_logprobs`` on a vocabulary shard: same log-probs (and entropy) on every rank."""
    shard = resolve_shard(group, vocab_start, logits, name="logits")
    check_scoring(logits.new_zeros(()).expand(*logits.shape[:-1], shard.vocab), labels, temperature, ignore_index)
    logp, ent = _ShardedLogprobs.apply(logits, labels, shard, float(temperature), int(ignore_index),
                                       bool(return_entropy), bool(inplace_backward))
    return (logp, ent) if return_entropy else logp


# ------------------------------------------------------------------------------------------------ rlsd_loss
def _stand_in(x, vocab):
    """A zero-stride ``[..., V_global]`` view (no storage) so the unsharded checks see the global vocabulary."""
    return None if x is None else x.new_zeros(()).expand(*x.shape[:-1], vocab)


class _ShardedLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student, teacher, labels, advantages, old_logprobs, mask, teacher_logprobs, cu_seqlens,
                shard, h: Hyper, adv_per_seq, want_entropy, inplace):
        ctx.forced = dispatch.forced_by_context()
        n = labels.numel()
        flat = labels.reshape(n).to(torch.int64)
        stats = RowStats(as_rows3d(student), None if teacher is None else as_rows3d(teacher), flat, shard,
                         h.temperature, want_entropy)
        acc = torch.float64 if student.dtype == torch.float64 else torch.float32
        valid = flat != h.ignore_index
        if mask is not None:
            valid = valid & (mask.reshape(n) != 0)
        logp_s = torch.where(flat == h.ignore_index, 0.0, stats.logp)
        logp_t = None if stats.logp_t is None else torch.where(flat == h.ignore_index, 0.0, stats.logp_t)
        # section 2c terms slot in here: their per-row vocabulary sums join RowStats' gathered table and their
        # d loss / d logp_s (and per-row softmax factors) join ``coef`` below
        loss, coef, g, metrics = loss_math.loss_and_coef_of_batch(
            logp_s.to(acc), logp_t if teacher is not None else teacher_logprobs, labels.shape, advantages,
            adv_per_seq, old_logprobs, valid, cu_seqlens, h)
        ctx.save_for_backward(student, stats.local, stats.lse, stats.logp, coef.to(torch.float32))
        ctx.temperature, ctx.inplace = h.temperature, inplace
        shape = labels.shape
        empty = student.new_empty((0,), dtype=torch.float32)
        outs = (logp_s.view(shape), empty if logp_t is None else logp_t.view(shape), g.to(torch.float32).view(shape),
                stats.entropy.view(shape) if want_entropy else empty.clone(), metrics.to(torch.float32))
        ctx.mark_non_differentiable(*outs)
        return (loss.to(torch.float32),) + outs

    @staticmethod
    def backward(ctx, grad_loss, *_):
        student, local, lse, logp, coef = ctx.saved_tensors
        if grad_loss is None:
            return (None,) * 13
        with dispatch.force_backend(ctx.forced):
            grad = shard_backward(coef * grad_loss.to(torch.float32), student, local, lse, logp, ctx.temperature,
                                  student if ctx.inplace else None)
        return (grad,) + (None,) * 12


def rlsd_loss_sharded(h: Hyper, student_logits, teacher_logits, labels, advantages, old_logprobs, mask,
                      teacher_logprobs, cu_seqlens, return_entropy, inplace_backward, group,
                      vocab_start, terms=None, ref_logprobs=None, rollout_logprobs=None) -> RLSDOutput:
    """``rlsd_loss`` on a vocabulary shard (section 2d): every rank returns the unsharded op's loss, log-probs and
    metrics; the student shard's gradient is this rank's slice of the unsharded gradient. With section 2c terms on
    (``terms``, a ``loss_terms.Terms``), or ``ref_logprobs`` / ``rollout_logprobs`` given, ``vocab_parallel_terms``
    runs it."""
    if (terms is not None and terms.on) or ref_logprobs is not None or rollout_logprobs is not None:
        from .loss_terms import Terms
        from .vocab_parallel_terms import loss_terms_sharded

        return loss_terms_sharded(h, terms if terms is not None else Terms(), student_logits, teacher_logits, labels,
                                  advantages, old_logprobs, mask, teacher_logprobs, cu_seqlens, return_entropy,
                                  inplace_backward, ref_logprobs, rollout_logprobs, group, vocab_start)
    check_logits("student_logits", student_logits)
    if teacher_logits is not None:
        check_logits("teacher_logits", teacher_logits, shape=student_logits.shape, device=student_logits.device)
    shard = resolve_shard(group, vocab_start, student_logits, has_teacher=teacher_logits is not None)
    layout = check_loss_inputs(_stand_in(student_logits, shard.vocab), _stand_in(teacher_logits, shard.vocab),
                               labels, advantages, old_logprobs, mask, teacher_logprobs, cu_seqlens, h, values=True)
    loss, logp_s, logp_t, g, ent, metrics = _ShardedLoss.apply(
        student_logits, teacher_logits, labels, advantages.detach(),
        None if old_logprobs is None else old_logprobs.detach(), mask,
        None if teacher_logprobs is None else teacher_logprobs.detach(), cu_seqlens, shard, h,
        layout.adv_per_seq, bool(return_entropy), bool(inplace_backward))
    return RLSDOutput(loss=loss, logprobs=logp_s,
                      teacher_logprobs=logp_t if teacher_logits is not None else teacher_logprobs,
                      weights=g, entropy=ent if return_entropy else None, metric_values=metrics,
                      input_errors=None, vocab=shard.vocab, ignore_index=h.ignore_index)


def check_vocab_parallel(group, vocab_start, terms=None) -> Optional[object]:
    """``vocab_start`` without a group is a mistake (it would be silently ignored). ``terms`` (the call's
    ``loss_terms.Terms``) is accepted for the callers' sake: every section 2c term runs sharded."""
    if group is None and vocab_start is not None:
        raise ValueError("vocab_start needs vocab_parallel_group (the process group the vocabulary is sharded over)")
    return group


__all__ = ["Shard", "resolve_shard", "local_labels", "RowStats", "shard_backward", "token_logprobs_sharded",
           "rlsd_loss_sharded", "check_vocab_parallel", "NOT_OWNED"]
