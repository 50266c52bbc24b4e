"""Fused linear RLSD (hidden states + LM-head weight): against the float64 reference on materialised logits."""
import pytest
import torch

import rlsd_kernels
from rlsd_kernels import reference, rlsd_linear_loss, token_logprobs_linear
from rlsd_kernels.backends.linear import chunked
from rlsd_kernels.linear import linear_backend

from conftest import BACKENDS, DEVICE
from helpers import Backend, linear_params, randn, running_on

B, T, H, V = 3, 5, 40, 1003  # odd V and H: no dimension is a multiple of any block
CPU = torch.device("cpu")


@pytest.fixture
def path(linear_path):
    """The fused linear op's chunks over the C++ (else reference) logits backend (CPU tensors) and, on a GPU machine,
    over Triton (CUDA tensors). Build tensors on ``path.device``."""
    assert linear_backend(linear_path.device) == linear_path.linear
    return linear_path


def _inputs(device, seed=0, dtype=torch.float64, bias=True, teacher=True, scale=0.3):
    """float64 inputs on ``device`` (drawn on the CPU: the same numbers on every machine)."""
    g = torch.Generator().manual_seed(seed)
    f64 = dict(generator=g, dtype=torch.float64, device=CPU)
    h = torch.randn(B, T, H, **f64)
    w = torch.randn(V, H, **f64) * scale
    b = torch.randn(V, **f64) if bias else None
    th = (h + 0.5 * torch.randn(B, T, H, **f64)) if teacher else None
    labels = torch.randint(0, V, (B, T), generator=g, device=CPU)
    labels[0, 1] = -100
    mask = torch.ones(B, T, dtype=torch.bool, device=CPU)
    mask[2, 3:] = False
    adv = torch.randn(B, **f64)
    adv[1] = 0.0
    old = None
    cast = lambda x: None if x is None else x.to(device, dtype)  # noqa: E731
    return dict(h=cast(h), w=cast(w), b=cast(b), th=cast(th), labels=labels.to(device), mask=mask.to(device),
                adv=adv.to(device, torch.float32), old=old)


def _leaf(x):
    return None if x is None else x.detach().clone().requires_grad_()


def _truth(inp, **kw):
    """Float64 eager reference on materialised logits, with gradients for hidden, weight and bias."""
    h, w, b = (_leaf(None if inp[k] is None else inp[k].double()) for k in ("h", "w", "b"))
    z = h @ w.T + (b if b is not None else 0.0)
    zt = None
    if inp["th"] is not None:
        zt = (inp["th"].double() @ w.T + (b if b is not None else 0.0)).detach()
    out = reference.rlsd_loss_eager(z, zt, inp["labels"], inp["adv"].double(), inp["old"], inp["mask"], **kw)
    out.loss.backward()
    return out, [None if x is None else x.grad for x in (h, w, b)]


def _fused(inp, dtype, **kw):
    h, w, b = (_leaf(None if inp[k] is None else inp[k].to(dtype)) for k in ("h", "w", "b"))
    th = None if inp["th"] is None else inp["th"].to(dtype)
    out = rlsd_linear_loss(h, w, inp["labels"], inp["adv"], inp["old"], inp["mask"], teacher_hidden=th,
                           lm_head_bias=b, **kw)
    out.loss.backward()
    return out, [None if x is None else x.grad for x in (h, w, b)]


def _close(a, b, rtol=1e-5, atol=1e-6):
    torch.testing.assert_close(a.double(), b.double(), rtol=rtol, atol=atol)


def _matches(out, grads, ref, ref_grads, *fields):
    """``out``'s ``fields`` and the gradients ``grads`` (hidden, weight, bias) against the float64 ``ref``'s."""
    for f in fields:
        _close(getattr(out, f), getattr(ref, f))
    for got, want in zip(grads, ref_grads):
        _close(got, want)


def test_chunks_never_run_in_the_interpreter():
    if DEVICE.type == "cpu":
        host = linear_params(BACKENDS)[0]
        assert linear_backend(DEVICE) == host  # TRITON_INTERPRET=1 does not send the chunks to the interpreter
        with running_on(Backend("triton", DEVICE)):  # nor does forcing Triton on CPU
            assert linear_backend(DEVICE) == host
    else:
        assert linear_backend(DEVICE) == "triton"


