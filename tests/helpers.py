"""Shared test utilities: the backends a test runs on (each with its device), input generators and the
accuracy check of docs/math.md section 7."""
from __future__ import annotations

import contextlib
import importlib.util
import os
import sys

import torch
from torch.overrides import TorchFunctionMode

import rlsd_kernels
from rlsd_kernels import dispatch, reference

F32_RTOL, F32_ATOL = 1e-5, 1e-6  # docs/math.md section 7, float32 inputs
LOW_PREC_SLACK = 1e-3  # docs/math.md section 7, bf16/fp16: eager-in-dtype error + 1e-3


# ------------------------------------------------------------------------------------- backends and devices
class Backend(str):
    """A backend name (it compares equal to the name) with the device whose tensors it serves in this run.

    Tests build their tensors on ``backend.device``: Triton gets CUDA tensors on a GPU machine and CPU tensors only
    under ``TRITON_INTERPRET=1``; the C++ and reference backends get CPU tensors on every machine.
    """

    device: torch.device

    def __new__(cls, name: str, device):
        self = super().__new__(cls, name)
        self.device = torch.device(device)
        return self

    @property
    def linear(self) -> str:
        """The logits backend the fused linear op runs its chunks on when this backend is forced: itself (the
        linear routes of :func:`linear_params` never pair Triton with the interpreter)."""
        return str(self)

    def __repr__(self) -> str:
        return f"Backend({str(self)!r}, {self.device})"


def backend_params(*, cuda: bool, interpret: bool, triton: bool, cpp: bool):
    """The (backend, device) pairs a machine runs: triton on CUDA (else on CPU through the interpreter), the C++
    and reference backends on CPU everywhere."""
    cpu = torch.device("cpu")
    out = [Backend("reference", cpu)]
    if triton and (cuda or interpret):
        out.append(Backend("triton", "cuda" if cuda else cpu))
    if cpp:
        out.append(Backend("cpp", cpu))
    return out


def machine_backends():
    """:func:`backend_params` of this machine, read at call time (tests monkeypatch what it reads)."""
    from rlsd_kernels.backends.logits import cpp

    return backend_params(cuda=torch.cuda.is_available(), interpret=dispatch.interpreter_on(),
                          triton=importlib.util.find_spec("triton") is not None, cpp=cpp.available())


def linear_params(backends):
    """Routes of the fused linear op: its chunks over the C++ (else reference) backend on CPU, and over Triton on
    CUDA (on CPU the chunks never run in the Triton interpreter: ``dispatch.chunk_backend``)."""
    host = next((b for b in backends if b == "cpp"), None) or next(b for b in backends if b == "reference")
    return [host] + [b for b in backends if b == "triton" and b.device.type == "cuda"]


class DeviceTrapError(AssertionError):
    pass


def _package_dir(name):
    spec = importlib.util.find_spec(name)
    return None if spec is None else os.path.dirname(spec.origin) + os.sep


_TORCH_DIR = _package_dir("torch")
_EXEMPT_DIRS = tuple(d for d in (_TORCH_DIR, _package_dir("triton")) if d)
_FACTORIES = frozenset(getattr(torch, n) for n in (
    "randn", "rand", "randint", "randperm", "zeros", "ones", "full", "empty", "empty_strided", "tensor",
    "as_tensor", "arange", "linspace", "logspace", "eye", "scalar_tensor"))
_armed = []  # the backends whose DeviceTrap is active, innermost last


