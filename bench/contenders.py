"""The contenders: who is timed, and how each computes the same RLSD loss and student-logit gradient.

Every contender is a factory ``make(inputs, workload) -> Runner``; ``Runner.leaf`` is the tensor the gradient is
taken with respect to and ``Runner.loss()`` builds the differentiable scalar loss. ``availability(device)`` returns
``None`` when the contender can run on ``device``, else the reason it is skipped.

- ``rlsd[<backend>]``: :func:`rlsd_kernels.rlsd_loss` with the dispatcher forced to ``<backend>``. Which backends
  serve a device is the dispatcher's decision (``rlsd_kernels.dispatch.select_backend``): ``rlsd`` expands to its
  choice for the device (``triton`` on CUDA), plus on CPU every other backend it accepts there (``cpp``,
  ``reference``). Triton on CPU only runs in its interpreter and is never timed.
- ``grpo[<backend>]``: the same op without a teacher (plain GRPO; the teacher pass is skipped).
- ``eager``: :func:`rlsd_kernels.reference.rlsd_loss_eager`, what RL frameworks do today (full-vocabulary float32
  ``log_softmax`` of student and teacher, gather, weights, PPO loss, autograd).
- ``compile``: ``torch.compile`` of that same eager function (default mode, static shapes); ``compile[dynamic]``
  compiles once with dynamic shapes and reuses the graph for every shape of the process (the GPU check).
- ``liger`` (CUDA only): Liger-Kernel's Triton GRPO loss (``liger_kernel.transformers.grpo_loss.triton_grpo_loss``,
  per-token, ``loss_type="bnpo"`` where the version has it, ``beta=0``, ``inplace=False``) plus its fused selective
  log-softmax (``liger_kernel.ops.grpo_loss.fused_selective_log_softmax``) for the log-probs of the weight
  (:func:`liger_api` papers over the API differences of versions 0.6 to 0.8.x).
  Liger knows nothing of RLSD weights and takes per-*sequence* advantages, so the pair is made equivalent as
  follows (exact, see ``bench/README.md``): since ``g > 0`` and ``|A| > 0`` factor out of PPO's min/max,
  ``loss_t(A_hat) = |A_t| * g_t * loss_t(sign(A_t))``. With per-token advantages Liger gets ``advantages = sign``
  per sequence (the workload's advantage sign is per sequence) and the per-token factor ``|A_t| * g_t`` (detached)
  multiplies its per-token loss before the token mean, which also scales its backward's ``dlogp`` exactly; with
  per-sequence advantages (the GPU check) Liger gets them as they are and the factor is ``g_t``. ``g_t`` needs
  ``logp_T`` and ``logp_S``: Liger's GRPO loss does not return the student log-prob, so the pair runs the
  selective log-softmax on the teacher *and* on the student (one extra read of ``z_S`` compared with the fused op).
  At ``lam = 0`` (GRPO) ``g = 1`` and both extra passes are skipped. The dual clip (``clip_dual = 3``) is not in
  Liger; it never binds on this workload (ratio <= 1.65), so the losses are identical.
- ``liger_grpo``: Liger's GRPO kernel alone (the ``liger`` pair at ``lam = 0``), against ``grpo[...]``.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, List, Optional

import torch

from .workload import Inputs, Workload

BASE = ("eager", "compile", "compile[dynamic]", "liger", "liger_grpo")


@dataclass
class Runner:
    leaf: torch.Tensor  # differentiate w.r.t. this
    loss: Callable[[], torch.Tensor]
    grad_view: Callable[[torch.Tensor], torch.Tensor]  # leaf-shaped grad -> [B, T, V] grad of the student logits
    inplace: bool = False  # the backward overwrites the student logits with the gradient


def split(name: str):
    """``"rlsd[cpp]+inplace"`` -> ``("rlsd[cpp]", True)``."""
    return (name[: -len("+inplace")], True) if name.endswith("+inplace") else (name, False)


def _ours(name: str):
    """``"rlsd[cpp]"`` -> ``("rlsd", "cpp")``, ``"grpo[triton]"`` -> ``("grpo", "triton")``; else ``None``."""
    for kind in ("rlsd", "grpo"):
        if name.startswith(kind + "[") and name.endswith("]"):
            return kind, name[len(kind) + 1:-1]
    return None


def _hyper(w: Workload) -> dict:
    return dict(lam=w.lam)


# ------------------------------------------------------------------------------------------------ availability
def backend_unusable(be: str, device: torch.device) -> Optional[str]:
    """``None`` if the op's backend ``be`` can be timed on ``device``; else why not. Whether a backend serves a
    device is the dispatcher's decision (``select_backend(device, forced=be)`` raises when it cannot); the one
    rule of the benchmark's own is that Triton's CPU interpreter is never timed."""
    from rlsd_kernels.dispatch import BACKENDS, select_backend

    if be not in BACKENDS:
        return f"unknown backend {be!r} (one of {BACKENDS})"
    if be == "triton":
        if device.type == "cpu":
            return "Triton on CPU only runs in its interpreter (TRITON_INTERPRET=1); not timed"
        try:
            import triton  # noqa: F401
        except ImportError as e:
            return f"triton not importable: {e}"
    try:
        select_backend(device, forced=be)
    except ValueError as e:
        return str(e)
    except Exception as e:  # a broken C++ build must not take the suite down
        return f"backend {be!r} failed to load: {type(e).__name__}: {e}"
    return None


def backends_for(device: torch.device) -> List[str]:
    """The op's backends to time on ``device``: the dispatcher's own choice (``select_backend``) first; on CPU also
    every other backend the dispatcher accepts there (the CPU table compares the C++ kernel with the row-block
    eager backend). On an accelerator only the dispatcher's choice: the ``eager`` contender times eager math."""
    from rlsd_kernels.dispatch import BACKENDS, select_backend

    try:
        first = select_backend(device, interpreter_ok=False)
    except ValueError:  # RLSD_BACKEND forces a backend that cannot serve the device: availability() says why
        first = None
    out = [first] if first else []
    if device.type == "cpu":
        out += [b for b in BACKENDS if b not in out and backend_unusable(b, device) is None]
    return out or [b for b in BACKENDS if backend_unusable(b, device) is None][:1]


