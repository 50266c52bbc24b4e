"""The Triton backend's fused rows (``ops/fused_rows.py``, ``backends/logits/triton_rows.py``): the loss with its
token-local section 2c terms (KL to a reference, rollout IS with ``old_logprobs``, the entropy bonus, every
distillation divergence) and its whole gradient in one launch of the fused loss kernel, the terms' factors in the
kernel's epilogue.

Under the interpreter on CPU tensors here, on CUDA on a GPU machine. The vocabulary is walked in chunks of 128
columns (three chunks, the last one partial) over rows that stress the walk (the max in the last chunk, a first
chunk of only -inf, +-1e4 logits, -inf entries); every configuration is checked against the float64 reference
(docs/math.md section 7, float32 tolerance) and against the composed path it replaces (scoring kernel, the Python
algebra under autograd, gradient kernel)."""
import pytest
import torch

import rlsd_kernels
from rlsd_kernels import dispatch, reference
from rlsd_kernels.backends import triton_launch
from rlsd_kernels.backends.logits import triton as triton_backend

from conftest import BACKENDS
from helpers import running_on

TRITON = next((b for b in BACKENDS if b == "triton"), None)
pytestmark = pytest.mark.skipif(TRITON is None, reason="no Triton backend on this machine (no GPU, no interpreter)")

TOL = dict(rtol=1e-5, atol=1e-6)  # docs/math.md section 7, float32 inputs
B, T, V = 2, 4, 300
BLOCK = dict(loss_block_v=128)  # three chunks per row, the last one partial
HP = dict(lam=0.5, eps_w=0.2, clip_low=0.2, clip_high=0.28, clip_dual=3.0)
CASES = {
    "ppo_k3": dict(kl_coef=0.3),
    "cispo_k1": dict(loss_type="cispo", kl_coef=0.3, kl_type="k1"),
    "grpo_k2": dict(lam=0.0, _teacher=None, kl_coef=0.3, kl_type="k2"),
    "teacher_logprobs_entropy": dict(_teacher="logprobs", entropy_coef=0.05),
    "on_policy_entropy": dict(_old=None, entropy_coef=0.05),
    "is_token_truncate": dict(rollout_is="token", rollout_is_threshold=1.5),
    "is_seq_mask": dict(rollout_is="sequence", rollout_is_threshold=1.5, rollout_is_mode="mask"),
    "entropy_seq_agg": dict(entropy_coef=0.05, loss_agg_mode="seq"),
    "forward_kl": dict(distill_coef=0.7),
    "reverse_kl": dict(distill_coef=0.7, distill_divergence="reverse_kl"),
    "forward_kl_clip": dict(distill_coef=0.7, distill_clip=0.5),
    "jsd": dict(distill_coef=0.7, distill_divergence="jsd", distill_beta=0.3),
    "jsd_clip": dict(distill_coef=0.7, distill_divergence="jsd", distill_clip=0.2),
    "all": dict(kl_coef=0.2, kl_type="k3", rollout_is="token", rollout_is_threshold=1.5, entropy_coef=0.05,
                distill_coef=0.5, distill_divergence="reverse_kl", loss_type="cispo"),
}


