"""Validation and normalisation of ``rlsd_loss`` inputs, shared by the reference and the fused op.

Everything here runs before any kernel, raises ``ValueError`` naming the offending argument, and turns the
user's tensors into flat per-token vectors (length ``N`` = number of label positions). Checks that need the
tensors' *values* (label range, ``cu_seqlens`` monotonicity) are skipped while ``torch.compile`` traces, because
they would force a graph break; the kernels never index memory with a label, so an out-of-range label there
cannot read out of bounds.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch

from .hyper import Hyper

LOGIT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


@dataclass
class Prepared:
    """Flat per-token view of one call (all vectors have length N = labels.numel())."""

    labels: torch.Tensor  # int64 [N]; ignore_index kept as is
    valid: torch.Tensor  # bool [N]: mask AND label != ignore_index
    advantages: torch.Tensor  # float32 (float64 for float64 logits) [N]
    old_logprobs: Optional[torch.Tensor]  # [N] or None (on-policy)
    teacher_logprobs: Optional[torch.Tensor]  # [N] or None
    seq_ids: Optional[torch.Tensor]  # int64 [N] sequence index of each token, or None
    num_seqs: int
    label_shape: torch.Size
    vocab: int


def _is_compiling() -> bool:
    return bool(torch.compiler.is_compiling())


def check_hyper(h: Hyper) -> Hyper:
    return h.validate()


def check_logits(name: str, x, *, vocab: Optional[int] = None, shape=None, device=None) -> None:
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in LOGIT_DTYPES:
        raise ValueError(f"{name} must be float32, bfloat16, float16 or float64, got {x.dtype}")
    if x.dim() < 1 or x.shape[-1] < 1:
        raise ValueError(f"{name} must have shape [..., V] with V >= 1, got {tuple(x.shape)}")
    if shape is not None and tuple(x.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(x.shape)}")
    if device is not None and x.device != device:
        raise ValueError(f"{name} is on {x.device} but student_logits is on {device}")


def check_labels(labels, lead_shape, vocab: int, ignore_index: int, device, *, values: bool = True) -> None:
    """Shape / dtype / device of ``labels``; with ``values`` also their range (one host sync: the CPU backends and
    the reference do it; the Triton backend checks the range on the device instead, see RLSDOutput)."""
    if not isinstance(labels, torch.Tensor):
        raise ValueError(f"labels must be a torch.Tensor, got {type(labels).__name__}")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise ValueError(f"labels must be an integer tensor, got {labels.dtype}")
    if tuple(labels.shape) != tuple(lead_shape):
        raise ValueError(f"labels must have shape {tuple(lead_shape)} (logits without the vocab dim), got {tuple(labels.shape)}")
    if labels.device != device:
        raise ValueError(f"labels is on {labels.device} but student_logits is on {device}")
    if values and not _is_compiling() and labels.numel():
        bad = ((labels < 0) | (labels >= vocab)) & (labels != ignore_index)
        if bool(bad.any()):
            first = labels[bad].flatten()[0].item()
            raise ValueError(f"labels holds {first}, outside [0, {vocab}) and not ignore_index={ignore_index}")


def check_scoring(logits, labels, temperature, ignore_index) -> None:
    """Validation of ``token_logprobs(logits, labels, temperature)`` (fused and reference alike)."""
    check_hyper(Hyper(temperature=temperature, ignore_index=ignore_index))
    check_logits("logits", logits)
    check_labels(labels, logits.shape[:-1], logits.shape[-1], ignore_index, logits.device)


def _check_token_tensor(name: str, x, lead_shape, device, *, floating=True) -> None:
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor or None, got {type(x).__name__}")
    if floating and not x.dtype.is_floating_point:
        raise ValueError(f"{name} must be a floating-point tensor, got {x.dtype}")
    if tuple(x.shape) != tuple(lead_shape):
        raise ValueError(f"{name} must have shape {tuple(lead_shape)} (the shape of labels), got {tuple(x.shape)}")
    if x.device != device:
        raise ValueError(f"{name} is on {x.device} but student_logits is on {device}")


def _check_cu_seqlens(cu_seqlens, lead_shape, n: int, device, values: bool) -> int:
    """Metadata (and, with ``values``, contents) of ``cu_seqlens``; returns the number of sequences."""
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise ValueError("cu_seqlens must be an int32 or int64 tensor")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(f"cu_seqlens must be 1-D with at least 2 entries, got shape {tuple(cu_seqlens.shape)}")
    if cu_seqlens.device != device:
        raise ValueError(f"cu_seqlens is on {cu_seqlens.device} but student_logits is on {device}")
    nonpacked = len(lead_shape) > 2 or (len(lead_shape) == 2 and lead_shape[0] != 1)
    if nonpacked:
        raise ValueError(f"cu_seqlens needs a packed layout [1, nnz] or [nnz], got labels of shape {tuple(lead_shape)}")
    if values and not _is_compiling():
        cu = cu_seqlens.tolist()
        if cu[0] != 0 or cu[-1] != n or any(b < a for a, b in zip(cu, cu[1:])):
            raise ValueError(f"cu_seqlens must start at 0, be non-decreasing and end at nnz={n}, got {cu}")
    return cu_seqlens.numel() - 1


def token_seq_ids(lead_shape, cu_seqlens, n: int, device):
    """Sequence index of each flat token: from cu_seqlens when given, else the last dim is the sequence."""
    if cu_seqlens is not None:
        pos = torch.arange(n, device=device)
        ids = torch.searchsorted(cu_seqlens[1:].to(torch.int64), pos, right=True)
        # within [0, num_seqs) whatever the contents (checked on the host, or flagged on the device: device_input_errors)
        return ids.clamp_(max=cu_seqlens.numel() - 2), cu_seqlens.numel() - 1
    if len(lead_shape) < 2:
        return None, 0
    T = lead_shape[-1]
    num = n // T if T else 0
    return torch.arange(n, device=device) // max(T, 1), num


@dataclass
class Layout:
    """What the fused op needs to know about the token layout, found from metadata alone (no tensor op)."""

    num_seqs: int  # sequences (0: no sequence structure, i.e. 1-D labels without cu_seqlens)
    seq_len: int  # tokens per sequence for a [..., T] layout (the last label dim); N for 1-D labels
    adv_per_seq: bool  # advantages hold one value per sequence


def check_loss_inputs(student_logits, teacher_logits, labels, advantages, old_logprobs, mask, teacher_logprobs,
                      cu_seqlens, h: Hyper, *, values: bool = True, hyper_checked: bool = False,
                      student_checked: bool = False) -> Layout:
    """Every check of ``rlsd_loss``'s inputs, ValueError naming the argument. Only metadata is read, except with
    ``values``: the label range and the contents of ``cu_seqlens`` (host syncs, skipped while compiling).
    ``hyper_checked`` / ``student_checked``: the caller already validated ``h`` / ``student_logits`` (the same
    ``Hyper`` object passed these checks in an earlier call; ``check_logits`` was just called)."""
    if not hyper_checked:
        h.validate()
    if not student_checked:
        check_logits("student_logits", student_logits)
    device = student_logits.device
    V = student_logits.shape[-1]
    lead = student_logits.shape[:-1]
    if teacher_logits is not None:
        check_logits("teacher_logits", teacher_logits, shape=student_logits.shape, device=device)
    if teacher_logits is not None and teacher_logprobs is not None:
        raise ValueError("pass teacher_logits or teacher_logprobs, not both")
    check_labels(labels, lead, V, h.ignore_index, device, values=values)
    n = labels.numel()
    if cu_seqlens is not None:
        num_seqs = _check_cu_seqlens(cu_seqlens, lead, n, device, values)
    elif len(lead) >= 2:
        num_seqs = n // lead[-1] if lead[-1] else 0
    else:
        num_seqs = 0
    if h.loss_agg_mode == "seq" and cu_seqlens is None and len(lead) < 2:
        raise ValueError("loss_agg_mode='seq' needs labels of shape [B, T] or cu_seqlens for a packed batch")
    if not isinstance(advantages, torch.Tensor):
        raise ValueError(f"advantages must be a torch.Tensor, got {type(advantages).__name__}")
    if not advantages.dtype.is_floating_point:
        raise ValueError(f"advantages must be a floating-point tensor, got {advantages.dtype}")
    if advantages.device != device:
        raise ValueError(f"advantages is on {advantages.device} but student_logits is on {device}")
    has_seqs = cu_seqlens is not None or len(lead) >= 2
    if tuple(advantages.shape) == tuple(lead):
        per_seq = False
    elif advantages.dim() == 1 and has_seqs and advantages.shape[0] == num_seqs:
        per_seq = True
    else:
        want = f"{tuple(lead)} (per token)" + (f" or ({num_seqs},) (per sequence)" if has_seqs else "")
        raise ValueError(f"advantages must have shape {want}, got {tuple(advantages.shape)}")
    if old_logprobs is not None:
        _check_token_tensor("old_logprobs", old_logprobs, lead, device)
    if teacher_logprobs is not None:
        _check_token_tensor("teacher_logprobs", teacher_logprobs, lead, device)
    if mask is not None:
        _check_token_tensor("mask", mask, lead, device, floating=False)
    seq_len = lead[-1] if len(lead) >= 1 and cu_seqlens is None else n
    return Layout(num_seqs, seq_len, per_seq)


def prepare(student_logits, teacher_logits, labels, advantages, old_logprobs, mask, teacher_logprobs,
            cu_seqlens, h: Hyper, *, values: bool = True) -> Prepared:
    """Validate (values included unless ``values=False``: the caller checked them, or the device does) and flatten
    the inputs for the eager paths (reference, fused linear, the section 2c terms of the fused op)."""
    layout = check_loss_inputs(student_logits, teacher_logits, labels, advantages, old_logprobs, mask,
                               teacher_logprobs, cu_seqlens, h, values=values)
    device = student_logits.device
    lead = student_logits.shape[:-1]
    n = labels.numel()
    acc = torch.float64 if student_logits.dtype == torch.float64 else torch.float32
    seq_ids, num_seqs = token_seq_ids(lead, cu_seqlens, n, device)
    adv = advantages[seq_ids] if layout.adv_per_seq else advantages.reshape(n)
    adv = adv.detach().to(acc)
    if old_logprobs is not None:
        old_logprobs = old_logprobs.detach().reshape(n).to(acc)
    if teacher_logprobs is not None:
        teacher_logprobs = teacher_logprobs.detach().reshape(n).to(acc)
    flat_labels = labels.reshape(n).to(torch.int64)
    valid = flat_labels != h.ignore_index
    if not values:  # labels out of range are left out of the loss (the caller reports them: device_input_errors)
        valid = valid & (flat_labels >= 0) & (flat_labels < student_logits.shape[-1])
    if mask is not None:
        valid = valid & (mask.reshape(n) != 0)
    return Prepared(flat_labels, valid, adv, old_logprobs, teacher_logprobs, seq_ids, num_seqs, labels.shape,
                    student_logits.shape[-1])


def device_input_errors(flat_labels, vocab: int, ignore_index: int, cu_seqlens) -> torch.Tensor:
    """The value checks of ``check_labels`` / ``_check_cu_seqlens`` as device tensors, without a host sync: int64
    ``[3]`` = (labels outside ``[0, vocab)`` and not ``ignore_index``, the first of them (0 if none), 1 if
    ``cu_seqlens`` is malformed), the ``RLSDOutput.input_errors`` of the Triton backend (read with the metrics)."""
    zero = torch.zeros((), dtype=torch.int64, device=flat_labels.device)
    bad = ((flat_labels < 0) | (flat_labels >= vocab)) & (flat_labels != ignore_index)
    n_bad = bad.sum()
    first = zero
    if flat_labels.numel():  # (gather, not [tensor] indexing: that would read the index on the host)
        first = torch.where(n_bad > 0, flat_labels.gather(0, torch.argmax(bad.to(torch.int8)).reshape(1))[0], 0)
    cu_bad = zero
    if cu_seqlens is not None:
        cu = cu_seqlens.to(torch.int64)
        cu_bad = ((cu[0] != 0) | (cu[-1] != flat_labels.numel()) | (cu[1:] < cu[:-1]).any()).to(torch.int64)
    return torch.stack([n_bad.to(torch.int64), first.to(torch.int64), cu_bad])


def check_terms_call(x, labels, cu_seqlens, device, teacher_logits, teacher_logprobs, ref_logprobs,
                     rollout_logprobs) -> None:
    """:func:`check_terms` for a logits call (``rlsd_loss`` unsharded or sharded)."""
    has_seqs = cu_seqlens is not None or labels.dim() >= 2
    check_terms(x, labels.shape, has_seqs, device, teacher_logits, teacher_logprobs, ref_logprobs, rollout_logprobs)


def check_terms(x, label_shape, has_seqs: bool, device, teacher_logits, teacher_logprobs, ref_logprobs,
                rollout_logprobs, teacher_name: str = "teacher_logits") -> None:
    """The section 2c checks that need the tensors (ValueError naming the argument); ``x`` is a validated
    ``loss_terms.Terms``, ``has_seqs`` whether the batch has sequence structure ([B, T] labels or cu_seqlens)."""
    lead = tuple(label_shape)
    for name, t in (("ref_logprobs", ref_logprobs), ("rollout_logprobs", rollout_logprobs)):
        if t is None:
            continue
        if not isinstance(t, torch.Tensor) or not t.dtype.is_floating_point:
            raise ValueError(f"{name} must be a floating-point torch.Tensor or None")
        if tuple(t.shape) != lead:
            raise ValueError(f"{name} must have shape {lead} (the shape of labels), got {tuple(t.shape)}")
        if t.device != device:
            raise ValueError(f"{name} is on {t.device} but student_logits is on {device}")
    if x.kl_coef > 0 and ref_logprobs is None:
        raise ValueError("kl_coef > 0 needs ref_logprobs (per-token reference log-probs, shape of labels)")
    if x.rollout_is is not None and rollout_logprobs is None:
        raise ValueError(f"rollout_is={x.rollout_is!r} needs rollout_logprobs (the sampler's per-token log-probs)")
    if x.gspo and not has_seqs:
        raise ValueError("loss_type='gspo' needs labels of shape [B, T] or cu_seqlens for a packed batch")
    if x.rollout_is == "sequence" and not has_seqs:
        raise ValueError("rollout_is='sequence' needs labels of shape [B, T] or cu_seqlens for a packed batch")
    if x.distill_coef > 0 and teacher_logits is None:
        got = "only teacher_logprobs was given" if teacher_logprobs is not None else "no teacher was given"
        raise ValueError(f"distill_coef > 0 needs {teacher_name} (the teacher's full distribution); {got}")


# ------------------------------------------------------------------ fused linear: hidden states + LM head
def _check_tensor(name, x):
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in LOGIT_DTYPES:
        raise ValueError(f"{name} must be float32, bfloat16, float16 or float64, got {x.dtype}")


def check_linear(hidden, weight, bias=None, teacher_hidden=None, *, hidden_name="student_hidden",
                 weight_name="lm_head_weight", bias_name="lm_head_bias") -> Tuple[int, int]:
    """Validate the hidden states / LM-head weight / bias trio; returns ``(H, V)``."""
    _check_tensor(hidden_name, hidden)
    _check_tensor(weight_name, weight)
    if hidden.dim() < 1 or hidden.shape[-1] < 1:
        raise ValueError(f"{hidden_name} must have shape [..., H] with H >= 1, got {tuple(hidden.shape)}")
    if weight.dim() != 2 or weight.shape[0] < 1:
        raise ValueError(f"{weight_name} must have shape [V, H] with V >= 1, got {tuple(weight.shape)}")
    H, V = hidden.shape[-1], weight.shape[0]
    if weight.shape[1] != H:
        raise ValueError(f"{weight_name} has H={weight.shape[1]} but {hidden_name} has H={H} "
                         f"(shapes {tuple(weight.shape)} and {tuple(hidden.shape)})")
    def same_dtype_device(name, x):
        if x.dtype != hidden.dtype:
            raise ValueError(f"{name} is {x.dtype} but {hidden_name} is {hidden.dtype}; cast one of them")
        if x.device != hidden.device:
            raise ValueError(f"{name} is on {x.device} but {hidden_name} is on {hidden.device}")

    same_dtype_device(weight_name, weight)
    if bias is not None:
        _check_tensor(bias_name, bias)
        if tuple(bias.shape) != (V,):
            raise ValueError(f"{bias_name} must have shape ({V},) (V of {weight_name}), got {tuple(bias.shape)}")
        same_dtype_device(bias_name, bias)
    if teacher_hidden is not None:
        _check_tensor("teacher_hidden", teacher_hidden)
        if tuple(teacher_hidden.shape) != tuple(hidden.shape):
            raise ValueError(f"teacher_hidden must have shape {tuple(hidden.shape)} (that of {hidden_name}), "
                             f"got {tuple(teacher_hidden.shape)}")
        same_dtype_device("teacher_hidden", teacher_hidden)
    return H, V


def logits_stand_in(hidden, V):
    """A zero-stride ``[..., V]`` view with no storage of its own, so ``prepare`` can validate everything else."""
    return hidden.new_zeros(()).expand(*hidden.shape[:-1], V)
