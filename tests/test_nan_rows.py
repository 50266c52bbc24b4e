"""A nan logit poisons its own row, and only if that row takes part in the loss (every backend).

A row with a valid label and mask set gets a nan log-prob and an all-nan gradient, as IEEE arithmetic and the eager
reference give (p = exp(z - lse) is nan for the whole row). Rows that are masked or have label == ignore_index keep
an exactly zero gradient, whatever they hold (docs/math.md section 3: their aggregation weight is 0). Other rows are
untouched: their log-probs and gradients still match the float64 reference (docs/math.md section 7).
"""
import pytest
import torch

from helpers import F32_ATOL, F32_RTOL, as64, make_inputs, randn, run_loss
from rlsd_kernels import reference, rlsd_loss, token_logprobs

NAN = float("nan")
# valid rows: a nan logit away from the label, at the label, and alone among -inf (a max that drops nan sees -inf)
NAN_STUDENT = [(0, 1), (0, 2), (1, 4)]
NAN_TEACHER = [(0, 3)]  # valid row: a nan teacher logit makes the weight, the loss and the row's gradient nan
DEAD = [(1, 0), (1, 2)]  # a masked row and an ignore_index row, nan in student and teacher


def _poisoned(device, dtype):
    inputs = make_inputs(B=2, T=6, V=37, seed=71, ignore_frac=0.0, mask_frac=0.0, dtype=dtype, device=device)
    s, t, labels = inputs["student_logits"], inputs["teacher_logits"], inputs["labels"]
    # sign(A) != 0 where it matters, so the teacher's weight counts
    inputs["advantages"][:, :5] = torch.tensor([[0.7, -0.4, 1.1, -0.9, 0.3], [0.5, 0.2, -0.6, 0.8, -1.2]],
                                               device=device)
    s[0, 1, (labels[0, 1] + 5) % 37] = NAN
    s[0, 2, labels[0, 2]] = NAN
    s[1, 4] = float("-inf")
    s[1, 4, (labels[1, 4] + 1) % 37] = NAN
    t[0, 3, 11] = NAN
    inputs["mask"][1, 0] = False
    labels[1, 2] = -100
    for b, r in DEAD:
        s[b, r, 3] = t[b, r, 4] = NAN
    return inputs


def _clean(shape, device):
    keep = torch.ones(shape, dtype=torch.bool, device=device)
    for b, r in NAN_STUDENT + NAN_TEACHER + DEAD:
        keep[b, r] = False
    return keep


@pytest.mark.parametrize("variant", ["plain", "inplace", "terms", "terms_inplace"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("loss_type", ["ppo", "cispo"])
def test_nan_logit_poisons_only_its_own_valid_row(backend, loss_type, dtype, variant):
    """Also with the section 2c terms (KL, entropy bonus, forward-KL distillation: the one-visit paths) and with the
    gradient written into the logits (``inplace_backward``)."""
    inputs = _poisoned(backend.device, dtype)
    kw = dict(lam=0.5, loss_type=loss_type)
    if variant.startswith("terms"):
        kw.update(kl_coef=0.1, ref_logprobs=inputs["old_logprobs"] + 0.2, entropy_coef=0.05, distill_coef=0.3)
    ref, g_ref = run_loss(reference.rlsd_loss_eager, as64(inputs), **kw)
    if variant.endswith("inplace"):  # into a copy: the inputs stay for the checks below
        out, g = run_loss(rlsd_loss, dict(inputs, student_logits=inputs["student_logits"].clone()),
                          inplace_backward=True, **kw)
    else:
        out, g = run_loss(rlsd_loss, inputs, **kw)
    assert torch.isnan(out.loss)
    for b, r in NAN_STUDENT + NAN_TEACHER:
        # all zeros here means d loss / d logp_S came back 0 for the row (torch.clamp's backward treats a nan input
        # as clipped) and the backend zeroed it like a masked row: the loss algebra must pass the nan on
        assert bool(torch.isnan(g[b, r]).all()), f"row {b, r} takes part in the loss: its gradient must be nan"
    for b, r in DEAD:
        assert bool(torch.all(g[b, r] == 0)), f"row {b, r} is masked or ignored: its gradient must be exactly 0"
    # log-probs: nan exactly where the float64 reference has nan (a nan student row, masked or not; 0 if ignored)
    for name in ("logprobs", "teacher_logprobs"):
        a, e = getattr(out, name), getattr(ref, name)
        torch.testing.assert_close(torch.isnan(a), torch.isnan(e), msg=name)
    assert torch.isnan(out.weights[NAN_TEACHER[0]])
    keep = _clean(g.shape[:-1], g.device)
    assert torch.isfinite(g[keep]).all() and torch.isfinite(out.logprobs[keep]).all()
    if dtype == torch.float32:
        torch.testing.assert_close(out.logprobs[keep].double(), ref.logprobs[keep], rtol=F32_RTOL, atol=F32_ATOL)
        torch.testing.assert_close(g[keep].double(), g_ref[keep], rtol=F32_RTOL, atol=F32_ATOL)


def test_nan_logit_in_token_logprobs(backend):
    g = torch.Generator().manual_seed(73)
    x = randn(3, 4, 53, generator=g, scale=3.0, device=backend.device)
    y = torch.randint(0, 53, (3, 4), generator=g, device="cpu").to(backend.device)
    x[0, 1, 7] = NAN  # scored row
    x[2, 3, 0] = NAN  # ignored row
    y[2, 3] = -100
    x.requires_grad_()
    lp = token_logprobs(x, y)
    w = randn(3, 4, generator=g, device=backend.device)  # no zero weight: every scored row takes part
    (gx,) = torch.autograd.grad((lp * w).sum(), x)
    assert torch.isnan(lp[0, 1]) and bool(torch.isnan(gx[0, 1]).all()), "a scored nan row: nan log-prob and gradient"
    assert lp[2, 3] == 0 and bool(torch.all(gx[2, 3] == 0)), "an ignored row: log-prob and gradient exactly 0"
    keep = torch.ones(3, 4, dtype=torch.bool, device=backend.device)
    keep[0, 1] = keep[2, 3] = False
    x64 = x.detach().double().requires_grad_()
    lp64 = reference.token_logprobs_eager(x64, y)
    (gx64,) = torch.autograd.grad((lp64 * w.double()).sum(), x64)
    torch.testing.assert_close(lp[keep].double(), lp64[keep], rtol=F32_RTOL, atol=F32_ATOL)
    torch.testing.assert_close(gx[keep].double(), gx64[keep], rtol=F32_RTOL, atol=F32_ATOL)
