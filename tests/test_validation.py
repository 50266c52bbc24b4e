"""Bad input raises ValueError naming the argument, before any kernel runs (docs/math.md section 5)."""
import pytest
import torch

from helpers import make_inputs
from rlsd_kernels import RLSDLoss, reference, rlsd_loss, token_logprobs


@pytest.fixture
def inputs():
    return make_inputs(B=2, T=3, V=11, seed=0)


@pytest.fixture(params=["fused", "reference"])
def fn(request):
    return rlsd_loss if request.param == "fused" else reference.rlsd_loss_eager


def _raises(fn, match, **kw):
    """ValueError naming the argument. Bad label / cu_seqlens *values* on the Triton backend are found on the device
    (no host sync) and raised when the output's metrics are read; everything else raises in the call."""
    with pytest.raises(ValueError, match=match):
        out = fn(**kw)
        out.metrics


CASES = [
    ("student_logits", lambda i: dict(i, student_logits=i["student_logits"].long())),
    ("student_logits", lambda i: dict(i, student_logits=[1.0])),
    ("teacher_logits", lambda i: dict(i, teacher_logits=i["teacher_logits"][..., :-1])),
    ("teacher_logits", lambda i: dict(i, teacher_logits=i["teacher_logits"].to(torch.int32))),
    ("labels", lambda i: dict(i, labels=i["labels"].float())),
    ("labels", lambda i: dict(i, labels=i["labels"][:, :-1])),
    ("labels", lambda i: dict(i, labels=torch.full_like(i["labels"], 11))),  # == V, out of range
    ("labels", lambda i: dict(i, labels=torch.full_like(i["labels"], -1))),  # negative, not ignore_index
    ("advantages", lambda i: dict(i, advantages=torch.ones(5))),
    ("advantages", lambda i: dict(i, advantages=torch.ones(2, 3, dtype=torch.long))),
    ("old_logprobs", lambda i: dict(i, old_logprobs=torch.zeros(3, 2))),
    ("mask", lambda i: dict(i, mask=torch.ones(2, 4, dtype=torch.bool))),
]


@pytest.mark.parametrize("name,make", CASES, ids=[f"{c[0]}-{k}" for k, c in enumerate(CASES)])
def test_bad_tensors(fn, inputs, name, make):
    _raises(fn, name, **make(inputs))


@pytest.mark.parametrize("kw,name", [
    (dict(lam=float("nan")), "lam"), (dict(lam=1.5), "lam"), (dict(eps_w=float("inf")), "eps_w"),
    (dict(eps_w=1.0), "eps_w"), (dict(clip_low=1.0), "clip_low"), (dict(clip_high=-0.1), "clip_high"),
    (dict(clip_dual=1.0), "clip_dual"), (dict(temperature=0.0), "temperature"),
    (dict(temperature=float("nan")), "temperature"), (dict(loss_type="dpo"), "loss_type"),
    (dict(loss_agg_mode="mean"), "loss_agg_mode"), (dict(loss_agg_mode="sum"), "norm"),
    (dict(loss_agg_mode="sum", norm=0.0), "norm"), (dict(norm=3.0), "norm"), (dict(lam="0.5"), "lam"),
    (dict(ignore_index=1.5), "ignore_index"),
])
def test_bad_hyper_parameters(fn, inputs, kw, name):
    _raises(fn, name, **inputs, **kw)


def test_teacher_logits_and_logprobs_exclusive(fn, inputs):
    _raises(fn, "teacher_logprobs", **inputs, teacher_logprobs=torch.zeros(2, 3))


def test_seq_mode_needs_sequences(fn, inputs):
    flat = {k: (v.reshape(-1, *v.shape[2:]) if isinstance(v, torch.Tensor) else v) for k, v in inputs.items()}
    _raises(fn, "loss_agg_mode", **flat, loss_agg_mode="seq")


def test_bad_cu_seqlens(fn):
    i = make_inputs(B=1, T=6, V=11, seed=1)
    _raises(fn, "cu_seqlens", **i, cu_seqlens=torch.tensor([0, 4, 3, 6], dtype=torch.int32))
    _raises(fn, "cu_seqlens", **i, cu_seqlens=torch.tensor([0, 5], dtype=torch.int32))
    _raises(fn, "cu_seqlens", **i, cu_seqlens=torch.tensor([0.0, 6.0]))
    _raises(fn, "cu_seqlens", **make_inputs(B=2, T=3, V=11), cu_seqlens=torch.tensor([0, 6]))


