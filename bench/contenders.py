"""The contenders: who is timed, and how each computes the same RLSD loss and student-logit gradient.

Every contender is a factory ``make(inputs, workload) -> Runner``; ``Runner.leaf`` is the tensor the gradient is
taken with respect to and ``Runner.loss()`` builds the differentiable scalar loss. ``availability(device)`` returns
``None`` when the contender can run on ``device``, else the reason it is skipped.

- ``rlsd[<backend>]``: :func:`rlsd_kernels.rlsd_loss` with the dispatcher forced to ``<backend>`` (``triton`` on
  CUDA; ``cpp`` and ``reference`` on CPU; Triton on CPU only runs in its interpreter and is never timed).
- ``eager``: :func:`rlsd_kernels.reference.rlsd_loss`, what RL frameworks do today (full-vocabulary float32
  ``log_softmax`` of student and teacher, gather, weights, PPO loss, autograd).
- ``compile``: ``torch.compile`` of that same eager function (default mode, static shapes).
- ``liger`` (CUDA only): Liger-Kernel's Triton GRPO loss (``liger_kernel.transformers.grpo_loss.triton_grpo_loss``,
  per-token ``reduce=False``, ``loss_type="bnpo"``, ``beta=0``, ``inplace=False``) plus its fused selective
  log-softmax (``liger_kernel.ops.grpo_loss.fused_selective_log_softmax``) for the teacher log-probs.
  Liger knows nothing of RLSD weights and takes per-*sequence* advantages, so the pair is made equivalent as
  follows (exact, see ``bench/README.md``): since ``g > 0`` and ``|A| > 0`` factor out of PPO's min/max,
  ``loss_t(A_hat) = |A_t| * g_t * loss_t(sign(A_t))``. Liger gets ``advantages = sign`` per sequence (the workload's
  advantage sign is per sequence) and the per-token factor ``|A_t| * g_t`` (detached) multiplies its per-token loss
  before the token mean, which also scales its backward's ``dlogp`` exactly. ``g_t`` needs ``logp_T`` and
  ``logp_S``: Liger's GRPO loss does not return the student log-prob, so the pair runs the selective log-softmax on
  the teacher *and* on the student (one extra read of ``z_S`` compared with the fused op). At ``lam = 0`` (GRPO)
  ``g = 1`` and both extra passes are skipped. The dual clip (``clip_dual = 3``) is not in Liger; it never binds on
  this workload (ratio <= 1.65), so the losses are identical.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Optional

import torch

from .workload import Inputs, Workload

RLSD_BACKENDS = ("triton", "cpp", "reference")
BASE = ("eager", "compile", "liger")


@dataclass
class Runner:
    leaf: torch.Tensor  # differentiate w.r.t. this
    loss: Callable[[], torch.Tensor]
    grad_view: Callable[[torch.Tensor], torch.Tensor]  # leaf-shaped grad -> [B, T, V] grad of the student logits
    inplace: bool = False  # the backward overwrites the student logits with the gradient


def split(name: str):
    """``"rlsd[cpp]+inplace"`` -> ``("rlsd[cpp]", True)``."""
    return (name[: -len("+inplace")], True) if name.endswith("+inplace") else (name, False)


def _hyper(w: Workload) -> dict:
    return dict(lam=w.lam)


# ------------------------------------------------------------------------------------------------ availability
def availability(name: str, device: torch.device) -> Optional[str]:
    """``None`` if ``name`` can run on ``device``; otherwise why it is skipped."""
    name, inplace = split(name)
    if inplace and not (name.startswith("rlsd[") or name == "liger"):
        return f"{name} has no in-place backward"
    if name.startswith("rlsd[") and name.endswith("]"):
        be = name[5:-1]
        if be not in RLSD_BACKENDS:
            return f"unknown backend {be!r} (one of {RLSD_BACKENDS})"
        if be == "triton":
            if device.type != "cuda":
                return "Triton on CPU only runs in its interpreter (TRITON_INTERPRET=1); not timed"
            try:
                import triton  # noqa: F401
            except ImportError as e:
                return f"triton not importable: {e}"
        if be == "cpp":
            if device.type != "cpu":
                return "the C++ backend is CPU only"
            try:
                from rlsd_kernels.backends import cpp

                if not cpp.available():
                    return "C++ backend not available (rlsd_kernels.backends.cpp.available() is False)"
            except Exception as e:  # a broken build must not take the suite down
                return f"C++ backend failed to load: {type(e).__name__}: {e}"
        return None
    if name == "eager":
        return None
    if name == "compile":
        try:
            torch.compile  # noqa: B018
        except AttributeError:
            return "torch.compile not available"
        return None
    if name == "liger":
        if device.type != "cuda":
            return "Liger-Kernel is Triton/CUDA only (on CPU it would run in the Triton interpreter)"
        try:
            from liger_kernel.ops.grpo_loss import fused_selective_log_softmax  # noqa: F401
            from liger_kernel.transformers.grpo_loss import triton_grpo_loss  # noqa: F401
        except Exception as e:
            return f"liger_kernel not importable ({type(e).__name__}: {e}); pip install liger-kernel"
        return None
    return f"unknown contender {name!r}"


def expand(names: List[str], device: torch.device, inplace: bool = False) -> List[str]:
    """``rlsd`` means every backend of the op that can serve ``device``; a ``+inplace`` suffix selects the in-place
    backward (``inplace_backward=True`` / Liger's ``inplace=True``); ``inplace=True`` adds that variant after every
    contender that has one."""
    out: List[str] = []
    for n in names:
        n, ip = split(n.strip())
        sfx = "+inplace" if ip else ""
        if not n:
            continue
        if n == "rlsd":
            bes = ["triton"] if device.type == "cuda" else ["cpp", "reference"]
            out += [f"rlsd[{b}]{sfx}" for b in bes]
        elif n in RLSD_BACKENDS:
            out.append(f"rlsd[{n}]{sfx}")
        else:
            out.append(n + sfx)
    if inplace:
        out = [v for n in out for v in ([n, n + "+inplace"] if (n.startswith("rlsd[") or n == "liger")
                                       and not n.endswith("+inplace") else [n])]
    seen = set()
    return [n for n in out if not (n in seen or seen.add(n))]


def layout(name: str) -> str:
    return "liger" if split(name)[0] == "liger" else "plain"


# ------------------------------------------------------------------------------------------------ factories
def _make_rlsd(backend: str, inplace: bool):
    def make(inp: Inputs, w: Workload) -> Runner:
        from rlsd_kernels import rlsd_loss
        from rlsd_kernels.dispatch import force_backend

        zs = inp.student.requires_grad_(True)
        hyp = _hyper(w)

        def loss():
            with force_backend(backend):
                return rlsd_loss(zs, inp.teacher, inp.labels, inp.advantages, inp.old_logprobs,
                                 inplace_backward=inplace, **hyp).loss

        return Runner(zs, loss, lambda g: g, inplace)

    return make


def _eager_fn(w: Workload):
    from rlsd_kernels import reference

    hyp = _hyper(w)

    def f(zs, zt, labels, adv, old):
        return reference.rlsd_loss(zs, zt, labels, adv, old, **hyp).loss

    return f


def _make_eager(inp: Inputs, w: Workload) -> Runner:
    zs = inp.student.requires_grad_(True)
    f = _eager_fn(w)
    return Runner(zs, lambda: f(zs, inp.teacher, inp.labels, inp.advantages, inp.old_logprobs), lambda g: g)


def _make_compile(inp: Inputs, w: Workload) -> Runner:
    zs = inp.student.requires_grad_(True)
    f = torch.compile(_eager_fn(w), dynamic=False)
    return Runner(zs, lambda: f(zs, inp.teacher, inp.labels, inp.advantages, inp.old_logprobs), lambda g: g)


def _make_liger(inp: Inputs, w: Workload, inplace: bool = False) -> Runner:
    from liger_kernel.ops.grpo_loss import fused_selective_log_softmax
    from liger_kernel.transformers.grpo_loss import triton_grpo_loss

    sbuf = inp.student_buf.requires_grad_(True)  # [B, T + 1, V]: Liger drops the last position itself
    tbuf = inp.teacher_buf
    labels = inp.labels.contiguous()
    old = inp.old_logprobs.contiguous()
    adv = inp.advantages
    seq_sign = torch.sign(adv[:, 0]).contiguous()
    if not bool((torch.sign(adv) == seq_sign[:, None]).all()):
        raise ValueError("liger takes per-sequence advantages: the workload's advantage sign must be per sequence")
    abs_adv = adv.abs()
    lam, eps_w = float(w.lam), 0.2
    n_tok = float(labels.numel())

    def loss():
        if lam != 0.0:
            with torch.no_grad():
                lt = fused_selective_log_softmax(tbuf, labels, 1.0)
                ls = fused_selective_log_softmax(sbuf.detach(), labels, 1.0)
                wgt = torch.exp(seq_sign[:, None] * (lt - ls)).clamp(1.0 - eps_w, 1.0 + eps_w)
                factor = abs_adv * ((1.0 - lam) + lam * wgt)
        else:
            factor = abs_adv
        per_tok, _, _ = triton_grpo_loss(sbuf, old, None, labels, seq_sign, None, temperature=1.0, beta=0.0,
                                         eps_low=0.2, eps_high=0.28, inplace=inplace, loss_type="bnpo",
                                         reduce=False)
        return (per_tok * factor).sum() / n_tok

    T = inp.student.shape[1]
    return Runner(sbuf, loss, lambda g: g[:, :T], inplace)


def factory(name: str):
    name, inplace = split(name)
    if name.startswith("rlsd["):
        return _make_rlsd(name[5:-1], inplace)
    if name == "liger":
        return lambda inp, w: _make_liger(inp, w, inplace)
    return {"eager": _make_eager, "compile": _make_compile}[name]
