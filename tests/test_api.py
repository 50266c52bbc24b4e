"""The fused op (every backend) against the float64 reference: docs/math.md sections 2, 3, 5, 7."""
import math

import pytest
import torch

import rlsd_kernels
from helpers import as64, assert_matches_reference, make_inputs, randn, run_loss
from rlsd_kernels import RLSDLoss, reference, rlsd_loss, token_logprobs

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lam", [0.0, 0.5, 1.0])
def test_rlsd_matches_reference_dtypes(backend, dtype, lam):
    inputs = make_inputs(B=3, T=7, V=301, dtype=dtype, seed=int(lam * 10), device=backend.device)
    assert_matches_reference(inputs, lam=lam, return_entropy=True)


@pytest.mark.parametrize("loss_type", ["ppo", "cispo"])
@pytest.mark.parametrize("agg", ["token", "seq", "sum"])
def test_loss_types_and_aggregation(backend, loss_type, agg):
    inputs = make_inputs(B=3, T=6, V=53, seed=3, device=backend.device)
    norm = 17.0 if agg == "sum" else None
    assert_matches_reference(inputs, lam=0.5, loss_type=loss_type, loss_agg_mode=agg, norm=norm)


@pytest.mark.parametrize("old", [True, False])
@pytest.mark.parametrize("per_seq", [True, False])
@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_old_logprobs_advantages_temperature(backend, old, per_seq, temperature):
    inputs = make_inputs(B=2, T=5, V=41, seed=5, old=old, per_seq_adv=per_seq, device=backend.device)
    assert_matches_reference(inputs, lam=0.5, temperature=temperature)


def test_grpo_without_teacher(backend):
    inputs = make_inputs(B=2, T=5, V=41, seed=7, teacher=False, device=backend.device)
    out = assert_matches_reference(inputs, lam=0.7)
    assert out.teacher_logprobs is None
    assert torch.all(out.weights == 1.0)
    # lam = 0 with a teacher is GRPO too: same loss and gradient as no teacher at all
    with_t = make_inputs(B=2, T=5, V=41, seed=7, teacher=True, device=backend.device)
    a, ga = run_loss(rlsd_loss, with_t, lam=0.0)
    b, gb = run_loss(rlsd_loss, inputs, lam=0.0)
    torch.testing.assert_close(a.loss, b.loss)
    torch.testing.assert_close(ga, gb)


@pytest.mark.parametrize("V", [5003, 151936])
def test_odd_and_real_vocab(backend, V):
    # N = 3 rows is not a multiple of any block; V = 151936 (Qwen) and 5003 (prime-ish) are not powers of two
    inputs = make_inputs(B=1, T=3, V=V, seed=11, ignore_frac=0.0, mask_frac=0.0, device=backend.device)
    assert_matches_reference(inputs, lam=0.5, return_entropy=True)


@pytest.mark.parametrize("dtype", DTYPES)
def test_strided_views(backend, dtype):
    inputs = make_inputs(B=2, T=12, V=67, dtype=dtype, seed=13, strided=True, device=backend.device)
    assert not inputs["student_logits"].is_contiguous()
    assert_matches_reference(inputs, lam=0.5, return_entropy=True)


def test_noncontiguous_vocab_dim(backend):
    inputs = make_inputs(B=2, T=3, V=29, seed=17, device=backend.device)
    for k in ("student_logits", "teacher_logits"):
        inputs[k] = inputs[k].transpose(0, 2).contiguous().transpose(0, 2)  # stride(-1) != 1
        assert inputs[k].stride(-1) != 1
    assert_matches_reference(inputs, lam=0.5, return_entropy=True)


def test_extreme_logits(backend):
    inputs = make_inputs(B=2, T=4, V=97, seed=19, old=False, ignore_frac=0.0, mask_frac=0.0, device=backend.device)
    s, t = inputs["student_logits"], inputs["teacher_logits"]
    s[0, 0] = torch.where(torch.arange(97, device=backend.device) % 2 == 0, 1e4, -1e4)  # +-1e4
    t[0, 0] = -s[0, 0]
    s[0, 1] = 2.5  # a row of equal logits
    t[0, 1] = 2.5
    s[0, 2, ::3] = float("-inf")  # -inf entries (not at the label)
    t[0, 2, 1::3] = float("-inf")
    lab = inputs["labels"]
    lab[0, 0] = 0
    lab[0, 2] = 1
    lab[0, 3] = 3
    s[0, 3, 1] = 1e4  # a near-certain wrong token: p[y] ~ 0; and a near-certain right token in row 1, 0
    s[1, 0, lab[1, 0]] = 60.0
    out = assert_matches_reference(inputs, lam=0.5, return_entropy=True)
    assert torch.isfinite(out.loss) and torch.isfinite(out.logprobs).all()