def availability(name: str, device: torch.device) -> Optional[str]:
    """``None`` if ``name`` can run on ``device``; otherwise why it is skipped."""
    name, inplace = split(name)
    ours = _ours(name)
    if inplace and not (ours or name == "liger"):
        return f"{name} has no in-place backward"
    if ours:
        return backend_unusable(ours[1], device)
    if name == "eager":
        return None
    if name in ("compile", "compile[dynamic]"):
        try:
            torch.compile  # noqa: B018
        except AttributeError:
            return "torch.compile not available"
        return None
    if name in ("liger", "liger_grpo"):
        if device.type != "cuda":
            return "Liger-Kernel is Triton/CUDA only (on CPU it would run in the Triton interpreter)"
        try:
            liger_api()
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
        if n in ("rlsd", "grpo"):
            out += [f"{n}[{b}]{sfx}" for b in backends_for(device)]
        elif n in ("triton", "cpp", "reference"):
            out.append(f"rlsd[{n}]{sfx}")
        else:
            out.append(n + sfx)
    if inplace:
        out = [v for n in out for v in ([n, n + "+inplace"] if (_ours(n) or n == "liger")
                                       and not n.endswith("+inplace") else [n])]
    seen = set()
    return [n for n in out if not (n in seen or seen.add(n))]


def layout(name: str) -> str:
    return "liger" if split(name)[0] in ("liger", "liger_grpo") else "plain"


# ------------------------------------------------------------------------------------------------ factories
def _make_rlsd(backend: str, inplace: bool, teacher: bool = True):
    def make(inp: Inputs, w: Workload) -> Runner:
        from rlsd_kernels import rlsd_loss
        from rlsd_kernels.dispatch import force_backend

        zs = inp.student.requires_grad_(True)
        zt = inp.teacher if teacher else None  # no teacher: plain GRPO, the teacher pass skipped
        hyp = _hyper(w)

        def loss():
            with force_backend(backend):
                return rlsd_loss(zs, zt, inp.labels, inp.advantages, inp.old_logprobs,
                                 inplace_backward=inplace, **hyp).loss

        return Runner(zs, loss, lambda g: g, inplace)

    return make


def _eager_fn(w: Workload):
    from rlsd_kernels import reference

    hyp = _hyper(w)

    def f(zs, zt, labels, adv, old):
        return reference.rlsd_loss_eager(zs, zt, labels, adv, old, **hyp).loss

    return f


def _make_eager(inp: Inputs, w: Workload) -> Runner:
    zs = inp.student.requires_grad_(True)
    f = _eager_fn(w)
    return Runner(zs, lambda: f(zs, inp.teacher, inp.labels, inp.advantages, inp.old_logprobs), lambda g: g)


