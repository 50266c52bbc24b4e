"""``rlsd_loss`` with the section 2c terms (``ops/fused_loss_terms.py``) on every backend, against the float64 eager
reference (itself checked against the scalar transcription of SPEC 2c in test_reference_terms.py)."""
import pytest
import torch

import rlsd_kernels
from rlsd_kernels import reference
from test_reference_terms import BAD, CASES, HP, _inputs, _kwargs, bad_call

B, T = 3, 8
# built at import, before any test forces a backend (the inputs live on the CPU; each test moves them)
INPUTS = {1: _inputs(), 2: _inputs(seed=2), 3: _inputs(seed=3, ignore_frac=0.3, mask_frac=0.3), 4: _inputs(seed=4),
          5: _inputs(seed=5), 6: _inputs(seed=6), 7: _inputs(seed=7), 8: _inputs(seed=8)}
TOL = dict(rtol=1e-5, atol=1e-6)  # docs/math.md section 7, float32 inputs


def _on(device, inp, kw):
    move = lambda v: v.to(device) if isinstance(v, torch.Tensor) else v  # noqa: E731
    return {k: move(v) for k, v in inp.items()}, {k: move(v) for k, v in kw.items()}


def _fused(inp, kw, dtype=torch.float32, **extra):
    s = inp["student_logits"].detach().to(dtype).requires_grad_()
    args = dict(inp, student_logits=s, teacher_logits=None if inp["teacher_logits"] is None
                else inp["teacher_logits"].to(dtype))
    out = rlsd_kernels.rlsd_loss(**args, **kw, **extra)
    out.loss.backward()
    return out, s.grad


def _truth(inp, kw):
    s = inp["student_logits"].detach().double().requires_grad_()
    out = reference.rlsd_loss_eager(**dict(inp, student_logits=s, teacher_logits=inp["teacher_logits"].double()),
                                    **kw)
    (grad,) = torch.autograd.grad(out.loss, s)
    return out, grad


def _compare(out, grad, ref, ref_grad, names):
    torch.testing.assert_close(out.loss.double(), ref.loss, **TOL)
    torch.testing.assert_close(out.logprobs.double(), ref.logprobs.double(), **TOL)
    torch.testing.assert_close(out.weights.double(), ref.weights.double(), **TOL)
    torch.testing.assert_close(grad.double(), ref_grad, **TOL)
    assert set(out.metrics) == set(ref.metrics) and set(names) <= set(out.metrics)
    for k, v in ref.metrics.items():
        assert out.metrics[k] == pytest.approx(v, rel=1e-5, abs=1e-6), k


@pytest.mark.parametrize("agg", ["token", "seq", "sum"])
@pytest.mark.parametrize("case", [c for c in CASES if not c.endswith("_clip")] + ["jsd_clip"])
def test_terms_match_reference(backend, case, agg):
    inp, extra = INPUTS[1]
    kw, names = _kwargs(case, inp, extra)
    kw.update(loss_agg_mode=agg, norm=7.0 if agg == "sum" else None, return_entropy=True)
    inp, kw = _on(backend.device, inp, kw)
    ref, ref_grad = _truth(inp, kw)
    out, grad = _fused(inp, kw)
    _compare(out, grad, ref, ref_grad, names)
    torch.testing.assert_close(out.entropy.double(), ref.entropy.double(), **TOL)


@pytest.mark.parametrize("case", ["gspo", "is_seq_mask", "all"])
def test_packed_cu_seqlens(backend, case):
    inp, extra = INPUTS[2]
    kw, names = _kwargs(case, inp, extra)
    packed = {k: (v.reshape(1, B * T, *v.shape[2:]) if isinstance(v, torch.Tensor) else v) for k, v in inp.items()}
    kw = {k: (v.reshape(1, B * T) if k in ("ref_logprobs", "rollout_logprobs") else v) for k, v in kw.items()}
    kw.update(cu_seqlens=torch.tensor([0, 5, 13, B * T], dtype=torch.int32, device="cpu"), loss_agg_mode="seq")
    packed, kw = _on(backend.device, packed, kw)
    ref, ref_grad = _truth(packed, kw)
    out, grad = _fused(packed, kw)
    _compare(out, grad, ref, ref_grad, names)


