"""The eager reference against an independent scalar transcription of docs/math.md sections 2, 2b and 3."""
import math

import pytest
import torch

from helpers import make_inputs
from rlsd_kernels import reference


def spec_token_loss(lp_s, lp_t, old, A, lam, eps_w, clip_low, clip_high, clip_dual, loss_type):
    """docs/math.md section 2 for one token, in plain Python floats. Returns (loss_t, d loss_t / d logp_S, g)."""
    if lp_t is None:
        g = 1.0
    else:
        sgn = (A > 0) - (A < 0)
        w = math.exp(sgn * (lp_t - lp_s))
        g = (1 - lam) + lam * min(max(w, 1 - eps_w), 1 + eps_w)
    a_hat = A * g
    old = lp_s if old is None else old
    lr = lp_s - old
    ratio = math.exp(min(max(lr, -20), 20))
    lo, hi = math.log(1 - clip_low), math.log(1 + clip_high)
    ratio_c = math.exp(min(max(lr, lo), hi))
    in_range = lo < lr < hi
    if loss_type == "cispo":
        return -a_hat * ratio_c * lp_s, -a_hat * ratio_c, g
    l1, l2, l3 = -a_hat * ratio, -a_hat * ratio_c, -a_hat * clip_dual
    l_hi = max(l1, l2)
    # d l1 = -a_hat * ratio; d l2 = -a_hat * ratio inside the clip range, else 0; d l3 = 0
    d_hi = -a_hat * ratio if (l1 >= l2 or in_range) else 0.0
    if a_hat < 0 and l3 < l_hi:
        return l3, 0.0, g
    return l_hi, d_hi, g