_COMPILED = {}


def _make_compile(inp: Inputs, w: Workload, dynamic: bool = False) -> Runner:
    """Static shapes compile per process (the CPU design: one process per case). ``dynamic=True`` (the GPU check,
    one process for every shape) compiles once and is reused for every shape of the process."""
    zs = inp.student.requires_grad_(True)
    f = _COMPILED.get(w.lam) if dynamic else None
    if f is None:
        f = torch.compile(_eager_fn(w), dynamic=dynamic)
        if dynamic:
            _COMPILED[w.lam] = f
    return Runner(zs, lambda: f(zs, inp.teacher, inp.labels, inp.advantages, inp.old_logprobs), lambda g: g)


def liger_api():
    """``(grpo, selective_log_softmax)`` over the installed Liger-Kernel (0.6 to 0.8.x):
    ``grpo(logits[B, T+1, V], old_logp[B, T], ids[B, T], advantages[B], inplace) -> per-token loss [B, T]`` and
    ``selective_log_softmax(logits[B, T+1, V], ids[B, T]) -> logp [B, T]`` (no grad), both at temperature 1.
    0.6.0's ``triton_grpo_loss`` has neither ``loss_type`` nor ``reduce`` (it always returns per-token values);
    later versions need ``reduce=False`` for them, and ``loss_type="bnpo"`` keeps plain PPO per-token math."""
    import inspect

    from liger_kernel.ops.grpo_loss import fused_selective_log_softmax
    from liger_kernel.transformers.grpo_loss import triton_grpo_loss

    params = inspect.signature(triton_grpo_loss).parameters
    extra = {k: v for k, v in (("loss_type", "bnpo"), ("reduce", False)) if k in params}

    def grpo(logits, old, ids, adv, inplace):
        out = triton_grpo_loss(logits, old, None, ids, adv, None, temperature=1.0, beta=0.0, eps_low=0.2,
                               eps_high=0.28, inplace=inplace, **extra)
        return out[0] if isinstance(out, (tuple, list)) else out

    def selective(logits, ids):
        return fused_selective_log_softmax(logits, ids, 1.0)

    return grpo, selective


def _make_liger(inp: Inputs, w: Workload, inplace: bool = False) -> Runner:
    grpo, selective = liger_api()
    sbuf = inp.student_buf.requires_grad_(True)  # [B, T + 1, V]: Liger drops the last position itself
    tbuf = inp.teacher_buf
    labels = inp.labels.contiguous()
    old = inp.old_logprobs.contiguous()
    adv = inp.advantages
    if adv.dim() == 1:  # per sequence: Liger's own form
        seq_adv, abs_adv = adv.contiguous(), None
    else:  # per token: sign per sequence to Liger, |A_t| as a per-token factor
        seq_adv = torch.sign(adv[:, 0]).contiguous()
        if not bool((torch.sign(adv) == seq_adv[:, None]).all()):
            raise ValueError("liger takes per-sequence advantages: the workload's advantage sign must be per sequence")
        abs_adv = adv.abs()
    sign = torch.sign(seq_adv)[:, None]
    lam, eps_w = float(w.lam), 0.2
    n_tok = float(labels.numel())

    def loss():
        factor = abs_adv
        if lam != 0.0:
            with torch.no_grad():
                lt = selective(tbuf, labels)
                ls = selective(sbuf.detach(), labels)
                g = (1.0 - lam) + lam * torch.exp(sign * (lt - ls)).clamp(1.0 - eps_w, 1.0 + eps_w)
                factor = g if factor is None else factor * g
        per_tok = grpo(sbuf, old, labels, seq_adv, inplace)
        if factor is not None:
            per_tok = per_tok * factor
        return per_tok.sum() / n_tok

    T = inp.student.shape[1]
    return Runner(sbuf, loss, lambda g: g[:, :T], inplace)


def factory(name: str):
    name, inplace = split(name)
    ours = _ours(name)
    if ours:
        return _make_rlsd(ours[1], inplace, teacher=ours[0] == "rlsd")
    if name == "liger":
        return lambda inp, w: _make_liger(inp, w, inplace)
    if name == "liger_grpo":  # Liger's GRPO kernel alone: lam = 0 skips both selective log-softmax passes
        return lambda inp, w: _make_liger(inp, replace(w, lam=0.0), inplace)
    if name == "compile[dynamic]":
        return lambda inp, w: _make_compile(inp, w, dynamic=True)
    return {"eager": _make_eager, "compile": _make_compile}[name]
