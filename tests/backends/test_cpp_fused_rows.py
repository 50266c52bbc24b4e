"""The C++ backend's fused rows (``ops/fused_rows.py``, ``csrc/rlsd_fused_rows.h``): the loss's forward and its whole
gradient in one visit of each row, with the per-token gradient factors computed in C++ (``csrc/rlsd_token_coef.h``).

At vocabularies of several chunks and on rows that stress the chunked walk (the max in the last chunk, a first chunk of
only -inf, +-1e4 logits, -inf entries), every token-local configuration is checked against the float64 reference
(docs/math.md section 7, float32 tolerance) and against the two-pass path (forward, Python algebra, gradient sweep):
the same per-token outputs bit for bit, the same loss and metrics, gradients within the tolerance."""
import pytest
import torch

import rlsd_kernels
from rlsd_kernels import dispatch, reference
from rlsd_kernels.backends.logits import cpp

pytestmark = pytest.mark.skipif(not cpp.available(), reason="C++ backend could not be built")

TOL = dict(rtol=1e-5, atol=1e-6)  # docs/math.md section 7, float32 inputs
B, T, V = 2, 5, 4500  # three chunks of 2048
HP = dict(lam=0.5, eps_w=0.2, clip_low=0.2, clip_high=0.28, clip_dual=3.0)
CASES = {
    "ppo": {},
    "cispo": dict(loss_type="cispo"),
    "grpo": dict(lam=0.0, _teacher=None),
    "teacher_logprobs": dict(_teacher="logprobs"),
    "on_policy": dict(_old=None),
    "k1": dict(kl_coef=0.3, kl_type="k1"),
    "k2": dict(kl_coef=0.3, kl_type="k2"),
    "k3": dict(kl_coef=0.3),
    "is_token_truncate": dict(rollout_is="token", rollout_is_threshold=1.5),
    "is_seq_mask": dict(rollout_is="sequence", rollout_is_threshold=1.5, rollout_is_mode="mask"),
    "entropy": dict(entropy_coef=0.05),
    "forward_kl": dict(distill_coef=0.7),
    "reverse_kl": dict(distill_coef=0.7, distill_divergence="reverse_kl"),
    "jsd": dict(distill_coef=0.7, distill_divergence="jsd", distill_beta=0.3),
    "forward_kl_clip": dict(distill_coef=0.7, distill_clip=0.5),
    "all_token_local": dict(kl_coef=0.2, kl_type="k3", rollout_is="token", rollout_is_threshold=1.5,
                            entropy_coef=0.05, distill_coef=0.5, distill_divergence="jsd", loss_type="cispo"),
}


def _inputs(seed=0, strided=False):
    """float32 [B, T, V] logits with stress rows, and the per-token inputs near the student's own log-probs."""
    g = torch.Generator().manual_seed(seed)
    Tt = T + 1 if strided else T
    s = torch.randn(B * Tt, V, generator=g) * 3
    t = s + torch.randn(B * Tt, V, generator=g)
    s[1] = torch.linspace(-30.0, 20.0, V)
    t[1] = torch.linspace(-20.0, 25.0, V) + torch.randn(V, generator=g)
    s[2, :2048] = t[2, :2048] = float("-inf")
    s[3] = torch.where(torch.arange(V) % 2 == 0, 1e4, -1e4)
    t[3] = s[3] + torch.randn(V, generator=g)
    s[4, ::7] = t[4, ::7] = float("-inf")
    s[5] *= 10
    s, t = s.view(B, Tt, V), t.view(B, Tt, V)
    if strided:  # the causal-LM shift: logits[:, :-1]
        s, t = s[:, :-1], t[:, :-1]
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[0, 2] = 2500  # row 2: its -inf first chunk ends at 2048
    labels[0, 4] = 1  # row 4: keep the target off the -inf entries (index % 7 == 0)
    labels[1, 1] = -100
    lp = reference.token_logprobs_eager(s.double(), labels.clamp(min=0))
    noise = lambda k: k * torch.randn(B, T, generator=g, dtype=torch.float64)  # noqa: E731
    old = (lp + noise(0.3)).float()
    return dict(student_logits=s, teacher_logits=t, labels=labels, advantages=torch.randn(B, T, generator=g),
                old_logprobs=old, mask=torch.rand(B, T, generator=g) > 0.15), dict(
        ref_logprobs=(lp + noise(1.0)).float(), rollout_logprobs=(old.double() + noise(0.6)).float(),
        teacher_logprobs=reference.token_logprobs_eager(t.double(), labels.clamp(min=0)).float())