@pytest.mark.parametrize("case", ["k3", "gspo", "entropy", "jsd", "all"])
def test_temperature_and_masks(backend, case):
    inp, extra = INPUTS[3]
    kw, names = _kwargs(case, inp, extra)
    kw["temperature"] = 0.7
    inp, kw = _on(backend.device, inp, kw)
    ref, ref_grad = _truth(inp, kw)
    out, grad = _fused(inp, kw)
    _compare(out, grad, ref, ref_grad, names)


def test_all_masked_batch(backend):
    inp, extra = INPUTS[4]
    kw, _ = _kwargs("all_truncate", inp, extra)
    inp = dict(inp, mask=torch.zeros_like(inp["mask"]))
    inp, kw = _on(backend.device, inp, kw)
    out, grad = _fused(inp, kw)
    assert out.loss.item() == 0.0 and not grad.any()


@pytest.mark.parametrize("case", ["k2", "is_token_mask", "gspo"])
def test_inplace_backward_with_token_terms(backend, case):
    inp, extra = INPUTS[5]
    kw, _ = _kwargs(case, inp, extra)
    inp, kw = _on(backend.device, inp, kw)
    _, want = _fused(inp, kw)
    torch.testing.assert_close(_inplace_grad(inp, kw), 2.0 * want, rtol=1e-6, atol=1e-7)


def _inplace_grad(inp, kw):
    """The gradient of ``2 * loss`` with ``inplace_backward=True``, written into a non-leaf copy of the logits."""
    s = inp["student_logits"].detach().float().clone().requires_grad_()
    leaf = s.clone()  # the op writes the gradient into this non-leaf's storage
    out = rlsd_kernels.rlsd_loss(**dict(inp, student_logits=leaf, teacher_logits=inp["teacher_logits"].float()),
                                 **kw, inplace_backward=True)
    (2.0 * out.loss).backward()
    assert torch.equal(leaf.detach(), s.grad)  # the gradient was written into the logits buffer
    return s.grad


@pytest.mark.parametrize("case", ["entropy", "forward_kl", "reverse_kl", "jsd", "all"])
def test_inplace_backward_with_row_terms(backend, case):
    """The entropy bonus and the divergences in place (their gradient sweep writes into the logits): the float64
    reference's gradient within section 7's tolerance, and the out-of-place gradient's."""
    inp, extra = INPUTS[5]
    kw, _ = _kwargs(case, inp, extra)
    inp, kw = _on(backend.device, inp, kw)
    _, want = _fused(inp, kw)
    _, ref_grad = _truth(inp, kw)
    got = _inplace_grad(inp, kw)
    torch.testing.assert_close(got.double(), 2.0 * ref_grad, **TOL)
    torch.testing.assert_close(got, 2.0 * want, **TOL)