@pytest.mark.parametrize("teacher", ["hidden", "logprobs", None])
def test_float32_matches_float64_reference(path, teacher):
    inp = _inputs(path.device, teacher=teacher is not None)
    kw = dict(lam=0.7, return_entropy=True)
    ref, ref_g = _truth(inp, **kw)
    if teacher == "logprobs":  # the teacher scored elsewhere, e.g. with token_logprobs_linear
        inp = dict(inp, th=None)
        kw["teacher_logprobs"] = ref.teacher_logprobs
    out, g = _fused(inp, torch.float32, **kw)
    _matches(out, g, ref, ref_g, "loss", "logprobs", "entropy", "weights",
             *(("teacher_logprobs",) if teacher is not None else ()))
    for k, v in ref.metrics.items():
        assert abs(out.metrics[k] - v) <= 1e-5 + 1e-5 * abs(v), k


@pytest.mark.parametrize("kw", [
    dict(loss_type="cispo", lam=0.5),
    dict(loss_agg_mode="seq", temperature=0.7, clip_high=0.1),
    dict(loss_agg_mode="sum", norm=7.0, eps_w=0.05),
], ids=["cispo", "seq-temp", "sum"])
def test_loss_variants_with_old_logprobs(path, kw):
    inp = _inputs(path.device, seed=1)
    g = torch.Generator().manual_seed(5)
    # off-policy: old log-probs near the current ones so that some tokens clip and some do not
    z = inp["h"] @ inp["w"].T + inp["b"]
    cur = reference.token_logprobs_eager(z, inp["labels"], temperature=kw.get("temperature", 1.0))
    inp["old"] = (cur + randn(*cur.shape, generator=g, dtype=cur.dtype, device=path.device, scale=0.3)).float()
    ref, ref_g = _truth(inp, **kw)
    out, got_g = _fused(inp, torch.float32, **kw)
    _matches(out, got_g, ref, ref_g, "loss", "logprobs")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_within_eager_error(path, dtype):
    inp = _inputs(path.device, seed=2)
    q = {k: (v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() and k in ("h", "w", "b", "th")
             else v) for k, v in inp.items()}
    # truth: float64 on the same (rounded) inputs; eager: logits computed in `dtype`, then the eager loss
    ref, ref_g = _truth(q, lam=0.7)
    h, w, b = (_leaf(q[k]) for k in ("h", "w", "b"))
    eager = reference.rlsd_loss_eager(h @ w.T + b, (q["th"] @ w.T + b).detach(), q["labels"], q["adv"], None,
                                      q["mask"], lam=0.7)
    eager.loss.backward()
    eager_g = [x.grad for x in (h, w, b)]
    out, got_g = _fused(q, dtype, lam=0.7)

    def err(a, b):
        return (a.double() - b.double()).abs().max().item()

    assert err(out.loss, ref.loss) <= err(eager.loss, ref.loss) + 1e-3
    assert err(out.logprobs, ref.logprobs) <= err(eager.logprobs, ref.logprobs) + 1e-3
    for got, ea, want in zip(got_g, eager_g, ref_g):
        assert got.dtype == dtype
        assert err(got, want) <= err(ea, want) + 1e-3  # docs/math.md section 7 (absolute, as tests/helpers.py)
        # and, stricter, relative to the gradient's scale: at most twice eager's error + 1e-3
        scale = want.abs().max().item()
        assert err(got, want) / scale <= 2 * err(ea, want) / scale + 1e-3