class DeviceTrap(TorchFunctionMode):
    """While Triton is forced, a tensor created without naming its device is an error, on every machine.

    On a GPU machine such a tensor lands on the CPU while Triton serves CUDA tensors (the mistake that failed 67
    tests on an H200); on a CPU machine the interpreter serves CPU tensors, so nothing else would notice. Creations
    by torch and triton themselves are exempt; any other code (tests, helpers, the package, transformers building a
    model) must pass ``device=`` or run under ``with torch.device(...)``.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if (func in _FACTORIES and kwargs.get("device") is None
                and not (func is torch.as_tensor and args and isinstance(args[0], torch.Tensor))):
            site = _call_site()
            if site is not None:
                raise DeviceTrapError(
                    f"{site}: torch.{func.__name__}(...) without device= while Triton is forced: on a GPU machine "
                    "that tensor is on the CPU and Triton serves CUDA tensors. Pass device=backend.device (or "
                    "device='cpu' for host data moved later).")
        return func(*args, **kwargs)


def _call_site():
    """``file:line`` of the code that asked for the tensor, or None when that is torch or triton itself."""
    f = sys._getframe(2)  # the caller of the torch function (0: this function, 1: __torch_function__)
    while f is not None and f.f_code.co_filename.startswith(_TORCH_DIR):
        f = f.f_back  # torch's own frames (nn.Linear building its weight): blame whoever called them
    if f is None or f.f_code.co_filename.startswith(_EXEMPT_DIRS):
        return None
    name = f.f_code.co_filename
    return f"{os.path.relpath(name) if name.startswith(os.getcwd() + os.sep) else name}:{f.f_lineno}"


@contextlib.contextmanager
def running_on(backend):
    """Force the dispatcher to ``backend``; for Triton also arm the :class:`DeviceTrap` (on every machine)."""
    with contextlib.ExitStack() as stack:
        stack.enter_context(dispatch.force_backend(str(backend)))
        if backend == "triton":
            _armed.append(backend)
            stack.callback(_armed.pop)
            stack.enter_context(DeviceTrap())
        yield backend


def _device(device, what):
    """``device``, else the CPU; but naming the device is required while Triton is forced."""
    if device is None and _armed:
        raise DeviceTrapError(f"{what} without device= while Triton is forced: pass device=backend.device")
    return torch.device("cpu" if device is None else device)


def randn(*shape, generator, device=None, dtype=torch.float32, scale=1.0):
    """``scale * randn`` drawn from a CPU ``generator`` (the same numbers on every machine), placed on ``device``."""
    device = _device(device, "helpers.randn")
    draw = torch.float64 if dtype == torch.float64 else torch.float32
    return (torch.randn(*shape, generator=generator, device="cpu", dtype=draw) * scale).to(device, dtype)


def make_inputs(B=2, T=5, V=37, dtype=torch.float32, seed=0, scale=3.0, device=None, teacher=True,
                strided=False, old=True, per_seq_adv=False, ignore_frac=0.2, mask_frac=0.2):
    """Random RLSD inputs on ``device`` (drawn on the CPU, so the same on every machine; ``device`` must be given
    in a test forcing Triton). ``strided`` gives ``logits[:, :-1]`` views (the causal-LM shift), as trainers pass."""
    device = _device(device, "make_inputs")
    cpu = torch.device("cpu")
    g = torch.Generator().manual_seed(seed)
    Tt = T + 1 if strided else T
    s = torch.randn(B, Tt, V, generator=g, device=cpu) * scale
    t = s + torch.randn(B, Tt, V, generator=g, device=cpu) * (scale / 2)  # a teacher close to the student, as in RLSD
    if strided:
        s, t = s[:, :-1], t[:, :-1]
    labels = torch.randint(0, V, (B, T), generator=g, device=cpu)
    labels[torch.rand(B, T, generator=g, device=cpu) < ignore_frac] = -100
    adv = torch.randn(B, generator=g, device=cpu) if per_seq_adv else torch.randn(B, T, generator=g, device=cpu)
    mask = torch.rand(B, T, generator=g, device=cpu) >= mask_frac
    old_lp = None
    if old:
        with torch.no_grad():
            lp = reference.token_logprobs_eager(s.double(), labels.clamp(min=0))
        old_lp = (lp + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64, device=cpu)).float()
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
    """Fused op vs float64 reference with the tolerances of docs/math.md section 7; returns the fused output."""
    dtype = inputs["student_logits"].dtype
    out, g = run_loss(rlsd_kernels.rlsd_loss, inputs, grad=grad, **kw)
    kw_ref = {k: v for k, v in kw.items() if k != "inplace_backward"}
    ref, g_ref = run_loss(reference.rlsd_loss_eager, as64(inputs), grad=grad, **kw_ref)
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
        eager, g_eager = run_loss(reference.rlsd_loss_eager, inputs, grad=grad, compute_dtype=dtype, **kw_ref)
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