@pytest.mark.parametrize("loss_type", ["ppo", "cispo"])
@pytest.mark.parametrize("lam", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("teacher", [True, False])
def test_reference_matches_scalar_spec(loss_type, lam, teacher):
    inputs = make_inputs(B=3, T=8, V=11, dtype=torch.float64, seed=1, teacher=teacher, ignore_frac=0.0, mask_frac=0.0)
    # spread old log-probs so that every PPO branch (unclipped, clipped high/low, dual clip) occurs
    inputs["old_logprobs"] = inputs["old_logprobs"].double() + torch.linspace(-1.5, 1.5, 24).reshape(3, 8)
    inputs["advantages"][0, :3] = 0.0  # sign(0) = 0 -> w = 1
    hp = dict(lam=lam, eps_w=0.2, clip_low=0.2, clip_high=0.28, clip_dual=3.0, loss_type=loss_type)
    s = inputs["student_logits"].clone().requires_grad_()
    out = reference.rlsd_loss_eager(**dict(inputs, student_logits=s), **hp)
    (grad,) = torch.autograd.grad(out.loss, s)

    lp_s = torch.log_softmax(s.detach(), -1).gather(-1, inputs["labels"][..., None]).squeeze(-1)
    lp_t = None
    if teacher:
        lp_t = torch.log_softmax(inputs["teacher_logits"], -1).gather(-1, inputs["labels"][..., None]).squeeze(-1)
    n = lp_s.numel()
    losses, coefs, gs = [], [], []
    for i in range(n):
        l, c, g = spec_token_loss(lp_s.flatten()[i].item(), None if lp_t is None else lp_t.flatten()[i].item(),
                                  inputs["old_logprobs"].flatten()[i].item(), inputs["advantages"].flatten()[i].item(),
                                  **hp)
        losses.append(l), coefs.append(c), gs.append(g)
    assert out.loss.item() == pytest.approx(sum(losses) / n, rel=1e-12, abs=1e-12)
    torch.testing.assert_close(out.weights.flatten(), torch.tensor(gs, dtype=torch.float64))
    # docs/math.md section 3: d loss / d z = a_t * c_t * (onehot - softmax)
    p = torch.softmax(s.detach(), -1)
    onehot = torch.nn.functional.one_hot(inputs["labels"], 11).double()
    expect = (torch.tensor(coefs, dtype=torch.float64).reshape(3, 8, 1) / n) * (onehot - p)
    torch.testing.assert_close(grad, expect, rtol=1e-10, atol=1e-12)
    if loss_type == "ppo":
        assert 0 < out.metrics["pg_clipfrac"] < 1


def test_reference_gradcheck():
    # lam = 0 (weights are stop-gradient functions of logp_S, which finite differences would see) with old log-probs
    inputs = make_inputs(B=2, T=3, V=9, dtype=torch.float64, seed=2, ignore_frac=0.0)
    s = inputs["student_logits"].clone().requires_grad_()
    for agg, norm in (("token", None), ("seq", None), ("sum", 3.0)):
        torch.autograd.gradcheck(
            lambda x: reference.rlsd_loss_eager(**dict(inputs, student_logits=x), lam=0.0, loss_agg_mode=agg,
                                                norm=norm, temperature=0.7).loss, (s,))


def test_lam_zero_is_grpo_and_weight_semantics():
    inputs = make_inputs(B=2, T=4, V=13, dtype=torch.float64, seed=3)
    a = reference.rlsd_loss_eager(**inputs, lam=0.0)
    b = reference.rlsd_loss_eager(**dict(inputs, teacher_logits=None), lam=0.7)
    torch.testing.assert_close(a.loss, b.loss)
    assert torch.all(a.weights == 1.0)
    # the teacher only rescales: with lam = 1 and eps_w = 0.2 every weight lies in [0.8, 1.2]
    c = reference.rlsd_loss_eager(**inputs, lam=1.0)
    assert c.weights.min() >= 0.8 - 1e-12 and c.weights.max() <= 1.2 + 1e-12
    # positive advantage: a token the teacher likes more (delta > 0) gets a larger weight, and vice versa
    delta = c.teacher_logprobs - c.logprobs
    pos = (inputs["advantages"] > 0) & (inputs["labels"] != -100)
    assert torch.all((c.weights[pos] >= 1) == (delta[pos] >= 0))


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd"])
def test_opsd_divergences(divergence):
    g = torch.Generator().manual_seed(4)
    s = torch.randn(2, 3, 17, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randn(2, 3, 17, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 17, (2, 3), generator=g)
    loss, d = reference.opsd_loss(s, t, labels, divergence=divergence)
    ps, pt = torch.softmax(s.detach(), -1), torch.softmax(t, -1)
    ls, lt = ps.log(), pt.log()
    if divergence == "forward_kl":
        expect_d = (pt * (lt - ls)).sum(-1)
        expect_grad = ps - pt
    elif divergence == "reverse_kl":
        expect_d = (ps * (ls - lt)).sum(-1)
        expect_grad = ps * (ls - lt - expect_d[..., None])
    else:
        m = 0.5 * (ps + pt)
        expect_d = 0.5 * (pt * (lt - m.log())).sum(-1) + 0.5 * (ps * (ls - m.log())).sum(-1)
        expect_grad = None
    torch.testing.assert_close(d, expect_d)
    (grad,) = torch.autograd.grad(loss, s)
    if expect_grad is not None:  # docs/math.md section 2b gradients, divided by the 6 tokens of the token mean
        torch.testing.assert_close(grad, expect_grad / 6)
    # identical distributions: zero divergence
    z, _ = reference.opsd_loss(t.clone(), t, labels, divergence=divergence)
    assert abs(z.item()) < 1e-12


def test_opsd_clip_zero_gradient_beyond_clip():
    g = torch.Generator().manual_seed(5)
    s = (torch.randn(1, 4, 9, generator=g, dtype=torch.float64) * 5).requires_grad_()
    t = torch.randn(1, 4, 9, generator=g, dtype=torch.float64) * 5
    labels = torch.zeros(1, 4, dtype=torch.long)
    _, d = reference.opsd_loss(s, t, labels)
    clip = d.median().item()
    loss, dc = reference.opsd_loss(s, t, labels, clip=clip)
    assert dc.max().item() <= clip + 1e-12
    (grad,) = torch.autograd.grad(loss, s)
    assert torch.all(grad[0, d[0] > clip] == 0) and torch.any(grad[0, d[0] < clip] != 0)