def test_tied_embeddings(path):
    """lm_head weight = input embedding: the op's weight gradient adds to the embedding-lookup gradient."""
    g = torch.Generator().manual_seed(3)
    dev = path.device
    emb = randn(V, H, generator=g, dtype=torch.float64, scale=0.3, device=dev)
    ids = torch.randint(0, V, (B, T), generator=g, device=CPU).to(dev)
    labels = torch.roll(ids, -1, 1)
    adv = randn(B, generator=g, device=dev)
    proj = randn(H, H, generator=g, dtype=torch.float64, scale=H ** -0.5, device=dev)

    def run(fused):
        e = emb.to(torch.float64 if not fused else torch.float32).clone().requires_grad_()
        hid = torch.tanh(e[ids] @ proj.to(e.dtype))
        if fused:
            loss = rlsd_linear_loss(hid, e, labels, adv).loss
        else:
            loss = reference.rlsd_loss_eager(hid @ e.T, None, labels, adv.double()).loss
        loss.backward()
        return loss, e.grad

    l_ref, g_ref = run(False)
    l_f, g_f = run(True)
    _close(l_f, l_ref)
    _close(g_f, g_ref)


def test_token_logprobs_linear(path):
    inp = _inputs(path.device, seed=4, teacher=False)
    h, w, b = (_leaf(inp[k]) for k in ("h", "w", "b"))
    want, want_ent = reference.token_logprobs_eager(h @ w.T + b, inp["labels"], 0.8, True)
    weights = torch.linspace(-1, 1, want.numel(), dtype=torch.float64, device=path.device).view(want.shape)
    (want * weights).sum().backward()
    want_g = [x.grad for x in (h, w, b)]
    hf, wf, bf = (_leaf(inp[k].float()) for k in ("h", "w", "b"))
    got, ent = token_logprobs_linear(hf, wf, inp["labels"], bf, 0.8, True)
    assert got.shape == inp["labels"].shape and got.dtype == torch.float32
    (got * weights.float()).sum().backward()
    _close(got, want)
    _close(ent, want_ent)
    for x, y in zip((hf, wf, bf), want_g):
        _close(x.grad, y)


def test_fully_masked_batch(path):
    inp = _inputs(path.device, seed=5)
    inp["mask"] = torch.zeros_like(inp["mask"])
    out, g = _fused(inp, torch.float32)
    assert out.loss.item() == 0.0
    for x in g:
        assert torch.isfinite(x).all() and not x.any()


def test_frozen_head_and_no_bias(path):
    inp = _inputs(path.device, seed=6, bias=False, teacher=False)
    ref, ref_g = _truth(inp)
    h = _leaf(inp["h"].float())
    w = inp["w"].float()  # frozen: no weight gradient is computed
    out = rlsd_linear_loss(h, w, inp["labels"], inp["adv"], None, inp["mask"])
    out.loss.backward()
    assert w.grad is None
    _close(h.grad, ref_g[0])


def test_chunked_many_chunks(monkeypatch):
    """Several chunks (the budget shrunk to a few rows): the whole loss, entropy and every gradient."""
    monkeypatch.setattr(chunked, "CHUNK_BUDGET_BYTES", 3 * 4 * V)
    assert chunked.rows_per_chunk(1000, V) == 3
    host = linear_params(BACKENDS)[0]  # the chunked route, over the C++ (else reference) backend on CPU
    with running_on(host):
        inp = _inputs(host.device, seed=7)
        for kw in (dict(lam=0.6, return_entropy=True), dict(lam=0.6, loss_agg_mode="seq")):
            ref, ref_g = _truth(inp, **kw)
            out, g = _fused(inp, torch.float32, **kw)
            _matches(out, g, ref, ref_g, "loss", *(("entropy",) if "return_entropy" in kw else ()))