def _inputs(seed=0, big=1e4):
    """float32 [B, T, V] logits with stress rows (row 3: +-``big``), and per-token inputs near the student's own
    log-probs (float64, on the CPU, for the reference)."""
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(B * T, V, generator=g) * 3
    t = s + torch.randn(B * T, V, generator=g)
    s[1] = torch.linspace(-30.0, 20.0, V)  # the max in the last chunk
    t[1] = torch.linspace(-20.0, 25.0, V) + torch.randn(V, generator=g)
    s[2, :128] = t[2, :128] = float("-inf")  # a first chunk of only -inf
    s[3] = torch.where(torch.arange(V) % 2 == 0, big, -big)
    t[3] = s[3] + torch.randn(V, generator=g)
    s[4, ::7] = t[4, ::7] = float("-inf")
    s[5] *= 10
    s, t = s.view(B, T, V), t.view(B, T, V)
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[0, 2] = 200  # row 2: past its -inf chunk
    labels[0, 3] = 2  # row 3: a +1e4 target (at a -1e4 one, logp = -2e4 is rounded by 1e-3 in any float32 output)
    labels[1, 0] = 1  # row 4: off the -inf entries (index % 7 == 0)
    labels[1, 1] = -100
    lp = reference.token_logprobs_eager(s.double(), labels.clamp(min=0))
    noise = lambda k: k * torch.randn(B, T, generator=g, dtype=torch.float64)  # noqa: E731
    old = (lp + noise(0.3)).float()
    inp = dict(student_logits=s, teacher_logits=t, labels=labels, advantages=torch.randn(B, T, generator=g),
               old_logprobs=old, mask=torch.rand(B, T, generator=g) > 0.15)
    extra = dict(ref_logprobs=(lp + noise(1.0)).float(), rollout_logprobs=(old.double() + noise(0.6)).float(),
                 teacher_logprobs=reference.token_logprobs_eager(t.double(), labels.clamp(min=0)).float())
    return inp, extra


def _call(inp, extra, case, fn=rlsd_kernels.rlsd_loss, device=None, dtype=None, **more):
    kw = dict(HP, **CASES[case], **more)
    args = dict(inp)
    teacher = kw.pop("_teacher", "logits")
    if teacher != "logits":
        args["teacher_logits"] = None
        if teacher == "logprobs":
            args["teacher_logprobs"] = extra["teacher_logprobs"]
    if "_old" in kw:
        kw.pop("_old")
        args["old_logprobs"] = None
    if "kl_coef" in kw:
        kw["ref_logprobs"] = extra["ref_logprobs"]
    if "rollout_is" in kw:
        kw["rollout_logprobs"] = extra["rollout_logprobs"]
    args.update(kw)
    args = {k: (v.to(device) if device is not None and isinstance(v, torch.Tensor) else v) for k, v in args.items()}
    if dtype is not None:
        args = {k: (v.to(dtype) if k.endswith("_logits") and v is not None else v) for k, v in args.items()}
    s = args.pop("student_logits").detach().clone().requires_grad_()
    out = fn(student_logits=s, **args)
    (grad,) = torch.autograd.grad(out.loss, s)
    return out, grad


@pytest.fixture
def calls(monkeypatch):
    """How many times the Triton fused rows ran."""
    n = [0]
    real = triton_backend.fused_rows

    def counting(*a, **k):
        n[0] += 1
        return real(*a, **k)

    monkeypatch.setattr(triton_backend, "fused_rows", counting)
    return n


def _triton(**launch):
    return running_on(TRITON), triton_launch.override(**dict(BLOCK, **launch))


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("case", list(CASES))
def test_fused_rows_match_the_reference(case, temperature, calls):
    # A divergence at temperature 0.7 over +-1e4 logits: every z / T is rounded by up to 5e-4 before the teacher -
    # student differences are formed, a 1e-4 relative error of D_t that the composed path has too (the test below
    # holds the two equal), so the stress row is +-1e3 there.
    inp, extra = _inputs(big=1e3 if temperature != 1.0 and "distill_coef" in CASES[case] else 1e4)
    run, launch = _triton()
    with run, launch:
        out, grad = _call(inp, extra, case, device=TRITON.device, temperature=temperature, return_entropy=True)
    assert calls[0] == 1
    ref, ref_grad = _call(inp, extra, case, fn=reference.rlsd_loss_eager, dtype=torch.float64,
                          temperature=temperature, return_entropy=True)
    torch.testing.assert_close(out.loss.double().cpu(), ref.loss, **TOL)
    torch.testing.assert_close(out.logprobs.double().cpu(), ref.logprobs.double(), **TOL)
    torch.testing.assert_close(out.entropy.double().cpu(), ref.entropy.double(), **TOL)
    torch.testing.assert_close(grad.double().cpu(), ref_grad, **TOL)