def test_all_masked_batch(backend):
    inputs = make_inputs(B=2, T=3, V=31, seed=23, device=backend.device)
    inputs["mask"] = torch.zeros_like(inputs["mask"])
    for agg, norm in (("token", None), ("seq", None), ("sum", 4.0)):
        out, g = run_loss(rlsd_loss, inputs, loss_agg_mode=agg, norm=norm)
        assert out.loss.item() == 0.0
        assert torch.all(g == 0)
        assert all(math.isfinite(v) for v in out.metrics.values())


def test_padding_with_minus_inf_outside_mask(backend):
    # masked positions may hold garbage (here -inf logits at the label): no nan may leak into loss or grads
    inputs = make_inputs(B=2, T=4, V=31, seed=29, device=backend.device)
    inputs["mask"][1, 2] = False
    inputs["student_logits"][1, 2] = float("-inf")
    out, g = run_loss(rlsd_loss, inputs, lam=0.5)
    assert torch.isfinite(out.loss) and torch.isfinite(g).all()


@pytest.mark.parametrize("dtype", DTYPES)
def test_inplace_backward_equals_out_of_place(backend, dtype):
    inputs = make_inputs(B=2, T=4, V=83, dtype=dtype, seed=31, device=backend.device)
    out, g = run_loss(rlsd_loss, inputs, lam=0.5)
    buf = inputs["student_logits"].detach().clone().requires_grad_()
    out2 = rlsd_loss(**dict(inputs, student_logits=buf * 1), lam=0.5, inplace_backward=True)
    # a non-leaf logits tensor (as from an LM head) receives the gradient in its own buffer
    logits = buf * 1
    out2 = rlsd_loss(**dict(inputs, student_logits=logits), lam=0.5, inplace_backward=True)
    (g2,) = torch.autograd.grad(out2.loss, logits)
    assert g2.data_ptr() == logits.data_ptr()
    torch.testing.assert_close(g2, g, rtol=0, atol=0)
    torch.testing.assert_close(out2.loss, out.loss)


def test_teacher_logprobs_route_equals_teacher_logits(backend):
    inputs = make_inputs(B=2, T=5, V=57, seed=37, device=backend.device)
    a, ga = run_loss(rlsd_loss, inputs, lam=0.5)
    t_lp = token_logprobs(inputs["teacher_logits"], inputs["labels"])
    b, gb = run_loss(rlsd_loss, dict(inputs, teacher_logits=None), teacher_logprobs=t_lp, lam=0.5)
    torch.testing.assert_close(a.loss, b.loss)
    torch.testing.assert_close(ga, gb)
    torch.testing.assert_close(b.teacher_logprobs, a.teacher_logprobs)


def test_packed_batch_with_cu_seqlens(backend):
    # three sequences of lengths 3, 0 and 6 packed padding-free into [1, 9]; per-sequence advantages
    inputs = make_inputs(B=1, T=9, V=45, seed=41, device=backend.device)
    cu = torch.tensor([0, 3, 3, 9], dtype=torch.int32, device=backend.device)
    inputs["advantages"] = torch.tensor([0.5, 1.0, -1.5], device=backend.device)
    assert_matches_reference(inputs, lam=0.5, loss_agg_mode="seq", cu_seqlens=cu)
    # seq mode: equal to the mean of the per-sequence token means, computed by hand
    out, _ = run_loss(rlsd_loss, inputs, grad=False, lam=0.5, loss_agg_mode="seq", cu_seqlens=cu)
    parts = []
    for lo, hi in ((0, 3), (3, 9)):
        sub = {k: (v[:, lo:hi] if isinstance(v, torch.Tensor) and v.dim() >= 2 else v) for k, v in inputs.items()}
        sub["advantages"] = inputs["advantages"][[0 if lo == 0 else 2]].expand(1, hi - lo)
        if sub["mask"].logical_and(sub["labels"] != -100).any():
            parts.append(run_loss(rlsd_loss, sub, grad=False, lam=0.5)[0].loss)
    torch.testing.assert_close(out.loss, torch.stack(parts).mean())