@pytest.mark.parametrize("teacher_walk", [True, False], ids=["teacher_walk", "stacked"])
def test_teacher_walk_and_stacked_chunks_agree(monkeypatch, teacher_walk):
    """With teacher hidden states the teacher's log-probs come from a walk of their own before the student's
    (``chunked.TEACHER_WALK``, twice the student rows per chunk) or, switched off (the bench's A/B row, and always
    with a distillation divergence), from the student's GEMM with the rows stacked: both match the float64
    reference, over several chunks, the section 2c token-local terms included."""
    monkeypatch.setattr(chunked, "TEACHER_WALK", teacher_walk)
    monkeypatch.setattr(chunked, "CHUNK_BUDGET_BYTES", 4 * 4 * V)  # 4 rows of one stream per chunk
    host = linear_params(BACKENDS)[0]
    with running_on(host):
        inp = _inputs(host.device, seed=5)
        ref_lp = reference.token_logprobs_eager(inp["h"] @ inp["w"].T + inp["b"], inp["labels"])
        for kw in (dict(lam=0.6, return_entropy=True), dict(lam=0.6, kl_coef=0.1, ref_logprobs=ref_lp + 0.2,
                                                            entropy_coef=0.01)):
            ref, ref_g = _truth(inp, **kw)
            out, g = _fused(inp, torch.float32, **kw)
            _matches(out, g, ref, ref_g, "loss", "teacher_logprobs", "weights")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_weight_gradient_over_many_chunks(monkeypatch, dtype):
    """A bf16/fp16 weight gradient summed over 20 chunks stays within eager's error (one GEMM) + 1e-3: the chunk
    products are summed in float32 (summing them in bf16 measured ~3x eager's error)."""
    g = torch.Generator().manual_seed(11)
    N_, H_, V_ = 400, 64, 517
    monkeypatch.setattr(chunked, "CHUNK_BUDGET_BYTES", 20 * V_ * 2)  # 20 student rows per chunk (teacher walk first)
    h = torch.randn(N_, H_, generator=g, dtype=torch.float64).to(dtype)
    th = torch.randn(N_, H_, generator=g, dtype=torch.float64).to(dtype)
    w = (torch.randn(V_, H_, generator=g, dtype=torch.float64) * 0.3).to(dtype)
    labels = torch.randint(0, V_, (N_,), generator=g)
    adv = torch.randn(N_, generator=g)
    hd, wd = _leaf(h.double()), _leaf(w.double())
    ref = reference.rlsd_loss_eager(hd @ wd.T, th.double() @ wd.T, labels, adv.double(), lam=0.5)
    want = torch.autograd.grad(ref.loss, (hd, wd))
    he, we = _leaf(h), _leaf(w)
    eager = torch.autograd.grad(reference.rlsd_loss_eager(he @ we.T, (th @ we.T).detach(), labels, adv,
                                                          lam=0.5).loss, (he, we))
    host = linear_params(BACKENDS)[0]
    with running_on(host):
        hf, wf = _leaf(h), _leaf(w)
        rlsd_linear_loss(hf, wf, labels, adv, teacher_hidden=th, lam=0.5).loss.backward()
    assert chunked.rows_per_chunk(N_, V_, 1, 2) == 20
    for got, ea, ref_g in zip((hf.grad, wf.grad), eager, want):
        assert got.dtype == dtype
        err = (got.double() - ref_g).abs().max().item()
        assert err <= (ea.double() - ref_g).abs().max().item() + 1e-3


def test_gradients_formed_in_the_forward():
    """The backward only scales the forward's gradients: grad_output reaches them, a second backward raises."""
    inp = _inputs(DEVICE, seed=12)
    h, w, b = (_leaf(inp[k].float()) for k in ("h", "w", "b"))
    out = rlsd_linear_loss(h, w, inp["labels"], inp["adv"], None, inp["mask"], teacher_hidden=inp["th"].float(),
                           lm_head_bias=b, lam=0.5)
    (2.5 * out.loss).backward(retain_graph=True)
    h2, w2, b2 = (_leaf(inp[k].float()) for k in ("h", "w", "b"))
    rlsd_linear_loss(h2, w2, inp["labels"], inp["adv"], None, inp["mask"], teacher_hidden=inp["th"].float(),
                     lm_head_bias=b2, lam=0.5).loss.backward()
    for x, y in zip((h, w, b), (h2, w2, b2)):
        torch.testing.assert_close(x.grad, 2.5 * y.grad)
    with pytest.raises(RuntimeError, match="one backward only"):
        out.loss.backward()


def test_triton_backward_is_deterministic():
    triton = [b for b in BACKENDS if b == "triton"]
    if not triton:
        pytest.skip("no triton")
    with running_on(triton[0]):
        inp = _inputs(triton[0].device, seed=8)
        g1 = _fused(inp, torch.float32)[1]
        g2 = _fused(inp, torch.float32)[1]
    for a, b in zip(g1, g2):
        assert torch.equal(a, b)