def _term_inputs(kw, extra):
    """The per-token inputs the terms in ``kw`` need (reference / rollout log-probs), added to ``kw``."""
    if "kl_coef" in kw:
        kw["ref_logprobs"] = extra["ref_logprobs"]
    if "rollout_is" in kw:
        kw["rollout_logprobs"] = extra["rollout_logprobs"]


def _call(inp, extra, case, fn=rlsd_kernels.rlsd_loss, dtype=None, **more):
    kw = dict(HP, **CASES[case], **more)
    args = dict(inp)
    if kw.pop("_teacher", "logits") != "logits":
        args["teacher_logits"] = None
        if CASES[case].get("_teacher") == "logprobs":
            args["teacher_logprobs"] = extra["teacher_logprobs"]
    if "_old" in kw:
        kw.pop("_old")
        args["old_logprobs"] = None
    _term_inputs(kw, extra)
    s = args["student_logits"].detach()
    s = (s.double() if dtype == torch.float64 else s).clone().requires_grad_()
    if dtype == torch.float64 and args["teacher_logits"] is not None:
        args["teacher_logits"] = args["teacher_logits"].double()
    out = fn(**dict(args, student_logits=s), **kw)
    (grad,) = torch.autograd.grad(out.loss, s)
    return out, grad


@pytest.fixture
def calls(monkeypatch):
    """How many times the fused rows kernel ran."""
    return _count_calls(monkeypatch, "fused_rows")


def _count_calls(monkeypatch, name):
    """A one-element list counting the calls of the C++ backend's ``name``."""
    n = [0]
    real = getattr(cpp, name)

    def counting(*a, **k):
        n[0] += 1
        return real(*a, **k)

    monkeypatch.setattr(cpp, name, counting)
    return n


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("case", list(CASES))
def test_fused_rows_match_the_reference(case, temperature, calls):
    inp, extra = _inputs()
    with dispatch.force_backend("cpp"):
        out, grad = _call(inp, extra, case, temperature=temperature, return_entropy=True)
    assert calls[0] == 1
    ref, ref_grad = _call(inp, extra, case, fn=reference.rlsd_loss_eager, dtype=torch.float64,
                          temperature=temperature, return_entropy=True)
    torch.testing.assert_close(out.loss.double(), ref.loss, **TOL)
    torch.testing.assert_close(out.logprobs.double(), ref.logprobs.double(), **TOL)
    torch.testing.assert_close(out.entropy.double(), ref.entropy.double(), **TOL)
    torch.testing.assert_close(grad.double(), ref_grad, **TOL)
    # (metrics: the two-pass test below holds them equal; at log-probs of -2e4 (the +-1e4 row) a float32 metric
    # such as ppo_kl = mean(old - logp) carries the 1e-3 ulp of its inputs, so it is compared there, not here)


