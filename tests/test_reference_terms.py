"""The section 2c terms of the eager reference (KL to a reference policy, rollout importance sampling, GSPO, entropy
bonus, distillation term) against an independent scalar transcription of SPEC / docs/math.md section 2c in plain
Python floats, plus gradchecks, the analytic gradients of sections 2b / 2c, validation, and "all terms off is
exactly section 2"."""
import math

import pytest
import torch

from helpers import make_inputs
from rlsd_kernels import reference
from test_reference import spec_token_loss

B, T, V = 3, 8, 11
HP = dict(lam=0.5, eps_w=0.2, clip_low=0.2, clip_high=0.28, clip_dual=3.0)


# ------------------------------------------------------------------------------- scalar transcription (floats)
def _log_softmax(row, tau):
    xs = [v / tau for v in row]
    mx = max(xs)
    lse = mx + math.log(sum(math.exp(x - mx) for x in xs))
    return [x - lse for x in xs]


def _kl(lp, lq):
    return sum(math.exp(a) * (a - b) for a, b in zip(lp, lq) if math.exp(a) > 0)


def spec_kl(lp, ref, kl_type):
    """(kl_t, d kl_t / d logp_S)"""
    d = lp - ref
    if kl_type == "k1":
        return d, 1.0
    if kl_type == "k2":
        return 0.5 * d * d, d
    r = ref - lp
    dr = -1.0 if -20 < r < 20 else 0.0
    r = min(max(r, -20.0), 20.0)
    v = math.exp(r) - r - 1
    return min(max(v, -10.0), 10.0), ((math.exp(r) - 1) * dr if -10 < v < 10 else 0.0)


def spec_divergence(ls, lt, div, beta):
    """(D_t, d D_t / d z_S * tau as a list) of section 2b."""
    ps = [math.exp(a) for a in ls]
    pt = [math.exp(a) for a in lt]
    if div == "forward_kl":
        return _kl(lt, ls), [a - b for a, b in zip(ps, pt)]
    if div == "reverse_kl":
        d = _kl(ls, lt)
        return d, [p * (a - b - d) for p, a, b in zip(ps, ls, lt)]
    lm = [math.log(beta * b + (1 - beta) * a) for a, b in zip(ps, pt)]
    kl_sm = _kl(ls, lm)
    d = beta * _kl(lt, lm) + (1 - beta) * kl_sm
    return d, [(1 - beta) * p * (a - m - kl_sm) for p, a, m in zip(ps, ls, lm)]