@pytest.mark.parametrize("dtype", DTYPES)
def test_token_logprobs(backend, dtype):
    g = torch.Generator().manual_seed(43)
    x = randn(3, 4, 1001, generator=g, scale=4.0, device=backend.device, dtype=dtype).requires_grad_()
    y = torch.randint(0, 1001, (3, 4), generator=g, device="cpu").to(backend.device)
    y[0, 0] = -100
    lp, ent = token_logprobs(x, y, temperature=0.8, return_entropy=True)
    w = randn(3, 4, generator=g, device=backend.device)
    (gx,) = torch.autograd.grad((lp * w).sum(), x)
    x64 = x.detach().double().requires_grad_()
    lp64, ent64 = reference.token_logprobs_eager(x64, y, temperature=0.8, return_entropy=True)
    (gx64,) = torch.autograd.grad((lp64 * w.double()).sum(), x64)
    assert lp.dtype == torch.float32 and lp.shape == y.shape and lp[0, 0] == 0
    if dtype == torch.float32:
        for a, b in ((lp, lp64), (ent, ent64), (gx, gx64)):
            torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-6)
    else:
        lpe, ente = reference.token_logprobs_eager(x.detach(), y, temperature=0.8, return_entropy=True,
                                                   compute_dtype=dtype)
        assert (lp.double() - lp64).abs().max() <= (lpe.double() - lp64).abs().max() + 1e-3
        assert (ent.double() - ent64).abs().max() <= (ente.double() - ent64).abs().max() + 1e-3
        assert gx.dtype == dtype


def test_rlsd_loss_module(backend):
    inputs = make_inputs(B=2, T=4, V=33, seed=47, device=backend.device)
    mod = RLSDLoss(lam=0.5, loss_type="cispo")
    a = mod(**inputs)
    b = rlsd_loss(**inputs, lam=0.5, loss_type="cispo")
    torch.testing.assert_close(a.loss, b.loss)
    mod.lam = 0.0  # the trainer schedules lam between steps
    assert "lam=0.5" in repr(RLSDLoss(lam=0.5))


def test_metrics_are_python_floats(backend):
    inputs = make_inputs(B=2, T=4, V=33, seed=53, device=backend.device)
    out = rlsd_loss(**inputs, lam=0.5)
    assert set(out.metrics) == {"pg_clipfrac", "pg_clipfrac_lower", "ppo_kl", "weight_clip_low_frac",
                                "weight_clip_high_frac", "delta_mean", "weight_mean"}
    assert all(type(v) is float for v in out.metrics.values())
    ref = reference.rlsd_loss_eager(**as64(inputs), lam=0.5)
    for k, v in ref.metrics.items():
        assert out.metrics[k] == pytest.approx(v, abs=1e-5), k


def test_compile_fullgraph():
    inputs = make_inputs(B=2, T=4, V=50, seed=61, device="cpu")

    def f(s, t, labels, adv, old, mask):
        out = rlsd_kernels.rlsd_loss(s, t, labels, adv, old, mask, lam=0.5, loss_agg_mode="seq", return_entropy=True)
        return out.loss, out.logprobs, out.weights, out.entropy

    compiled = torch.compile(f, fullgraph=True)  # default (inductor) backend, as users call it
    s = inputs["student_logits"].clone().requires_grad_()
    args = (inputs["teacher_logits"], inputs["labels"], inputs["advantages"], inputs["old_logprobs"], inputs["mask"])
    loss, lp, w, ent = compiled(s, *args)
    (g,) = torch.autograd.grad(loss, s)
    s2 = inputs["student_logits"].clone().requires_grad_()
    loss2, lp2, w2, ent2 = f(s2, *args)
    (g2,) = torch.autograd.grad(loss2, s2)
    torch.testing.assert_close(loss, loss2)
    torch.testing.assert_close(g, g2)
    torch.testing.assert_close(ent, ent2)


def test_opcheck():
    # torch.library's own consistency checks of the custom op: schema, fake kernel, autograd registration
    inputs = make_inputs(B=2, T=3, V=20, seed=67, device="cpu")
    s = inputs["student_logits"].clone().requires_grad_()
    torch.library.opcheck(torch.ops.rlsd_kernels.fused_logprobs.default,
                          (s, inputs["teacher_logits"], inputs["labels"], 1.0, -100, True, False))


def test_row_of_only_minus_inf_gets_zero_gradient(backend):
    # degenerate but possible with aggressive logit masking: every backend zeroes the row instead of emitting nan
    g = torch.Generator().manual_seed(73)
    x = randn(2, 3, 13, generator=g, device=backend.device)
    x[1, 1] = float("-inf")
    x.requires_grad_()
    y = torch.randint(0, 13, (2, 3), generator=g, device="cpu").to(backend.device)
    lp = token_logprobs(x, y)
    assert torch.isnan(lp[1, 1])  # undefined, as eager log_softmax says
    (g,) = torch.autograd.grad(lp.sum(), x)  # the -inf row still receives coefficient 1
    assert torch.isfinite(g).all() and torch.all(g[1, 1] == 0)