@pytest.mark.parametrize("strided", [False, True])
@pytest.mark.parametrize("case", list(CASES))
def test_fused_rows_equal_the_two_pass_path(case, strided, monkeypatch):
    """The kernel's per-token outputs are the two-pass forward's bit for bit, so the loss and metrics are too; the
    gradients (C++ float64 factors and p = u * exp(m_c - m) / d, against float32 factors and exp(x - lse)) agree
    within the tolerance."""
    inp, extra = _inputs(seed=1, strided=strided)
    with dispatch.force_backend("cpp"):
        out, grad = _call(inp, extra, case, return_entropy=True)
        monkeypatch.delattr(cpp, "fused_rows")
        two, two_grad = _call(inp, extra, case, return_entropy=True)
    assert torch.equal(out.logprobs, two.logprobs) and torch.equal(out.entropy, two.entropy)
    assert torch.equal(out.loss, two.loss) and out.metrics == two.metrics
    torch.testing.assert_close(grad, two_grad, **TOL)


@pytest.mark.parametrize("kw,forward,backward", [
    ({}, 1, 0),
    (dict(entropy_coef=0.1), 1, 0),
    (dict(loss_type="gspo"), 0, 0),  # a sequence ratio of the log-probs: not token-local
    (dict(rollout_is="token", _no_old=True), 0, 0),  # the IS ratio is then the log-probs' own
    (dict(inplace_backward=True), 0, 1),  # the in-place backward on the fused rows' arithmetic
    (dict(kl_coef=0.1, inplace_backward=True), 0, 0),  # the terms' in-place path: two passes
])
def test_which_calls_the_fused_rows_serve(kw, forward, backward, calls, monkeypatch):
    inplace_calls = _count_calls(monkeypatch, "fused_inplace")
    inp, extra = _inputs()
    kw = dict(HP, **kw)
    if kw.pop("_no_old", False):
        inp["old_logprobs"] = None
    _term_inputs(kw, extra)
    s = inp["student_logits"].clone().requires_grad_()
    with dispatch.force_backend("cpp"):
        out = rlsd_kernels.rlsd_loss(**dict(inp, student_logits=s * 1), **kw)
        assert (calls[0], inplace_calls[0]) == (forward, 0)
        out.loss.backward()
    assert (calls[0], inplace_calls[0]) == (forward, backward)
    assert torch.isfinite(s.grad).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", ["ppo", "cispo", "grpo", "teacher_logprobs", "on_policy"])
def test_inplace_backward_is_the_out_of_place_gradient_bit_for_bit(case, dtype):
    """Over several chunks and the stress rows (-inf chunk, +-1e4, nan-free -inf entries), strided logits, and a
    grad_output that is not 1."""
    inp, extra = _inputs(seed=3, strided=True)
    inp = dict(inp, student_logits=inp["student_logits"].to(dtype), teacher_logits=inp["teacher_logits"].to(dtype))
    with dispatch.force_backend("cpp"):
        out, want = _call(inp, extra, case, fn=_scaled)
        got_out, got = _call(inp, extra, case, fn=_scaled, inplace=True)
    assert torch.equal(got, want) and torch.equal(got_out.loss, out.loss)


def _scaled(inplace=False, **args):
    """rlsd_loss with a grad_output of 2.5; in place: into a non-leaf copy of the logits (as from an LM head)."""
    if inplace:
        args = dict(args, student_logits=args["student_logits"] * 1, inplace_backward=True)
    out = rlsd_kernels.rlsd_loss(**args)
    return out._replace(loss=2.5 * out.loss)


def test_no_gradient_no_kernel(calls):
    inp, _ = _inputs()
    with dispatch.force_backend("cpp"), torch.no_grad():
        rlsd_kernels.rlsd_loss(**inp, **HP, entropy_coef=0.1)
    assert calls[0] == 0


def test_grad_output_scales_and_second_backward_raises():
    inp, extra = _inputs()
    with dispatch.force_backend("cpp"):
        _, want = _call(inp, extra, "entropy")
        s = inp["student_logits"].clone().requires_grad_()
        out = rlsd_kernels.rlsd_loss(**dict(inp, student_logits=s), **HP, **CASES["entropy"])
        (2.5 * out.loss).backward(retain_graph=True)
        torch.testing.assert_close(s.grad, 2.5 * want)
        with pytest.raises(RuntimeError, match="one backward only"):
            out.loss.backward()