def spec_total(inp, *, loss_type="ppo", loss_agg_mode="token", norm=None, cu_seqlens=None, temperature=1.0,
               ref_logprobs=None, kl_coef=0.0, kl_type="k3", rollout_logprobs=None, rollout_is=None,
               rollout_is_threshold=2.0, rollout_is_mode="truncate", entropy_coef=0.0, distill_coef=0.0,
               distill_divergence="forward_kl", distill_beta=0.5, distill_clip=None, **hp):
    """SPEC section 2c, token by token: (loss, metrics, d loss / d student_logits as a nested list [N][V])."""
    tau = temperature
    zs = inp["student_logits"].reshape(-1, V).tolist()
    zt = inp["teacher_logits"].reshape(-1, V).tolist()
    labels = inp["labels"].reshape(-1).tolist()
    n = len(labels)
    adv = inp["advantages"].reshape(-1).tolist()
    old_in = None if inp["old_logprobs"] is None else inp["old_logprobs"].reshape(-1).tolist()
    mask = [True] * n if inp["mask"] is None else inp["mask"].reshape(-1).tolist()
    if cu_seqlens is None:
        seq = [i // inp["labels"].shape[-1] for i in range(n)]
    else:
        cu = cu_seqlens.tolist()
        seq = [next(k for k in range(len(cu) - 1) if cu[k] <= i < cu[k + 1]) for i in range(n)]
    seqs = sorted(set(seq))
    m = [bool(mk) and y != -100 for mk, y in zip(mask, labels)]
    ls_rows = [_log_softmax(r, tau) for r in zs]
    lt_rows = [_log_softmax(r, tau) for r in zt]
    lp_s = [r[y] if y != -100 else 0.0 for r, y in zip(ls_rows, labels)]
    lp_t = [r[y] if y != -100 else 0.0 for r, y in zip(lt_rows, labels)]
    old = lp_s if old_in is None else old_in
    metrics = {}

    # rollout importance sampling: weight on the policy-gradient term, or rejection from the mask
    w_is = [1.0] * n
    if rollout_is is not None:
        C = rollout_is_threshold
        ro = rollout_logprobs.reshape(-1).tolist()
        diff = [(old[i] - ro[i]) if m[i] else 0.0 for i in range(n)]
        if rollout_is == "token":
            log_rho = diff
        else:
            per = {s: sum(d for d, q in zip(diff, seq) if q == s) for s in seqs}
            log_rho = [per[q] for q in seq]
        rho = [math.exp(min(max(x, -20.0), 20.0)) for x in log_rho]
        if rollout_is_mode == "truncate":
            flagged = [r > C for r in rho]
            w_is = [min(r, C) for r in rho]
            m2 = list(m)
        else:
            flagged = [r > C or r < 1 / C for r in rho]
            m2 = [a and not f for a, f in zip(m, flagged)]
        cnt = max(1, sum(m))
        metrics["rollout_is_mean"] = sum(r for r, a in zip(rho, m) if a) / cnt
        metrics["rollout_is_clipfrac"] = sum(1 for f, a in zip(flagged, m) if a and f) / cnt
    else:
        m2 = list(m)

    # policy term: (loss_t, d loss_t / d logp_S)
    pol, coef = [], []
    if loss_type == "gspo":
        kl_seq = {}
        for s in seqs:
            idx = [i for i in range(n) if seq[i] == s and m2[i]]
            kl_seq[s] = sum(lp_s[i] - old[i] for i in idx) / max(1, len(idx))
        lo, hi = 1 - hp["clip_low"], 1 + hp["clip_high"]
        for i in range(n):
            g = spec_token_loss(lp_s[i], lp_t[i], old[i], adv[i], **hp, loss_type="ppo")[2]
            a_hat = adv[i] * g
            x = kl_seq[seq[i]]
            ratio = math.exp(min(x, 10.0))
            dratio = ratio if x < 10 else 0.0
            l1, l2 = -a_hat * ratio, -a_hat * min(max(ratio, lo), hi)
            pol.append(max(l1, l2))
            coef.append(-a_hat * dratio if (l1 >= l2 or lo < ratio < hi) else 0.0)
    else:
        for i in range(n):
            l, c, _ = spec_token_loss(lp_s[i], lp_t[i], old[i] if m[i] else 0.0, adv[i], **hp, loss_type=loss_type)
            pol.append(l), coef.append(c)

    cnt2 = max(1, sum(m2))
    per_t, dlogp, rowgrad = [], [], []
    kls, ents, divs = [], [], []
    for i in range(n):
        val = w_is[i] * pol[i]
        dl = w_is[i] * coef[i]
        rg = [0.0] * V
        if kl_coef > 0:
            k, dk = spec_kl(lp_s[i], ref_logprobs.reshape(-1)[i].item(), kl_type)
            val += kl_coef * k
            dl += kl_coef * dk
            kls.append(k)
        if entropy_coef > 0:
            ps = [math.exp(a) for a in ls_rows[i]]
            H = -sum(p * a for p, a in zip(ps, ls_rows[i]) if p > 0)
            val -= entropy_coef * H
            # dH/dz = -p (log p + H) / tau
            rg = [r - entropy_coef * (-p * (a + H)) for r, p, a in zip(rg, ps, ls_rows[i])]
            ents.append(H)
        if distill_coef > 0:
            D, dD = spec_divergence(ls_rows[i], lt_rows[i], distill_divergence, distill_beta)
            if distill_clip is not None and D > distill_clip:
                D, dD = distill_clip, [0.0] * V
            val += distill_coef * D
            rg = [r + distill_coef * d for r, d in zip(rg, dD)]
            divs.append(D)
        per_t.append(val), dlogp.append(dl), rowgrad.append(rg)

    # aggregation weights over the final mask m2
    if loss_agg_mode == "token":
        a = [1.0 / cnt2 if m2[i] else 0.0 for i in range(n)]
    elif loss_agg_mode == "sum":
        a = [1.0 / norm if m2[i] else 0.0 for i in range(n)]
    else:
        counts = {s: sum(1 for i in range(n) if seq[i] == s and m2[i]) for s in seqs}
        nonempty = max(1, sum(1 for c in counts.values() if c > 0))
        a = [1.0 / (counts[seq[i]] * nonempty) if m2[i] else 0.0 for i in range(n)]
    loss = sum(a[i] * per_t[i] for i in range(n) if m2[i])
    grad = []
    for i in range(n):
        ps = [math.exp(x) for x in ls_rows[i]]
        if not m2[i]:
            grad.append([0.0] * V)
            continue
        grad.append([a[i] * (dlogp[i] * ((v == labels[i]) - ps[v]) + rowgrad[i][v]) / tau for v in range(V)])
    for name, vals in (("kl_mean", kls), ("entropy_mean", ents), ("distill_mean", divs)):
        if vals:
            metrics[name] = sum(v for v, k in zip(vals, m2) if k) / cnt2
    return loss, metrics, grad


# ------------------------------------------------------------------------------------------------- fixtures
def _inputs(seed=1, ignore_frac=0.15, mask_frac=0.15):
    """float64 inputs on the CPU (tests of other backends move them to their device)."""
    inp = make_inputs(B=B, T=T, V=V, dtype=torch.float64, seed=seed, ignore_frac=ignore_frac, mask_frac=mask_frac,
                      device="cpu")
    # spread old log-probs so every PPO / GSPO branch occurs
    inp["old_logprobs"] = inp["old_logprobs"].double() + torch.linspace(-1.5, 1.5, B * T).reshape(B, T)
    g = torch.Generator().manual_seed(seed + 100)
    lp = reference.token_logprobs_eager(inp["student_logits"], inp["labels"].clamp(min=0))
    extra = dict(
        ref_logprobs=lp + torch.randn(B, T, generator=g, dtype=torch.float64),
        rollout_tok=inp["old_logprobs"] + 0.6 * torch.randn(B, T, generator=g, dtype=torch.float64),
        rollout_seq=inp["old_logprobs"] + 0.25 * torch.randn(B, T, generator=g, dtype=torch.float64),
    )
    return inp, extra


def _run(inp, **kw):
    s = inp["student_logits"].clone().requires_grad_()
    out = reference.rlsd_loss_eager(**dict(inp, student_logits=s), **kw)
    (grad,) = torch.autograd.grad(out.loss, s)
    return out, grad


def _check(inp, kw, extra_names):
    out, grad = _run(inp, **kw)
    loss, metrics, g = spec_total(inp, **kw)
    assert out.loss.item() == pytest.approx(loss, rel=1e-10, abs=1e-12)
    torch.testing.assert_close(grad.reshape(-1, V), torch.tensor(g, dtype=torch.float64), rtol=1e-9, atol=1e-12)
    got = out.metrics
    assert set(got) - set(reference_metric_names()) == set(extra_names)
    for name in extra_names:
        assert got[name] == pytest.approx(metrics[name], rel=1e-5, abs=1e-6), name  # metrics are float32
    return out, metrics


def reference_metric_names():
    from rlsd_kernels._output import METRIC_NAMES
    return METRIC_NAMES


CASES = {
    "k1": (dict(kl_coef=0.3, kl_type="k1"), ["kl_mean"]),
    "k2": (dict(kl_coef=0.3, kl_type="k2"), ["kl_mean"]),
    "k3": (dict(kl_coef=0.3), ["kl_mean"]),
    "is_token_truncate": (dict(rollout_is="token", rollout_is_threshold=1.5), ["rollout_is_mean", "rollout_is_clipfrac"]),
    "is_token_mask": (dict(rollout_is="token", rollout_is_threshold=1.5, rollout_is_mode="mask"),
                      ["rollout_is_mean", "rollout_is_clipfrac"]),
    "is_seq_truncate": (dict(rollout_is="sequence", rollout_is_threshold=1.5), ["rollout_is_mean", "rollout_is_clipfrac"]),
    "is_seq_mask": (dict(rollout_is="sequence", rollout_is_threshold=1.5, rollout_is_mode="mask"),
                    ["rollout_is_mean", "rollout_is_clipfrac"]),
    "gspo": (dict(loss_type="gspo"), []),
    "entropy": (dict(entropy_coef=0.05), ["entropy_mean"]),
    "forward_kl": (dict(distill_coef=0.7), ["distill_mean"]),
    "reverse_kl": (dict(distill_coef=0.7, distill_divergence="reverse_kl"), ["distill_mean"]),
    "jsd": (dict(distill_coef=0.7, distill_divergence="jsd", distill_beta=0.3), ["distill_mean"]),
    "forward_kl_clip": (dict(distill_coef=0.7, distill_clip="median"), ["distill_mean"]),
    "reverse_kl_clip": (dict(distill_coef=0.7, distill_divergence="reverse_kl", distill_clip="median"),
                        ["distill_mean"]),
    "jsd_clip": (dict(distill_coef=0.7, distill_divergence="jsd", distill_clip="median"), ["distill_mean"]),
    "all": (dict(kl_coef=0.2, kl_type="k2", rollout_is="sequence", rollout_is_threshold=1.5, rollout_is_mode="mask",
                 loss_type="gspo", entropy_coef=0.05, distill_coef=0.5, distill_divergence="reverse_kl"),
            ["kl_mean", "entropy_mean", "rollout_is_mean", "rollout_is_clipfrac", "distill_mean"]),
    # the IS weight touches the policy-gradient term only, never KL, entropy or distillation
    "all_truncate": (dict(kl_coef=0.3, rollout_is="token", rollout_is_threshold=1.5, entropy_coef=0.05,
                          distill_coef=0.5, distill_divergence="jsd"),
                     ["kl_mean", "entropy_mean", "rollout_is_mean", "rollout_is_clipfrac", "distill_mean"]),
}


def _kwargs(case, inp, extra):
    kw, names = CASES[case]
    kw = dict(HP, **kw)
    if "kl_coef" in kw:
        kw["ref_logprobs"] = extra["ref_logprobs"]
    if "rollout_is" in kw:
        kw["rollout_logprobs"] = extra["rollout_tok" if kw["rollout_is"] == "token" else "rollout_seq"]
    if kw.get("distill_clip") == "median":  # a clip that some tokens exceed and some do not
        _, d = reference.opsd_loss(inp["student_logits"], inp["teacher_logits"], inp["labels"],
                                   divergence=kw.get("distill_divergence", "forward_kl"))
        d = d.flatten().sort().values
        k = d.numel() // 2
        kw["distill_clip"] = 0.5 * (d[k] + d[k + 1]).item()  # halfway between two tokens: no tie with the clip
    return kw, names


@pytest.mark.parametrize("agg", ["token", "seq", "sum"])
@pytest.mark.parametrize("case", list(CASES))
def test_terms_match_scalar_spec(case, agg):
    inp, extra = _inputs()
    kw, names = _kwargs(case, inp, extra)
    kw.update(loss_agg_mode=agg, norm=7.0 if agg == "sum" else None)
    out, metrics = _check(inp, kw, names)
    if "rollout_is_clipfrac" in names:  # the threshold splits the tokens: both branches are exercised
        assert 0 < metrics["rollout_is_clipfrac"] < 1
    if case == "gspo" and agg == "token":
        assert 0 < out.metrics["pg_clipfrac"] < 1 and out.metrics["pg_clipfrac_lower"] == 0


@pytest.mark.parametrize("case", ["gspo", "is_seq_truncate", "is_seq_mask", "all"])
def test_packed_cu_seqlens(case):
    inp, extra = _inputs(seed=2)
    kw, names = _kwargs(case, inp, extra)
    packed = {k: (v.reshape(1, B * T, *v.shape[2:]) if isinstance(v, torch.Tensor) else v) for k, v in inp.items()}
    kw_p = {k: (v.reshape(1, B * T) if k in ("ref_logprobs", "rollout_logprobs") else v) for k, v in kw.items()}
    # uneven sequences, against the scalar spec
    cu = torch.tensor([0, 5, 13, B * T], dtype=torch.int32)
    _check(packed, dict(kw_p, cu_seqlens=cu, loss_agg_mode="seq"), names)
    # even sequences: the same loss and gradient as the [B, T] layout
    cu = torch.tensor([0, T, 2 * T, 3 * T], dtype=torch.int64)
    a, ga = _run(packed, **kw_p, cu_seqlens=cu)
    b, gb = _run(inp, **kw)
    torch.testing.assert_close(a.loss, b.loss, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(ga.reshape(B, T, V), gb, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("case", ["k3", "is_token_truncate", "gspo", "entropy", "jsd", "all"])
def test_temperature(case):
    inp, extra = _inputs(seed=3)
    kw, names = _kwargs(case, inp, extra)
    _check(inp, dict(kw, temperature=0.7), names)


def test_all_masked_batch_gives_zero():
    inp, extra = _inputs(seed=4)
    inp["mask"] = torch.zeros(B, T, dtype=torch.bool)
    kw, names = _kwargs("all", inp, extra)
    for agg, norm in (("token", None), ("seq", None), ("sum", 3.0)):
        out, grad = _run(inp, **dict(kw, loss_agg_mode=agg, norm=norm))
        assert out.loss.item() == 0.0 and torch.all(grad == 0)
        assert all(math.isfinite(v) for v in out.metrics.values())
        assert set(names) <= set(out.metrics)


def test_rejection_drops_tokens_from_normaliser():
    # rollout_is_mode="mask" with every token rejected: an all-masked batch; with none rejected: plain section 2
    inp, extra = _inputs(seed=5)
    far = inp["old_logprobs"] + 5.0
    out, grad = _run(inp, **HP, rollout_logprobs=far, rollout_is="token", rollout_is_mode="mask")
    assert out.loss.item() == 0.0 and torch.all(grad == 0) and out.metrics["rollout_is_clipfrac"] == 1.0
    a, ga = _run(inp, **HP, rollout_logprobs=inp["old_logprobs"], rollout_is="token", rollout_is_mode="mask")
    b, gb = _run(inp, **HP)
    torch.testing.assert_close(a.loss, b.loss, rtol=1e-14, atol=0)
    torch.testing.assert_close(ga, gb, rtol=1e-14, atol=0)
    assert a.metrics["rollout_is_mean"] == 1.0 and a.metrics["rollout_is_clipfrac"] == 0.0


# ------------------------------------------------------------------------------------------------ gradients
@pytest.mark.parametrize("term", [dict(entropy_coef=0.3), dict(distill_coef=1.0),
                                  dict(distill_coef=1.0, distill_divergence="reverse_kl"),
                                  dict(distill_coef=1.0, distill_divergence="jsd", distill_beta=0.3),
                                  dict(kl_coef=0.5, kl_type="k3"), dict(loss_type="gspo")])
def test_gradcheck(term):
    # lam = 0: the evidence weight is a stop-gradient function of logp_S, which finite differences would see
    inp = make_inputs(B=2, T=3, V=7, dtype=torch.float64, seed=6, ignore_frac=0.0)
    if "kl_coef" in term:
        term = dict(term, ref_logprobs=torch.randn(2, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0)))
    s = inp["student_logits"].clone().requires_grad_()
    torch.autograd.gradcheck(lambda x: reference.rlsd_loss_eager(**dict(inp, student_logits=x), lam=0.0,
                                                                 temperature=0.8, **term).loss, (s,))


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd", None])
def test_analytic_gradients(divergence):
    """Advantages 0 (the policy term and its gradient vanish): the gradient is the entropy's or the divergence's,
    SPEC 2b / 2c: entropy -p (log p + H) / tau; forward KL p_S - p_T; reverse KL p_S (log p_S - log p_T - D)."""
    tau = 0.8
    inp = make_inputs(B=2, T=4, V=13, dtype=torch.float64, seed=7, ignore_frac=0.0, mask_frac=0.0)
    inp["advantages"] = torch.zeros(2, 4, dtype=torch.float64)
    kw = dict(entropy_coef=1.0) if divergence is None else dict(distill_coef=1.0, distill_divergence=divergence)
    out, grad = _run(inp, temperature=tau, **kw)
    ls = torch.log_softmax(inp["student_logits"] / tau, -1)
    lt = torch.log_softmax(inp["teacher_logits"] / tau, -1)
    ps, pt = ls.exp(), lt.exp()
    if divergence is None:
        H = -(ps * ls).sum(-1, keepdim=True)
        expect = -(-ps * (ls + H)) / tau
        assert out.metrics["entropy_mean"] == pytest.approx(H.mean().item(), rel=1e-6)
    elif divergence == "forward_kl":
        expect = (ps - pt) / tau
    elif divergence == "reverse_kl":
        D = (ps * (ls - lt)).sum(-1, keepdim=True)
        expect = ps * (ls - lt - D) / tau
    else:
        lm = (0.5 * ps + 0.5 * pt).log()
        klm = (ps * (ls - lm)).sum(-1, keepdim=True)
        expect = 0.5 * ps * (ls - lm - klm) / tau
    torch.testing.assert_close(grad, expect / 8, rtol=1e-10, atol=1e-13)
    if divergence is not None:  # advantages 0 and distill_coef 1 is OPSD
        loss, _ = reference.opsd_loss(inp["student_logits"], inp["teacher_logits"], inp["labels"],
                                      divergence=divergence, temperature=tau)
        torch.testing.assert_close(out.loss, loss, rtol=1e-12, atol=1e-14)


# ------------------------------------------------------------------------------------ off is exactly today
@pytest.mark.parametrize("loss_type", ["ppo", "cispo"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_terms_off_is_bit_identical(loss_type, dtype):
    inp = make_inputs(B=2, T=6, V=29, dtype=dtype, seed=8)
    off = dict(ref_logprobs=inp["old_logprobs"], kl_coef=0.0, kl_type="k3", rollout_logprobs=inp["old_logprobs"],
               rollout_is=None, rollout_is_threshold=2.0, rollout_is_mode="truncate", entropy_coef=0.0,
               distill_coef=0.0, distill_divergence="forward_kl", distill_beta=0.5, distill_clip=None)
    a, ga = _run(inp, lam=0.5, loss_type=loss_type, return_entropy=True)
    b, gb = _run(inp, lam=0.5, loss_type=loss_type, return_entropy=True, **off)
    assert torch.equal(a.loss, b.loss) and torch.equal(ga, gb)
    assert torch.equal(a.logprobs, b.logprobs) and torch.equal(a.weights, b.weights)
    assert torch.equal(a.entropy, b.entropy)
    assert a.metrics == b.metrics and list(b.metrics) == list(reference_metric_names())


# ----------------------------------------------------------------------------------------------- validation
BAD = [
    (dict(kl_coef=0.1), "ref_logprobs"),
    (dict(kl_coef=-0.1, ref_logprobs="ok"), "kl_coef"),
    (dict(kl_coef=0.1, ref_logprobs="short"), "ref_logprobs"),
    (dict(kl_coef=0.1, ref_logprobs="ok", kl_type="k4"), "kl_type"),
    (dict(rollout_is="token"), "rollout_logprobs"),
    (dict(rollout_is="batch", rollout_logprobs="ok"), "rollout_is"),
    (dict(rollout_is="token", rollout_logprobs="ok", rollout_is_threshold=1.0), "rollout_is_threshold"),
    (dict(rollout_is="token", rollout_logprobs="ok", rollout_is_mode="clip"), "rollout_is_mode"),
    (dict(rollout_logprobs="short"), "rollout_logprobs"),
    (dict(entropy_coef=-1.0), "entropy_coef"),
    (dict(distill_coef=-1.0), "distill_coef"),
    (dict(distill_coef=1.0, teacher_logits=None, teacher_logprobs="ok"), "distill_coef"),
    (dict(distill_coef=1.0, teacher_logits=None), "distill_coef"),
    (dict(distill_coef=1.0, distill_divergence="tvd"), "distill_divergence"),
    (dict(distill_coef=1.0, distill_divergence="jsd", distill_beta=1.0), "distill_beta"),
    (dict(distill_coef=1.0, distill_divergence="jsd", distill_beta=0.0), "distill_beta"),
    (dict(distill_coef=1.0, distill_clip=0.0), "distill_clip"),
    (dict(loss_type="gspo", flat=True), "gspo"),
    (dict(rollout_is="sequence", rollout_logprobs="ok", flat=True), "rollout_is"),
    (dict(loss_type="gpo"), "loss_type"),
]


def bad_call(bad, dtype=torch.float64):
    """The keyword arguments of a call with one ``BAD`` entry applied ("ok" / "short": a per-token tensor of the
    right / a wrong shape; ``flat``: 1-D labels, no sequence structure)."""
    inp = make_inputs(B=2, T=3, V=7, dtype=dtype, seed=9, device="cpu")
    bad = dict(bad)
    if bad.pop("flat", False):
        inp = {k: (v.reshape(6, *v.shape[2:]) if isinstance(v, torch.Tensor) else v) for k, v in inp.items()}
    lead = inp["labels"].shape
    for k, v in list(bad.items()):
        if v == "ok":
            bad[k] = torch.zeros(lead, dtype=dtype)
        elif v == "short":
            bad[k] = torch.zeros(lead[0], dtype=dtype)
    return dict(inp, **bad)


@pytest.mark.parametrize("bad,name", BAD, ids=[n + str(i) for i, (_, n) in enumerate(BAD)])
def test_validation(bad, name):
    with pytest.raises(ValueError, match=name):
        reference.rlsd_loss_eager(**bad_call(bad))
