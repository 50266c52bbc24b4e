"""The C++ backend's row terms (``forward_terms`` / ``backward_terms``) at vocabularies of several chunks (the
kernels walk a row in chunks of 2048 with a running max, and JSD keeps the row and its exps resident between its two
sweeps), against float64 formulas of docs/math.md sections 2b / 2c, within the section 7 float32 tolerance."""
import pytest
import torch

from rlsd_kernels.backends.logits import DIV_MODES, cpp

pytestmark = pytest.mark.skipif(not cpp.available(), reason="C++ backend could not be built")

TOL = dict(rtol=1e-5, atol=1e-6)  # docs/math.md section 7, float32 inputs
IGN = -100
BETA = 0.3


def _rows(V, seed=0, extreme=1e4):
    """[2, 4, V] student / teacher rows that stress the chunked walk: the max in the last chunk (every chunk rebases
    the sums), a first chunk of only -inf, +-1e4 logits, -inf entries (at the same places in both models)."""
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(8, V, generator=g) * 3
    t = s + torch.randn(8, V, generator=g)
    s[1] = torch.linspace(-30.0, 20.0, V)
    t[1] = torch.linspace(-20.0, 25.0, V) + torch.randn(V, generator=g)
    s[2, :2048] = t[2, :2048] = float("-inf")
    s[3] = torch.where(torch.arange(V) % 2 == 0, extreme, -extreme)
    t[3] = s[3] + torch.randn(V, generator=g)
    s[4, ::7] = t[4, ::7] = float("-inf")
    s[5] *= 10
    labels = torch.randint(0, V, (8,), generator=g)
    labels[2] = 2500
    labels[6] = IGN
    return s.view(2, 4, V), t.view(2, 4, V), labels


def _truth(s, t, labels, tau, mode, coef, e, f):
    """float64: (lse_s, entropy, lse_t, D, aux, grad) from the section 2b / 2c formulas (0 log 0 = 0)."""
    xs, xt = s.double().reshape(-1, s.shape[-1]) / tau, t.double().reshape(-1, t.shape[-1]) / tau
    ls, lt = torch.log_softmax(xs, -1), torch.log_softmax(xt, -1)
    ps, pt = ls.exp(), lt.exp()
    plogp = lambda p, l: torch.where(p > 0, p * l, 0.0)  # noqa: E731
    ent = -plogp(ps, ls).sum(-1)
    grad = -coef.double()[:, None] * ps - (e.double()[:, None] * plogp(ps, ls + ent[:, None]))
    valid = labels != IGN
    grad[valid, labels[valid]] += coef.double()[valid]
    aux = torch.zeros_like(ent)
    if mode == DIV_MODES["forward_kl"]:
        div = plogp(pt, lt - ls).sum(-1)
        dd = ps - pt
    elif mode == DIV_MODES["reverse_kl"]:
        div = plogp(ps, ls - lt).sum(-1)
        dd = plogp(ps, ls - lt - div[:, None])
    else:
        lm = torch.log(BETA * pt + (1 - BETA) * ps)
        aux = plogp(ps, ls - lm).sum(-1)
        div = BETA * plogp(pt, lt - lm).sum(-1) + (1 - BETA) * aux
        dd = (1 - BETA) * plogp(ps, ls - lm - aux[:, None])
    grad += f.double()[:, None] * dd
    return torch.logsumexp(xs, -1), ent, torch.logsumexp(xt, -1), div, aux, grad / tau


@pytest.mark.parametrize("V", [5003, 4096])
@pytest.mark.parametrize("tau", [1.0, 0.7])
@pytest.mark.parametrize("div", ["forward_kl", "reverse_kl", "jsd"])
def test_row_terms_over_several_chunks(V, tau, div):
    mode = DIV_MODES[div]
    # +-1e4 only at tau = 1: 1e4 / 0.7 is rounded to float32 (ulp 1e-3) before any kernel sees it
    s, t, labels = _rows(V, extreme=1e4 if tau == 1.0 else 50.0)
    g = torch.Generator().manual_seed(5)
    coef, e, f = (torch.randn(8, generator=g) for _ in range(3))
    coef[6] = 0.0  # an ignored row: its log-prob gradient is 0
    lse, ent, lse_t, d, aux, grad = _truth(s, t, labels, tau, mode, coef, e, f)
    out = cpp.forward_terms(s, t, labels, tau, IGN, True, mode, BETA)
    logp_s, _, lse_s, ent_k, lse_t_k, d_k, aux_k = out
    torch.testing.assert_close(lse_s, lse, **TOL)
    torch.testing.assert_close(ent_k.double(), ent, **TOL)
    torch.testing.assert_close(lse_t_k, lse_t, **TOL)
    torch.testing.assert_close(d_k.double(), d, **TOL)
    if div == "jsd":
        torch.testing.assert_close(aux_k.double(), aux, **TOL)
    for ent_on in (True, False):  # the entropy term off: the sweep without it
        gk = torch.empty_like(s)
        cpp.backward_terms(coef, e if ent_on else None, f, s, t, labels, lse_s, ent_k, lse_t_k, d_k, aux_k, tau,
                           mode, BETA, gk)
        want = grad if ent_on else _truth(s, t, labels, tau, mode, coef, torch.zeros(8), f)[-1]
        torch.testing.assert_close(gk.reshape(8, V).double(), want, **TOL)


def test_forward_terms_without_entropy_same_divergence():
    """want_entropy=False: no entropy, and the other outputs exactly those of a call with it."""
    s, t, labels = _rows(5003, seed=3)
    for mode in (1, 2, 3):
        a = cpp.forward_terms(s, t, labels, 1.0, IGN, True, mode, BETA)
        b = cpp.forward_terms(s, t, labels, 1.0, IGN, False, mode, BETA)
        assert b[3] is None
        for i in (0, 1, 2, 4, 5, 6):
            torch.testing.assert_close(a[i], b[i], rtol=0, atol=0)