@pytest.mark.parametrize("case", ["ppo_k3", "on_policy_entropy", "all"])
def test_row_in_registers_variant(case, calls):
    """Rows short enough to be loaded once and kept in registers (``loss_row_in_regs_max``): the same results (a
    divergence takes the chunked sweep, which keeps its cross sums)."""
    inp, extra = _inputs(seed=2)
    run, launch = _triton(loss_row_in_regs_max=512, loss_row_warps=4)
    with run, launch:
        out, grad = _call(inp, extra, case, device=TRITON.device, return_entropy=True)
    assert calls[0] == 1
    ref, ref_grad = _call(inp, extra, case, fn=reference.rlsd_loss_eager, dtype=torch.float64, return_entropy=True)
    torch.testing.assert_close(out.loss.double().cpu(), ref.loss, **TOL)
    torch.testing.assert_close(grad.double().cpu(), ref_grad, **TOL)


@pytest.mark.parametrize("case", list(CASES))
def test_fused_rows_agree_with_the_composed_path(case, monkeypatch):
    """The composed path (scoring kernel, the algebra under autograd, gradient kernel) and the fused rows: the same
    loss, metrics and log-probs, gradients within the tolerance."""
    inp, extra = _inputs(seed=1)
    run, launch = _triton()
    with run, launch:
        out, grad = _call(inp, extra, case, device=TRITON.device, return_entropy=True)
        monkeypatch.delattr(triton_backend, "fused_rows")
        two, two_grad = _call(inp, extra, case, device=TRITON.device, return_entropy=True)
    torch.testing.assert_close(out.logprobs, two.logprobs, **TOL)
    torch.testing.assert_close(out.loss, two.loss, **TOL)
    assert out.metrics.keys() == two.metrics.keys()
    for k, v in two.metrics.items():
        assert abs(out.metrics[k] - v) <= 1e-5 + 1e-4 * abs(v), k
    torch.testing.assert_close(grad, two_grad, **TOL)


@pytest.mark.parametrize("kw,served", [
    ({}, 0),  # the plain loss: the fused loss op (three launches)
    (dict(entropy_coef=0.1), 1),
    (dict(kl_coef=0.1), 1),
    (dict(rollout_is="token"), 1),
    (dict(loss_type="gspo"), 0),  # a sequence ratio of the log-probs: not token-local
    (dict(rollout_is="token", _no_old=True), 0),  # the IS ratio is then the log-probs' own
    (dict(distill_coef=0.5), 1),
    (dict(distill_coef=0.5, distill_divergence="jsd"), 1),
    (dict(kl_coef=0.1, inplace_backward=True), 0),  # in place: the composed path writes into the logits
    (dict(kl_coef=0.1, _no_grad=True), 0),
])
def test_which_calls_the_fused_rows_serve(kw, served, calls):
    inp, extra = _inputs()
    kw = dict(HP, **kw)
    if kw.pop("_no_old", False):
        inp["old_logprobs"] = None
    no_grad = kw.pop("_no_grad", False)
    if "kl_coef" in kw:
        kw["ref_logprobs"] = extra["ref_logprobs"]
    if "rollout_is" in kw:
        kw["rollout_logprobs"] = extra["rollout_logprobs"]
    inp = {k: v.to(TRITON.device) if isinstance(v, torch.Tensor) else v for k, v in dict(inp, **kw).items()}
    s = inp.pop("student_logits").clone().requires_grad_(not no_grad)
    run, launch = _triton()
    with run, launch:
        out = rlsd_kernels.rlsd_loss(student_logits=s * 1, **inp)
        if not no_grad:
            out.loss.backward()
    assert calls[0] == served
    if not no_grad:
        assert torch.isfinite(s.grad).all()


def test_grad_output_scales_and_second_backward_raises():
    inp, extra = _inputs()
    run, launch = _triton()
    with run, launch:
        _, want = _call(inp, extra, "all", device=TRITON.device)
        args = {k: v.to(TRITON.device) if isinstance(v, torch.Tensor) else v for k, v in inp.items()}
        s = args.pop("student_logits").clone().requires_grad_()
        kw = dict(HP, **CASES["all"], ref_logprobs=extra["ref_logprobs"].to(TRITON.device),
                  rollout_logprobs=extra["rollout_logprobs"].to(TRITON.device))
        out = rlsd_kernels.rlsd_loss(student_logits=s, **args, **kw)
        (2.5 * out.loss).backward(retain_graph=True)
        torch.testing.assert_close(s.grad, 2.5 * want)
        with pytest.raises(RuntimeError, match="one backward only"):
            out.loss.backward()