def test_validation_errors():
    h = torch.randn(2, 3, 8)
    w = torch.randn(11, 8)
    lab = torch.zeros(2, 3, dtype=torch.long)
    adv = torch.zeros(2)

    def raises(match, *args, **kw):
        with pytest.raises(ValueError, match=match):
            rlsd_linear_loss(*args, **kw)

    raises("lm_head_weight must have shape", h, torch.randn(11, 8, 1), lab, adv)
    raises("lm_head_weight has H=7", h, torch.randn(11, 7), lab, adv)
    raises("lm_head_weight is torch.bfloat16", h, w.bfloat16(), lab, adv)
    raises("student_hidden must be float32", h.long(), w, lab, adv)
    raises("student_hidden must be a torch.Tensor", [1.0], w, lab, adv)
    raises("lm_head_weight is on meta", h, w.to("meta"), lab, adv)
    raises(r"lm_head_bias must have shape \(11,\)", h, w, lab, adv, lm_head_bias=torch.zeros(10))
    raises("teacher_hidden must have shape", h, w, lab, adv, teacher_hidden=torch.randn(2, 3, 7))
    raises("not both", h, w, lab, adv, teacher_hidden=h, teacher_logprobs=torch.zeros(2, 3))
    raises("labels holds 11", h, w, lab + 11, adv)
    raises("labels must have shape", h, w, lab[:, :2], adv)
    raises("advantages must have shape", h, w, lab, torch.zeros(5))
    raises("clip_dual", h, w, lab, adv, clip_dual=0.5)
    with pytest.raises(ValueError, match="weight has H=7"):
        token_logprobs_linear(h, torch.randn(11, 7), lab)
    assert rlsd_kernels.rlsd_linear_loss is rlsd_linear_loss


@pytest.mark.gpu
@pytest.mark.parametrize("V_", [128256, 151936])
def test_gpu_real_size_memory(V_):
    """N=4096, H=4096, bf16: no N x V logits (1 GiB+) or their gradient may exist at any point."""
    torch.manual_seed(0)
    N, H_ = 4096, 4096
    dev = torch.device("cuda")
    h = (torch.randn(N, H_, device=dev) * 0.5).bfloat16().requires_grad_()
    th = (torch.randn(N, H_, device=dev) * 0.5).bfloat16()
    w = (torch.randn(V_, H_, device=dev) * 0.02).bfloat16().requires_grad_()
    labels = torch.randint(0, V_, (N,), device=dev)
    adv = torch.randn(N, device=dev)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = rlsd_linear_loss(h, w, labels, adv, teacher_hidden=th, lam=0.5)
    out.loss.backward()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    logits_bytes = N * V_ * 2
    # the bf16 gradients, the weight gradient's float32 block sums (2 more bytes per element, and 1/8 of the weight
    # for one block's product), and the chunk scratch (at most 15% of the logits)
    bound = (N * H_ + V_ * H_) * 2 + V_ * H_ * (2 + 2 / 8) + 0.15 * logits_bytes + (64 << 20)
    assert peak < bound, (peak, bound, logits_bytes)
    assert torch.isfinite(h.grad).all() and torch.isfinite(w.grad).all()
    # accuracy spot check against eager on a slice of rows
    idx = torch.arange(0, N, 64, device=dev)
    z = (h.detach()[idx].float() @ w.detach().float().T)
    want = reference.token_logprobs_eager(z, labels[idx])
    torch.testing.assert_close(out.logprobs[idx], want, rtol=0, atol=2e-2)


def test_compile_fullgraph():
    inp = _inputs(DEVICE, seed=9)  # no backend forced: Triton on a GPU machine, chunks over C++ on CPU
    h0, w0, b0, th = (inp[k].float() for k in ("h", "w", "b", "th"))

    def f(h, w, b):
        out = rlsd_linear_loss(h, w, inp["labels"], inp["adv"], None, inp["mask"], teacher_hidden=th,
                               lm_head_bias=b, lam=0.5, loss_agg_mode="seq", return_entropy=True)
        return out.loss, out.logprobs, out.entropy

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    xs = [_leaf(x) for x in (h0, w0, b0)]
    loss, lp, ent = compiled(*xs)
    g = torch.autograd.grad(loss, xs)
    ys = [_leaf(x) for x in (h0, w0, b0)]
    loss2, lp2, ent2 = f(*ys)
    g2 = torch.autograd.grad(loss2, ys)
    torch.testing.assert_close(loss, loss2)
    torch.testing.assert_close(ent, ent2)
    for a, b in zip(g, g2):
        torch.testing.assert_close(a, b)


