"""The C++ CPU backend against the float64 reference (docs/math.md section 7), at the backend interface and through
``rlsd_loss``. Skipped when the extension cannot be built (no compiler)."""
import warnings

import pytest
import torch

from rlsd_kernels import reference as R
from rlsd_kernels import rlsd_loss
from rlsd_kernels._layout import as_rows3d
from rlsd_kernels.backends.logits import cpp
from rlsd_kernels.dispatch import select_backend, force_backend

pytestmark = pytest.mark.skipif(not cpp.available(), reason="C++ backend could not be built")

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
IGN = -100


def _gen(*shape, scale=3.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g) * scale


def _labels(shape, V, seed=1, ignore_every=5):
    g = torch.Generator().manual_seed(seed)
    lab = torch.randint(0, V, shape, generator=g)
    flat = lab.view(-1)
    flat[::ignore_every] = IGN
    return lab


def _ref_forward(x, labels, temperature):
    """float64 log-probs, entropy and lse of x [..., V]."""
    lp, ent = R.token_logprobs_eager(x.double(), labels, temperature, True, ignore_index=IGN)
    lse = torch.logsumexp(x.double() / temperature, -1)
    return lp.reshape(-1), ent.reshape(-1), lse.reshape(-1)


def _eager_err(x, labels, temperature, ref):
    """Error of eager PyTorch run in x's dtype: the yardstick for bf16/fp16 (docs/math.md section 7)."""
    lp = R.token_logprobs_eager(x, labels, temperature, ignore_index=IGN, compute_dtype=x.dtype).reshape(-1)
    return (lp.double() - ref).abs().max().item()


def _ref_grad(x, labels, grad_logp, temperature):
    """float64 autograd of sum(grad_logp * logp) w.r.t. the logits."""
    x64 = x.detach().double().requires_grad_(True)
    lp = R.token_logprobs_eager(x64, labels, temperature, ignore_index=IGN)
    (lp.reshape(-1) * grad_logp.double()).sum().backward()
    return x64.grad


def _eager_grad_err(x, labels, grad_logp, temperature, ref):
    xe = x.detach().clone().requires_grad_(True)
    lp = R.token_logprobs_eager(xe, labels, temperature, ignore_index=IGN, compute_dtype=x.dtype)
    (lp.reshape(-1) * grad_logp.to(x.dtype)).sum().backward()
    return (xe.grad.double() - ref).abs().max().item()


def _close(actual, expected, dtype, eager_err=None, rtol=1e-5, atol=1e-6):
    actual = actual.double()
    if dtype in (torch.float32, torch.float64):
        torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol)
    else:
        err = (actual - expected).abs().max().item()
        assert err <= eager_err + 1e-3, (err, eager_err)


def _run_backend(student, teacher, labels, temperature, want_entropy=True):
    s3 = as_rows3d(student)
    t3 = as_rows3d(teacher) if teacher is not None else None
    return cpp.forward(s3, t3, labels.reshape(-1).long().contiguous(), temperature, IGN, want_entropy)


# --------------------------------------------------------------------------------------------- forward
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_forward_matches_float64(dtype, temperature):
    B, T, V = 3, 7, 5003
    s = _gen(B, T + 1, V).to(dtype)[:, :-1]  # the causal-LM shift: a strided, non-contiguous view
    t = _gen(B, T, V, seed=5).to(dtype)
    lab = _labels((B, T), V)
    logp_s, logp_t, lse, ent = _run_backend(s, t, lab, temperature)
    ref_s, ref_ent, ref_lse = _ref_forward(s, lab, temperature)
    ref_t = _ref_forward(t, lab, temperature)[0]
    _close(logp_s, ref_s, dtype, _eager_err(s, lab, temperature, ref_s))
    _close(logp_t, ref_t, dtype, _eager_err(t, lab, temperature, ref_t))
    _close(lse, ref_lse, dtype, 0.0)
    # entropy: float32 accumulation, the backend keeps it relative to the running max (no lse - E[x] cancellation)
    torch.testing.assert_close(ent.double(), ref_ent, rtol=1e-5, atol=2e-6)
    assert (logp_s.view(-1)[::5] == 0).all() and (logp_t.view(-1)[::5] == 0).all()