def test_device_mismatch(fn, inputs):
    meta = dict(inputs, advantages=inputs["advantages"].to("meta"))
    _raises(fn, "advantages", **meta)


def test_no_kernel_runs_on_bad_input(inputs, monkeypatch):
    import rlsd_kernels.ops as ops
    from rlsd_kernels.dispatch import force_backend

    def boom(*a, **k):
        raise AssertionError("kernel ran")

    monkeypatch.setattr(ops, "fused_rlsd_loss", boom)
    _raises(rlsd_loss, "lam", **inputs, lam=-1.0)
    with force_backend("reference"):  # the CPU backends check label values before any kernel
        _raises(rlsd_loss, "labels", **dict(inputs, labels=torch.full_like(inputs["labels"], 99)))


def _triton_device():
    from rlsd_kernels.dispatch import interpreter_on

    pytest.importorskip("triton")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and not interpreter_on():
        pytest.skip("Triton needs CUDA or TRITON_INTERPRET=1")
    return device


@pytest.mark.parametrize("terms", [{}, dict(kl_coef=0.1, entropy_coef=0.05, distill_coef=0.3),
                                   dict(loss_type="gspo", entropy_coef=0.05)], ids=["plain", "terms", "gspo"])
def test_device_side_label_check_leaves_bad_tokens_out(terms):
    """Triton backend (the plain op, and the section 2c terms, on the fused rows or composed): no host sync for the
    label range; bad tokens are left out of the loss and its gradient (as masked) and the ValueError names labels
    (and the first bad value) when the metrics are read."""
    from helpers import Backend, running_on

    device = _triton_device()
    inputs = make_inputs(B=2, T=3, V=11, seed=0, device=device)
    if "kl_coef" in terms:
        terms = dict(terms, ref_logprobs=inputs["old_logprobs"] + 0.1)
    lab = inputs["labels"].clone()
    lab[0, 1] = 99
    masked = inputs["mask"].clone()
    masked[0, 1] = False
    grads = []
    with running_on(Backend("triton", device)):
        outs = []
        for labels, mask in ((lab, inputs["mask"]), (lab.clamp(max=10), masked)):
            s = inputs["student_logits"].detach().clone().requires_grad_()
            outs.append(rlsd_loss(**dict(inputs, student_logits=s, labels=labels, mask=mask), **terms))
            outs[-1].loss.backward()
            grads.append(s.grad)
    out, ref = outs
    torch.testing.assert_close(out.loss, ref.loss)
    torch.testing.assert_close(grads[0], grads[1])
    with pytest.raises(ValueError, match="labels holds 99"):
        out.metrics
    with pytest.raises(ValueError, match="labels holds 99"):
        out.check_inputs()


def test_device_side_cu_seqlens_check_with_terms():
    """The terms on the Triton fused rows with malformed ``cu_seqlens`` (not non-decreasing; not ending at nnz): no
    host sync, no out-of-range index, and the ValueError names cu_seqlens when the metrics are read."""
    from helpers import Backend, running_on

    device = _triton_device()
    inputs = make_inputs(B=1, T=6, V=11, seed=1, device=device)
    for cu in ([0, 4, 2, 6], [0, 3, 5]):
        with running_on(Backend("triton", device)):
            s = inputs["student_logits"].detach().clone().requires_grad_()
            out = rlsd_loss(**dict(inputs, student_logits=s), entropy_coef=0.05, loss_agg_mode="seq",
                            cu_seqlens=torch.tensor(cu, dtype=torch.int32, device=device))
            out.loss.backward()
        with pytest.raises(ValueError, match="cu_seqlens"):
            out.check_inputs()


def test_token_logprobs_and_module_validate(inputs):
    _raises(token_logprobs, "temperature", logits=inputs["student_logits"], labels=inputs["labels"], temperature=-1.0)
    _raises(token_logprobs, "labels", logits=inputs["student_logits"], labels=inputs["labels"] + 100)
    with pytest.raises(ValueError, match="clip_dual"):
        RLSDLoss(clip_dual=0.5)


def test_ignore_index_label_is_accepted(fn, inputs):
    lab = inputs["labels"].clone()
    lab[lab == -100] = -7
    lab[0, 0] = -7
    out = fn(**dict(inputs, labels=lab), ignore_index=-7)
    assert out.logprobs[0, 0] == 0