def test_opcheck():
    inp = _inputs(DEVICE, seed=10)
    h, w, b = (_leaf(inp[k].float().reshape(-1, H) if k == "h" else inp[k].float()) for k in ("h", "w", "b"))
    th = inp["th"].float().reshape(-1, H)
    labels = inp["labels"].reshape(-1)
    torch.library.opcheck(torch.ops.rlsd_kernels.fused_linear_logprobs.default,
                          (h, w, b, th, labels, 1.0, -100, True))
    valid = inp["mask"].reshape(-1)
    agg = valid.float() / valid.sum()
    adv = inp["adv"].float().repeat_interleave(T)
    # The loss op returns the gradients that its backward scales in place, a pattern AOT's generic checks reject
    # (as for fused_rlsd_loss, tests/test_fused_op.py): schema and fake kernel here; torch.compile of the real use,
    # gradients included, is test_compile_fullgraph.
    args = (h, w, b, th, None, labels, valid, adv, None, agg, 0.5, 0.2, 0.2, 0.28, 3.0, "ppo", 1.0, -100, True)
    for need, extra in (((True, True, True), "test_autograd_registration"),
                        ((False, False, False), "test_aot_dispatch_dynamic")):
        torch.library.opcheck(torch.ops.rlsd_kernels.fused_linear_rlsd_loss.default, args + need,
                              test_utils=("test_schema", "test_faketensor", extra))


def test_chunk_rows_scale_with_the_batch():
    # the scratch (student + teacher rows) is at most 15% of one N x V logits tensor once N is past a few hundred
    # rows, and at most CHUNK_BUDGET_BYTES; small batches get MIN_CHUNK_ROWS rows (or all of them)
    for N_, V_ in ((4096, 32000), (16384, 151936), (16384, 262144)):
        for streams in (1, 2):
            rows = chunked.rows_per_chunk(N_, V_, streams, 2)
            assert rows * streams <= 0.15 * N_ and rows * streams * V_ * 2 <= chunked.CHUNK_BUDGET_BYTES
            assert rows >= chunked.MIN_CHUNK_ROWS
    assert chunked.rows_per_chunk(16384, 151936, 2, 2) == 1228  # 14 chunks of the GPU benchmark shape
    assert chunked.rows_per_chunk(100, 32000) == chunked.MIN_CHUNK_ROWS == 16
    assert chunked.rows_per_chunk(10, 32000) == 10
    assert chunked.rows_per_chunk(1 << 20, 151936, 2, 2) == chunked.CHUNK_BUDGET_BYTES // (2 * 151936 * 2)


@pytest.mark.parametrize("many_chunks", [False, True], ids=["one_chunk", "chunks_of_2_rows"])
@pytest.mark.parametrize("case", ["k3", "is_seq_mask", "gspo", "entropy", "forward_kl", "jsd_clip", "all"])
def test_terms_match_reference(path, case, many_chunks, monkeypatch):
    """The section 2c terms through the fused linear op equal the eager reference on materialised logits."""
    from test_reference_terms import _kwargs

    if many_chunks:
        monkeypatch.setattr(chunked, "CHUNK_BUDGET_BYTES", 2 * 2 * V * 4)  # 2 rows per chunk with a teacher

    inp = _inputs(path.device, seed=13)
    z = inp["h"] @ inp["w"].T + inp["b"]
    zt = inp["th"] @ inp["w"].T + inp["b"]
    g = torch.Generator().manual_seed(14)
    lp = reference.token_logprobs_eager(z, inp["labels"])
    inp["old"] = (lp + randn(B, T, generator=g, dtype=lp.dtype, device=path.device, scale=0.5)).float()
    extra = dict(ref_logprobs=lp + randn(B, T, generator=g, dtype=lp.dtype, device=path.device),
                 rollout_tok=inp["old"].double() + 0.6 * randn(B, T, generator=g, dtype=lp.dtype, device=path.device),
                 rollout_seq=inp["old"].double() + 0.25 * randn(B, T, generator=g, dtype=lp.dtype,
                                                                device=path.device))
    kw, names = _kwargs(case, dict(student_logits=z, teacher_logits=zt, labels=inp["labels"]), extra)
    kw = dict(kw, return_entropy=True)
    ref, ref_g = _truth(inp, **kw)
    out, got_g = _fused(inp, torch.float32, **kw)
    _matches(out, got_g, ref, ref_g, "loss", "logprobs", "entropy")
    assert set(names) <= set(out.metrics)
    for k, v in ref.metrics.items():
        assert abs(out.metrics[k] - v) <= 1e-5 + 1e-5 * abs(v), k