def test_forward_without_teacher_or_entropy():
    s = _gen(2, 5, 333)
    lab = _labels((2, 5), 333)
    logp_s, logp_t, lse, ent = _run_backend(s, None, lab, 1.0, want_entropy=False)
    assert logp_t is None and ent is None
    torch.testing.assert_close(logp_s.double(), _ref_forward(s, lab, 1.0)[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_large_vocab_few_rows(dtype):
    V = 151936
    s = _gen(1, 3, V).to(dtype)
    t = _gen(1, 3, V, seed=9).to(dtype)
    lab = torch.tensor([[0, V - 1, 77777]])
    logp_s, logp_t, lse, ent = _run_backend(s, t, lab, 1.0)
    ref_s, ref_ent, ref_lse = _ref_forward(s, lab, 1.0)
    _close(logp_s, ref_s, dtype, _eager_err(s, lab, 1.0, ref_s))
    _close(logp_t, _ref_forward(t, lab, 1.0)[0], dtype, _eager_err(t, lab, 1.0, _ref_forward(t, lab, 1.0)[0]))
    torch.testing.assert_close(ent.double(), ref_ent, rtol=1e-5, atol=2e-6)
    g = torch.tensor([0.5, -1.0, 2.0])
    out = torch.empty(as_rows3d(s).shape, dtype=dtype)
    cpp.backward(g, as_rows3d(s), lab.view(-1), lse, 1.0, out)
    ref = _ref_grad(s, lab, g, 1.0)
    _close(out.view_as(s), ref, dtype, _eager_grad_err(s, lab, g, 1.0, ref))


def test_extreme_logits():
    V = 1000
    s = _gen(6, V)
    s[0] = 1e4 * torch.sign(s[0])  # +-1e4
    s[1] = 2.5  # a row of equal logits
    s[2, ::3] = float("-inf")  # -inf entries
    s[3, :-1] = float("-inf")  # a single finite entry
    s[4, 0] = 1e4
    s[5, 10] = -1e4
    lab = torch.tensor([int(torch.argmax(s[0])), 17, 4, V - 1, 0, 10])
    t = s.flip(0).contiguous()
    for temperature in (1.0, 0.5):
        logp_s, logp_t, lse, ent = _run_backend(s, t, lab, temperature)
        ref_s, ref_ent, ref_lse = _ref_forward(s, lab, temperature)
        torch.testing.assert_close(logp_s.double(), ref_s, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(logp_t.double(), _ref_forward(t, lab, temperature)[0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(lse.double(), ref_lse, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(ent.double(), ref_ent, rtol=1e-5, atol=2e-6)
        g = torch.linspace(-1, 1, 6)
        out = torch.empty(as_rows3d(s).shape)
        cpp.backward(g, as_rows3d(s), lab, lse, temperature, out)
        torch.testing.assert_close(out.view_as(s).double(), _ref_grad(s, lab, g, temperature), rtol=1e-5, atol=1e-6)


def test_target_on_minus_inf_entry_and_all_minus_inf_row():
    V = 64
    s = _gen(3, V)
    s[0, 5] = float("-inf")
    s[2] = float("-inf")  # the whole row
    lab = torch.tensor([5, 1, 3])
    logp_s, _, lse, _ = _run_backend(s, None, lab, 1.0)
    assert logp_s[0] == float("-inf") and torch.isfinite(logp_s[1])
    assert lse[2] == float("-inf")
    out = torch.full(as_rows3d(s).shape, 7.0)
    cpp.backward(torch.ones(3), as_rows3d(s), lab, lse, 1.0, out)
    out = out.view_as(s)
    assert torch.isfinite(out[:2]).all()
    assert (out[2] == 0).all()  # a row with lse = -inf gets zero gradient, not nan
    assert out[0, 5] == 1.0  # onehot - p with p = 0 at the -inf target



@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_backward_float32_chunks_straight_to_the_output(temperature):
    """At temperature 1 whole float32 chunks of unit stride go from the row straight to the output
    (``grad_chunk_f32``); the target's chunk, a ragged last chunk, strided views and other temperatures go through
    the chunk buffer. Every way gives the float64 gradient and the same bits, in place too (the output aliasing the
    logits) and through the row terms' sweep, with a row at |lse| > 32 (exact statistics) and an ignored row."""
    V = 2 * 2048 + 48  # two whole chunks and a last one of 48 (a multiple of the 16 lanes: straight too)
    s = _gen(1, 6, V)
    s[0, 1] += 100.0  # lse ~ 100: the backward recomputes the row's (max, sum)
    lab = torch.tensor([[3, 2100, IGN, V - 1, 4100, 0]])  # the target in each chunk in turn
    g = torch.tensor([0.5, -1.0, 0.0, 1.5, -0.25, 1.0])  # (the op gives ignored rows a zero coefficient)
    lse = _run_backend(s, None, lab, temperature)[2]
    ref = _ref_grad(s, lab, g, temperature)
    out = torch.empty(as_rows3d(s).shape)
    cpp.backward(g, as_rows3d(s), lab.view(-1), lse, temperature, out)
    _close(out.view_as(s), ref, torch.float32)
    strided = torch.empty(1, 6, V, 2)[..., 0].copy_(s)  # vocabulary stride 2: every chunk through the buffer
    out_strided = torch.empty(as_rows3d(s).shape)
    cpp.backward(g, as_rows3d(strided), lab.view(-1), lse, temperature, out_strided)
    assert torch.equal(out, out_strided)
    inplace = as_rows3d(s.clone())
    cpp.backward(g, inplace, lab.view(-1), lse, temperature, inplace)
    assert torch.equal(inplace, out)
    assert (out[0, 2] == 0).all()  # the ignored row
    # the row terms' sweep with no term on (GSPO's chunks in the fused linear op) takes the same chunks
    for x in (s, strided):
        out_terms = torch.empty(as_rows3d(s).shape)
        cpp.backward_terms(g, None, None, as_rows3d(x), None, lab.view(-1), lse.double(), None, None, None, None,
                           temperature, 0, 0.5, out_terms)
        assert torch.equal(out_terms, out)

def test_nan_logit_makes_its_row_nan():
    # the max reductions must propagate nan: a row whose other entries are all -inf (one chunk, or a nan alone in a
    # later chunk) would otherwise get max = -inf, skip its sums and look like an all--inf row (lse = -inf, zero grad)
    V = 5000  # three 2048-element chunks
    s = _gen(4, V)
    s[0, 17] = float("nan")  # among finite logits
    s[1] = float("-inf")
    s[1, 4000] = float("nan")  # alone in the third chunk, after two chunks of -inf
    s[2] = float("-inf")
    s[2, 100] = float("nan")  # among -inf in its own chunk
    s[3, 9] = float("nan")  # the label's own logit
    lab = torch.tensor([3, 4000, 5, 9])
    for dtype in (torch.float32, torch.bfloat16):
        x = s.to(dtype)
        logp_s, logp_t, lse, ent = _run_backend(x, x, lab, 1.0)
        for v in (logp_s, logp_t, lse, ent):
            assert torch.isnan(v).all(), v
        out = torch.empty(as_rows3d(x).shape, dtype=dtype)
        cpp.backward(torch.tensor([1.0, -2.0, 0.5, 1.0]), as_rows3d(x), lab, lse, 1.0, out)
        assert torch.isnan(out).all()
        cpp.backward(torch.zeros(4), as_rows3d(x), lab, lse, 1.0, out)  # zero coefficient: masked, exactly 0
        assert (out == 0).all()


def test_ignored_rows_zero_logprob_and_zero_grad():
    s = _gen(4, 100)
    lab = torch.tensor([IGN, 3, IGN, 99])
    logp_s, logp_t, lse, _ = _run_backend(s, s * 2, lab, 1.0)
    assert logp_s[0] == 0 and logp_s[2] == 0 and logp_t[0] == 0
    out = torch.full((1, 4, 100), 3.0)
    cpp.backward(torch.tensor([0.0, 1.0, 0.0, 1.0]), as_rows3d(s), lab, lse, 1.0, out)
    assert (out[0, 0] == 0).all() and (out[0, 2] == 0).all()


def test_empty_batch():
    s = torch.empty(0, 10)
    logp_s, _, lse, ent = _run_backend(s, None, torch.empty(0, dtype=torch.long), 1.0)
    assert logp_s.numel() == 0 and lse.numel() == 0 and ent.numel() == 0


# --------------------------------------------------------------------------------------------- strides
def _strided_cases(dtype):
    N, V = 12, 257
    base = _gen(V, N + 3).to(dtype)
    yield "noncontig_vocab", base[:, :N].t()  # vocabulary stride N + 3
    big = _gen(2, 8, 2 * V).to(dtype)
    yield "every_other_vocab", big[..., ::2][:, :6]  # V stride 2 and a row slice
    yield "stride0_batch", _gen(1, 6, V).to(dtype).expand(3, 6, V)  # stride 0 on B


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_strided_inputs(dtype):
    for name, x in _strided_cases(dtype):
        lead = x.shape[:-1]
        V = x.shape[-1]
        lab = _labels(lead, V, ignore_every=4)
        teacher = x.contiguous() * 0.5
        logp_s, logp_t, lse, ent = _run_backend(x, teacher, lab, 0.9)
        ref_s, _, _ = _ref_forward(x, lab, 0.9)
        _close(logp_s, ref_s, dtype, _eager_err(x, lab, 0.9, ref_s))
        ref_t = _ref_forward(teacher, lab, 0.9)[0]
        _close(logp_t, ref_t, dtype, _eager_err(teacher, lab, 0.9, ref_t))
        # backward into a strided (non-contiguous) output buffer
        g = torch.randn(lab.numel(), generator=torch.Generator().manual_seed(3))
        g[lab.reshape(-1) == IGN] = 0  # the interface contract: ignored rows come with grad_logp = 0
        x3 = as_rows3d(x)
        out_big = torch.zeros(*x3.shape[:-1], 2 * V, dtype=dtype)
        out = out_big[..., ::2]
        cpp.backward(g, x3, lab.reshape(-1), lse, 0.9, out)
        ref = _ref_grad(x, lab, g, 0.9)
        _close(out.reshape(x.shape), ref, dtype, _eager_grad_err(x, lab, g, 0.9, ref))
        assert (out_big[..., 1::2] == 0).all(), name  # nothing written between the strided elements


# --------------------------------------------------------------------------------------------- backward
@pytest.mark.parametrize("dtype", DTYPES)
def test_backward_matches_float64_and_inplace(dtype):
    B, T, V, temp = 2, 5, 5003, 0.8
    s = _gen(B, T, V).to(dtype)
    lab = _labels((B, T), V)
    _, _, lse, _ = _run_backend(s, None, lab, temp, want_entropy=False)
    g = torch.randn(B * T, generator=torch.Generator().manual_seed(2))
    g[lab.view(-1) == IGN] = 0
    out = torch.empty_like(s)
    cpp.backward(g, s, lab.view(-1), lse, temp, out)
    ref = _ref_grad(s, lab, g, temp)
    _close(out, ref, dtype, _eager_grad_err(s, lab, g, temp, ref))
    inplace = s.clone()
    cpp.backward(g, inplace, lab.view(-1), lse, temp, inplace)
    assert torch.equal(inplace, out)


def test_bf16_target_term_formed_in_float32():
    # p[y] close to 1: 1 - p must be formed in float32 (bf16 would give exactly 0 or a coarse step)
    V = 50
    s = torch.full((1, 1, V), -12.0, dtype=torch.bfloat16)
    s[0, 0, 7] = 8.0
    lab = torch.tensor([7])
    _, _, lse, _ = _run_backend(s, None, lab, 1.0)
    out = torch.empty_like(s)
    cpp.backward(torch.ones(1), s, lab, lse, 1.0, out)
    ref = _ref_grad(s, lab.view(1, 1), torch.ones(1), 1.0)
    assert out[0, 0, 7] > 0
    torch.testing.assert_close(out.double(), ref, rtol=1e-2, atol=1e-12)


def test_mixed_student_teacher_dtypes():
    s = _gen(3, 400).to(torch.bfloat16)
    t = _gen(3, 400, seed=4)
    lab = torch.tensor([1, 2, 399])
    _, logp_t, _, _ = _run_backend(s, t, lab, 1.0)
    torch.testing.assert_close(logp_t.double(), _ref_forward(t, lab, 1.0)[0], rtol=1e-5, atol=1e-6)


def test_thread_count_does_not_change_results():
    s = _gen(64, 3001)
    lab = _labels((64,), 3001)
    prev = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _run_backend(s, s.flip(0), lab, 1.0)
        torch.set_num_threads(max(2, prev))
        many = _run_backend(s, s.flip(0), lab, 1.0)
    finally:
        torch.set_num_threads(prev)
    for a, b in zip(one, many):
        assert torch.equal(a, b)


# --------------------------------------------------------------------------------------------- full loss
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("inplace", [False, True])
def test_rlsd_loss_through_cpp_backend(dtype, inplace):
    B, T, V = 3, 9, 5003
    full = _gen(B, T + 1, V, scale=2.0).to(dtype)
    teacher = _gen(B, T, V, scale=2.0, seed=7).to(dtype)
    lab = _labels((B, T), V, ignore_every=7)
    adv = torch.tensor([1.0, -0.5, 0.0])
    old = R.token_logprobs_eager(full[:, :-1].double(), lab, 0.9, ignore_index=IGN).float() + 0.05
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[1, -2:] = False
    kw = dict(lam=0.7, temperature=0.9, ignore_index=IGN)

    leaf = full.clone().requires_grad_(True)
    x = leaf.detach().clone()[:, :-1] if inplace else leaf[:, :-1]
    if inplace:
        x.requires_grad_(True)
    with force_backend("cpp"):
        out = rlsd_loss(x, teacher, lab, adv, old, mask, inplace_backward=inplace, return_entropy=True, **kw)
    out.loss.backward()
    grad = x if inplace else leaf.grad[:, :-1]
    if inplace:
        grad = x.detach()  # the gradient was written into the logits buffer itself

    x64 = full[:, :-1].double().requires_grad_(True)
    ref = R.rlsd_loss_eager(x64, teacher.double(), lab, adv, old, mask, return_entropy=True, **kw)
    ref.loss.backward()
    if dtype == torch.float32:
        torch.testing.assert_close(out.loss.double(), ref.loss, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(out.logprobs.double(), ref.logprobs, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(out.teacher_logprobs.double(), ref.teacher_logprobs, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(grad.double(), x64.grad, rtol=1e-5, atol=1e-6)
    else:
        xe = full[:, :-1].clone().requires_grad_(True)
        eager = R.rlsd_loss_eager(xe, teacher, lab, adv, old, mask, compute_dtype=dtype, **kw)
        eager.loss.backward()
        assert abs(out.loss.item() - ref.loss.item()) <= abs(eager.loss.item() - ref.loss.item()) + 1e-3
        assert (grad.double() - x64.grad).abs().max() <= (xe.grad.double() - x64.grad).abs().max() + 1e-3
    torch.testing.assert_close(out.entropy.double(), ref.entropy, rtol=1e-4, atol=1e-5)


def test_token_logprobs_inplace_equals_out_of_place():
    from rlsd_kernels import token_logprobs

    s = _gen(4, 6, 777)
    lab = _labels((4, 6), 777)
    w = torch.randn(4, 6, generator=torch.Generator().manual_seed(8))
    with force_backend("cpp"):
        a = s.clone().requires_grad_(True)
        (token_logprobs(a, lab) * w).sum().backward()
        b = s.clone().requires_grad_(True)
        (token_logprobs(b, lab, inplace_backward=True) * w).sum().backward()
    assert torch.equal(b.detach(), a.grad)


# --------------------------------------------------------------------------------------------- dispatch
def test_dispatch_prefers_cpp_on_cpu(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.delenv("RLSD_BACKEND", raising=False)
    assert select_backend(torch.device("cpu")) == "cpp"
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("RLSD_BACKEND", "cpp")
    assert select_backend(torch.device("cpu")) == "cpp"


def test_build_failure_falls_back_with_one_warning(monkeypatch):
    def boom():
        raise OSError("no compiler here")

    monkeypatch.setattr(cpp, "_module", None)
    monkeypatch.setattr(cpp, "_error", None)
    monkeypatch.setattr(cpp, "_build", boom)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.delenv("RLSD_BACKEND", raising=False)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        assert not cpp.available()
        assert not cpp.available()
        assert select_backend(torch.device("cpu")) == "reference"
    assert len([w for w in rec if "C++ CPU backend" in str(w.message)]) == 1
    with pytest.raises(RuntimeError, match="no compiler here"):
        cpp.forward(torch.zeros(1, 1, 3), None, torch.zeros(1, dtype=torch.long), 1.0, IGN, False)


def test_sources_found():
    assert (cpp.source_dir() / "rlsd_cpu.cpp").is_file()
