"""Shared test utilities: input generators and the SPEC section 7 accuracy check."""
from __future__ import annotations

import torch

import rlsd_kernels
from rlsd_kernels import reference

F32_RTOL, F32_ATOL = 1e-5, 1e-6  # SPEC section 7, float32 inputs
LOW_PREC_SLACK = 1e-3  # SPEC section 7, bf16/fp16: eager-in-dtype error + 1e-3


def make_inputs(B=2, T=5, V=37, dtype=torch.float32, seed=0, scale=3.0, device="cpu", teacher=True,
                strided=False, old=True, per_seq_adv=False, ignore_frac=0.2, mask_frac=0.2):
    """Random RLSD inputs. ``strided`` gives ``logits[:, :-1]`` views (the causal-LM shift), as trainers pass."""
    g = torch.Generator().manual_seed(seed)
    Tt = T + 1 if strided else T
    s = torch.randn(B, Tt, V, generator=g) * scale
    t = s + torch.randn(B, Tt, V, generator=g) * (scale / 2)  # a teacher close to the student, as in RLSD
    if strided:
        s, t = s[:, :-1], t[:, :-1]
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[torch.rand(B, T, generator=g) < ignore_frac] = -100
    adv = torch.randn(B, generator=g) if per_seq_adv else torch.randn(B, T, generator=g)
    mask = torch.rand(B, T, generator=g) >= mask_frac
    old_lp = None
    if old:
        with torch.no_grad():
            lp = reference.token_logprobs(s.double(), labels.clamp(min=0))
        old_lp = (lp + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64)).float()
    to = lambda x: x.to(device=device, dtype=dtype)  # noqa: E731
    return dict(
        student_logits=to(s) if not strided else _strided_like(s, dtype, device),
        teacher_logits=(to(t) if not strided else _strided_like(t, dtype, device)) if teacher else None,
        labels=labels.to(device), advantages=adv.to(device), old_logprobs=None if old_lp is None else old_lp.to(device),
        mask=mask.to(device),
    )


def _strided_like(view, dtype, device):
    """Rebuild a ``[:, :-1]`` view in the target dtype/device, keeping it a non-contiguous view."""
    B, T, V = view.shape
    full = torch.zeros(B, T + 1, V, dtype=dtype, device=device)
    full[:, :-1] = view.to(dtype)
    out = full[:, :-1]
    assert not out.is_contiguous()
    return out


def run_loss(fn, inputs, grad=True, **kw):
    """Evaluate ``fn`` (fused or reference) on ``inputs``; returns (output, grad of student logits)."""
    s = inputs["student_logits"].detach().clone() if not kw.get("inplace_backward") else inputs["student_logits"]
    if not s.is_contiguous() and not kw.get("inplace_backward"):
        s = _strided_like(inputs["student_logits"], s.dtype, s.device)
    s.requires_grad_(grad)
    args = dict(inputs, student_logits=s)
    out = fn(**args, **kw)
    g = torch.autograd.grad(out.loss, s)[0] if grad and out.loss.requires_grad else None
    return out, g


def as64(inputs):
    return {k: (v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v) for k, v in inputs.items()}


def max_err(a, b):
    if a is None and b is None:
        return 0.0
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def assert_matches_reference(inputs, grad=True, **kw):
    """Fused op vs float64 reference with SPEC section 7 tolerances; returns the fused output."""
    dtype = inputs["student_logits"].dtype
    out, g = run_loss(rlsd_kernels.rlsd_loss, inputs, grad=grad, **kw)
    kw_ref = {k: v for k, v in kw.items() if k != "inplace_backward"}
    ref, g_ref = run_loss(reference.rlsd_loss, as64(inputs), grad=grad, **kw_ref)
    pairs = [("loss", out.loss, ref.loss), ("logprobs", out.logprobs, ref.logprobs),
             ("weights", out.weights, ref.weights)]
    if ref.teacher_logprobs is not None:
        pairs.append(("teacher_logprobs", out.teacher_logprobs, ref.teacher_logprobs))
    if ref.entropy is not None:
        pairs.append(("entropy", out.entropy, ref.entropy))
    if grad:
        pairs.append(("grad", g, g_ref))
    if dtype == torch.float32:
        for name, a, b in pairs:
            assert a.dtype == (torch.float32 if name != "grad" else dtype)
            torch.testing.assert_close(a.double(), b.double(), rtol=F32_RTOL, atol=F32_ATOL, msg=lambda m: f"{name}: {m}")
    else:
        eager, g_eager = run_loss(reference.rlsd_loss, inputs, grad=grad, compute_dtype=dtype, **kw_ref)
        epairs = {"loss": eager.loss, "logprobs": eager.logprobs, "weights": eager.weights,
                  "teacher_logprobs": eager.teacher_logprobs, "entropy": eager.entropy, "grad": g_eager}
        for name, a, b in pairs:
            err, budget = max_err(a, b), max_err(epairs[name], b) + LOW_PREC_SLACK
            assert err <= budget, f"{name}: fused error {err:.3g} > eager-in-{dtype} error + 1e-3 = {budget:.3g}"
        if grad:
            assert g.dtype == dtype
    if dtype == torch.float32:
        for k, v in ref.metrics.items():
            assert out.metrics[k] == v or abs(out.metrics[k] - v) <= 1e-4 + 1e-3 * abs(v), (k, out.metrics[k], v)
    return out