@pytest.mark.parametrize("case,walks", [("k3", 1), ("is_seq_mask", 1), ("entropy", 1), ("forward_kl", 1),
                                        ("jsd_clip", 1), ("gspo", 2), ("all", 2)])
def test_terms_take_one_walk_where_token_local(case, walks, monkeypatch):
    """The token-local terms run in one walk over the chunks (the fused rows: four GEMMs, every student and teacher
    row projected once), GSPO in two; the gradients formed in the forward scale with grad_output and serve one
    backward only."""
    from test_reference_terms import _kwargs

    host = linear_params(BACKENDS)[0]
    if host != "cpp":
        pytest.skip("the C++ backend could not be built: the chunks run on the reference backend (two walks)")
    one_walk, gemms = [], []
    real_walk, real_project = chunked.fused_walk, chunked._project
    monkeypatch.setattr(chunked, "fused_walk", lambda *a, **k: one_walk.append(1) or real_walk(*a, **k))
    monkeypatch.setattr(chunked, "_project", lambda x, *a: gemms.append(x.shape[0]) or real_project(x, *a))
    monkeypatch.setattr(chunked, "CHUNK_BUDGET_BYTES", 2 * 5 * V * 4)  # 5 rows per chunk with a teacher: 3 chunks
    with running_on(host):
        inp = _inputs(host.device, seed=13)
        z = inp["h"] @ inp["w"].T + inp["b"]
        g = torch.Generator().manual_seed(14)
        lp = reference.token_logprobs_eager(z, inp["labels"])
        inp["old"] = (lp + randn(B, T, generator=g, dtype=lp.dtype, device=host.device, scale=0.5)).float()
        extra = dict(ref_logprobs=lp + randn(B, T, generator=g, dtype=lp.dtype, device=host.device),
                     rollout_tok=inp["old"].double() + 0.1, rollout_seq=inp["old"].double() + 0.05)
        zt = inp["th"] @ inp["w"].T + inp["b"]
        kw, _ = _kwargs(case, dict(student_logits=z, teacher_logits=zt, labels=inp["labels"]), extra)
        ref, ref_g = _truth(inp, **kw)
        h, w, b = (_leaf(inp[k].float()) for k in ("h", "w", "b"))
        out = rlsd_linear_loss(h, w, inp["labels"], inp["adv"], inp["old"], inp["mask"],
                               teacher_hidden=inp["th"].float(), lm_head_bias=b, **kw)
        (2.5 * out.loss).backward(retain_graph=True)
    assert len(one_walk) == (walks == 1)
    if walks == 1:
        assert sum(gemms) == 2 * B * T  # every student and teacher row projected once: nothing recomputed
        # 10 rows per GEMM: a chunk's 5 student and 5 teacher rows stacked where a divergence's gradient sweep reads
        # the teacher's rows, else the teacher's walk and then the student's, 10 rows of one stream per chunk
        stacked = case in ("forward_kl", "jsd_clip")
        assert gemms == ([10, 10, 10] if stacked else [10, 5, 10, 5]), gemms
        with pytest.raises(RuntimeError, match="one backward only"):
            out.loss.backward()
    _close(out.loss, ref.loss)
    for got, want in zip((h.grad, w.grad, b.grad), ref_g):
        _close(got, 2.5 * want)