def test_nan_logit_gives_its_row_a_nan_gradient():
    """IEEE and the reference: a NaN logit makes its row's gradient NaN (with the entropy term on too); the other
    rows stay finite."""
    inp, extra = _inputs()
    inp["student_logits"] = inp["student_logits"].clone()
    inp["student_logits"][0, 0, 17] = float("nan")
    inp["mask"] = torch.ones(B, T, dtype=torch.bool)
    run, launch = _triton()
    with run, launch:
        _, grad = _call(inp, extra, "all", device=TRITON.device)
    grad = grad.cpu().reshape(B * T, V)
    assert torch.isnan(grad[0]).all()
    rows = [r for r in range(1, B * T) if r != 5]  # row 5 is ignore_index: zero
    assert torch.isfinite(grad[rows]).all() and (grad[5] == 0).all()


@pytest.mark.parametrize("terms", [False, True], ids=["plain", "kl_entropy_forward_kl"])
def test_fused_linear_chunks_on_the_triton_fused_rows(monkeypatch, terms):
    """The fused linear op's chunks take the fused rows on the Triton backend as on the C++ one (on CUDA; forced here
    into the interpreter at a small size): each chunk's gradient written into its own logits, in one walk with the
    token-local terms too, against float64."""
    from rlsd_kernels.backends.linear import chunked

    g = torch.Generator().manual_seed(5)
    N, H = 12, 24
    h = torch.randn(N, H, generator=g, dtype=torch.float64)
    w = torch.randn(V, H, generator=g, dtype=torch.float64) * 0.5
    th = h + 0.5 * torch.randn(N, H, generator=g, dtype=torch.float64)
    labels = torch.randint(0, V, (N,), generator=g)
    labels[3] = -100
    adv = torch.randn(N, generator=g)
    kw = dict(lam=0.6, return_entropy=True)
    if terms:
        kw.update(kl_coef=0.2, ref_logprobs=torch.randn(N, generator=g) - 5.0, entropy_coef=0.05, distill_coef=0.4)
    hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
    ref = reference.rlsd_loss_eager(hh @ ww.T, (th @ w.T).detach(), labels, adv.double(), None, None, **kw)
    ref.loss.backward()
    monkeypatch.setattr(chunked, "CHUNK_BUDGET_BYTES", 2 * 5 * V * 4)  # 5 rows per chunk with the teacher, else 10
    monkeypatch.setattr(dispatch, "chunk_backend", lambda device: "triton")
    dev = TRITON.device
    hf, wf = (x.float().to(dev).requires_grad_() for x in (h, w))
    run, launch = _triton()
    with run, launch:
        calls = []
        real = triton_backend.fused_rows
        monkeypatch.setattr(triton_backend, "fused_rows", lambda *a, **k: calls.append(1) or real(*a, **k))
        kw_dev = {k: v.to(dev) if isinstance(v, torch.Tensor) else v for k, v in kw.items()}
        out = rlsd_kernels.rlsd_linear_loss(hf, wf, labels.to(dev), adv.to(dev), teacher_hidden=th.float().to(dev),
                                            **kw_dev)
        out.loss.backward()
    # 5 rows per chunk stacked with the teacher's (a divergence reads them), else 10 after the teacher's own walk
    assert len(calls) == (3 if terms else 2)
    torch.testing.assert_close(out.loss.double().cpu(), ref.loss, **TOL)
    torch.testing.assert_close(out.entropy.double().cpu(), ref.entropy.double(), **TOL)
    torch.testing.assert_close(hf.grad.double().cpu(), hh.grad, **TOL)
    torch.testing.assert_close(wf.grad.double().cpu(), ww.grad, **TOL)