@pytest.mark.parametrize("case", ["all_truncate", "entropy", "reverse_kl", "jsd", "gspo"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_within_eager_error(backend, dtype, case):
    inp, extra = INPUTS[6]
    kw, _ = _kwargs(case, inp, extra)
    inp, kw = _on(backend.device, inp, kw)
    ref, ref_grad = _truth(inp, kw)
    low = dict(inp, student_logits=inp["student_logits"].to(dtype), teacher_logits=inp["teacher_logits"].to(dtype))
    out, grad = _fused(low, kw, dtype)
    s = low["student_logits"].detach().clone().requires_grad_()
    eager = reference.rlsd_loss_eager(**dict(low, student_logits=s), **kw)
    (eager_grad,) = torch.autograd.grad(eager.loss, s)
    assert grad.dtype == dtype
    err = lambda a, b: (a.double() - b.double()).abs().max().item()  # noqa: E731
    assert err(out.loss, ref.loss) <= err(eager.loss, ref.loss) + 1e-3
    assert err(grad, ref_grad) <= err(eager_grad, ref_grad) + 1e-3


def test_terms_off_is_the_plain_op():
    """Every term at its default (off) takes the section 2 op, bit for bit."""
    inp, extra = INPUTS[7]
    plain, g_plain = _fused(inp, HP)
    off, g_off = _fused(inp, dict(HP, ref_logprobs=extra["ref_logprobs"], kl_coef=0.0, rollout_is=None,
                                  entropy_coef=0.0, distill_coef=0.0))
    assert torch.equal(plain.loss, off.loss) and torch.equal(g_plain, g_off)
    assert set(off.metrics) == set(plain.metrics)


@pytest.mark.parametrize("bad,name", BAD, ids=[n + str(i) for i, (_, n) in enumerate(BAD)])
def test_validation(bad, name):
    with pytest.raises(ValueError, match=name):
        rlsd_kernels.rlsd_loss(**bad_call(bad, torch.float32))


@pytest.mark.parametrize("agg", ["token", "seq"])
@pytest.mark.parametrize("div,clip", [("forward_kl", None), ("reverse_kl", 0.8), ("jsd", None)])
def test_opsd_loss_matches_reference(backend, div, clip, agg):
    inp, _ = INPUTS[1]
    inp, _ = _on(backend.device, inp, {})
    s = inp["student_logits"].detach().float().requires_grad_()
    kw = dict(divergence=div, clip=clip, loss_agg_mode=agg, temperature=0.9)
    out = rlsd_kernels.opsd_loss(s, inp["teacher_logits"].float(), inp["labels"], inp["mask"], **kw)
    out.loss.backward()
    s64 = inp["student_logits"].detach().double().requires_grad_()
    ref, d = reference.opsd_loss(s64, inp["teacher_logits"].double(), inp["labels"], inp["mask"], **kw)
    (ref_grad,) = torch.autograd.grad(ref, s64)
    torch.testing.assert_close(out.loss.double(), ref.detach(), **TOL)
    torch.testing.assert_close(s.grad.double(), ref_grad, **TOL)
    assert set(out.metrics) == {"distill_mean"}
    valid = (inp["mask"] != 0) & (inp["labels"] != -100)
    want = d[valid].mean().item() if clip is None else d[valid].clamp(max=clip).mean().item()
    assert out.metrics["distill_mean"] == pytest.approx(want, rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("beta", [0.5, 0.1])
def test_jsd_with_far_apart_models(backend, beta):
    """Teacher and student logits of std 30-100: both probabilities of a token fall below float32's range, so the
    mixture ``M`` must be formed in log space (it was ``log(beta p_T + (1 - beta) p_S)`` = log 0 = -inf in the
    Triton kernels, and the loss inf)."""
    g = torch.Generator().manual_seed(3)
    for scale in (30.0, 100.0):
        s = (torch.randn(2, 5, 300, generator=g, device="cpu") * scale).to(backend.device).requires_grad_()
        t = (torch.randn(2, 5, 300, generator=g, device="cpu") * scale).to(backend.device)
        labels = torch.randint(0, 300, (2, 5), generator=g, device="cpu").to(backend.device)
        out = rlsd_kernels.opsd_loss(s, t, labels, divergence="jsd", beta=beta)
        out.loss.backward()
        s64 = s.detach().double().requires_grad_()
        ref, _ = reference.opsd_loss(s64, t.double(), labels, divergence="jsd", beta=beta)
        (ref_grad,) = torch.autograd.grad(ref, s64)
        torch.testing.assert_close(out.loss.double(), ref.detach(), **TOL)
        torch.testing.assert_close(s.grad.double(), ref_grad, **TOL)


@pytest.mark.parametrize("bad,name", [(dict(divergence="tvd"), "divergence"), (dict(beta=1.5, divergence="jsd"), "beta"),
                                      (dict(clip=-1.0), "clip"), (dict(teacher_logits=None), "teacher_logits")])
def test_opsd_validation(bad, name):
    inp, _ = INPUTS[1]
    args = dict(student_logits=inp["student_logits"].float(), teacher_logits=inp["teacher_logits"].float(),
                labels=inp["labels"])
    args.update({k: v for k, v in bad.items() if k == "teacher_logits"})
    with pytest.raises(ValueError, match=name):
        rlsd_kernels.opsd_loss(**args, **{k: v for k, v in bad.items() if k != "teacher_logits"})


def test_module_holds_the_terms():
    inp, extra = INPUTS[2]
    kw, _ = _kwargs("all", inp, extra)
    terms = {k: v for k, v in kw.items() if k not in HP and k not in ("ref_logprobs", "rollout_logprobs")}
    mod = rlsd_kernels.RLSDLoss(**HP, **terms)
    assert mod.loss_type == "gspo" and mod.kl_coef == kw["kl_coef"]
    s = inp["student_logits"].detach().float()
    args = dict(inp, student_logits=s, teacher_logits=inp["teacher_logits"].float())
    a = mod(**args, ref_logprobs=kw["ref_logprobs"], rollout_logprobs=kw["rollout_logprobs"])
    b = rlsd_kernels.rlsd_loss(**args, **kw)
    assert torch.equal(a.loss, b.loss) and a.metrics == b.metrics
    mod.kl_coef = 0.0
    mod.loss_type = "ppo"
    assert "kl_mean" not in mod(**args, rollout_logprobs=kw["rollout_logprobs"]).metrics
    with pytest.raises(ValueError, match="kl_type"):
        mod.kl_type = "k9"


@pytest.mark.parametrize("case", ["entropy", "forward_kl", "reverse_kl", "jsd", "k3"])
def test_extreme_logits(backend, case):
    """+-1e4 logits, a row of equal logits, -inf entries (at the same places in both models, so every divergence
    stays finite) and near-certain tokens: the terms within section 7's float32 tolerance of the float64 reference."""
    from helpers import make_inputs

    inp = make_inputs(B=2, T=4, V=97, seed=19, ignore_frac=0.0, mask_frac=0.0, device="cpu")
    s, t = inp["student_logits"].detach().clone(), inp["teacher_logits"].detach().clone()
    s[0, 0] = torch.where(torch.arange(97, device="cpu") % 2 == 0, 1e4, -1e4)
    t[0, 0] = s[0, 0] + torch.randn(97, generator=torch.Generator().manual_seed(1), device="cpu")
    s[0, 1] = 2.5
    t[0, 1] = 2.5
    s[0, 2, ::3] = float("-inf")
    t[0, 2, ::3] = float("-inf")
    lab = inp["labels"].clone()
    lab[0, 0], lab[0, 2], lab[0, 3] = 0, 1, 3
    s[0, 3, 1] = 1e4
    s[1, 0, lab[1, 0]] = 60.0
    inp = dict(inp, student_logits=s, teacher_logits=t, labels=lab)
    kw = dict(HP, **CASES[case][0])
    if "kl_coef" in kw:
        kw["ref_logprobs"] = torch.full(lab.shape, -2.0, device="cpu")
    inp, kw = _on(backend.device, inp, kw)
    ref, ref_grad = _truth(inp, kw)
    out, grad = _fused(inp, kw)
    _compare(out, grad, ref, ref_grad, CASES[case][1])


def test_opcheck_terms_op():
    """Schema, fake kernel and autograd registration of the row-terms op (every divergence mode)."""
    inp, _ = INPUTS[1]
    s = inp["student_logits"].detach().float().requires_grad_()
    t = inp["teacher_logits"].detach().float()
    for mode in range(4):
        torch.library.opcheck(torch.ops.rlsd_kernels.fused_logprobs_terms.default,
                              (s, t if mode else None, inp["labels"], 0.9, -100, mode, 0.3))


@pytest.mark.parametrize("case", ["k3", "entropy", "forward_kl", "gspo"])
def test_compile_fullgraph_with_terms(case):
    """``torch.compile(fullgraph=True)`` of ``rlsd_loss`` with a section 2c term (default device and backend, as users
    call it): the loss and gradient of the eager call."""
    inp, extra = INPUTS[3]
    kw, _ = _kwargs(case, inp, extra)
    inp = {k: v.detach() if isinstance(v, torch.Tensor) else v for k, v in inp.items()}

    def f(s):
        return rlsd_kernels.rlsd_loss(**dict(inp, student_logits=s), **kw).loss

    compiled = torch.compile(f, fullgraph=True)
    s = inp["student_logits"].float().clone().requires_grad_()
    (g,) = torch.autograd.grad(loss := compiled(s), s)
    s2 = inp["student_logits"].float().clone().requires_grad_()
    (g2,) = torch.autograd.grad(loss2 := f(s2), s2)
    torch.testing.assert_close(loss, loss2)
    torch.testing.assert_close(g, g2, **TOL)
