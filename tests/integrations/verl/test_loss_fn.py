"""RLSDLossFn against verl's own ppo_loss (weight off) and against rlsd_kernels.rlsd_loss (weight on)."""
import pytest

pytest.importorskip("verl")

import torch  # noqa: E402
from batches import micro_batch, packed_index, packed_logprobs, padded_batch  # noqa: E402
from verl.utils.metric import Metric  # noqa: E402
from verl.workers.config import FSDPActorConfig  # noqa: E402
from verl.workers.utils.losses import ppo_loss  # noqa: E402

from rlsd_kernels import rlsd_loss  # noqa: E402
from rlsd_kernels.integrations.verl import LOGPROBS_KEY, TEACHER_KEY, RLSDLossFn  # noqa: E402

AGG_MODES = ["token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-sum-norm", "seq-mean-token-mean"]
# (dp_size, batch_num_tokens, global_batch_size): the local micro-batch alone, and a share of a global batch
GLOBAL = {"local": (1, None, None), "global": (2, 37, 16)}


def actor_config(loss_agg_mode="token-mean", **kw):
    kw = {"clip_ratio_low": 0.2, "clip_ratio_high": 0.28, "clip_ratio_c": 3.0, **kw}
    return FSDPActorConfig(strategy="fsdp", ppo_mini_batch_size=4, ppo_micro_batch_size_per_gpu=2, rollout_n=1,
                           loss_agg_mode=loss_agg_mode, **kw)


def rel_err(a, b):
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-30))


def value(metric):
    """A metric's number: verl wraps them in Metric objects holding a list of values."""
    return float(metric.values[0]) if isinstance(metric, Metric) else float(metric)


def loss_and_grad(fn, td, current, mask):
    values, nested = packed_logprobs(td, current, mask)
    loss, metrics = fn(model_output={"log_probs": nested}, data=td)
    loss.backward()
    return loss.detach(), values.grad, metrics


@pytest.mark.parametrize("where", list(GLOBAL))
@pytest.mark.parametrize("mode", AGG_MODES)
def test_weight_off_equals_verl_ppo_loss(mode, where):
    batch, current, _ = padded_batch(seed=AGG_MODES.index(mode))
    mask = batch.batch["response_mask"].bool()
    dp, ntok, gbs = GLOBAL[where]
    if mode == "seq-mean-token-sum-norm" and where == "global":
        cfg_kw = {"loss_scale_factor": 5}
    else:
        cfg_kw = {}
    theirs_cfg, ours_cfg = actor_config(mode, **cfg_kw), actor_config(mode, **cfg_kw)
    theirs = loss_and_grad(lambda **k: ppo_loss(theirs_cfg, **k), micro_batch(batch, dp, ntok, gbs), current, mask)
    ours = loss_and_grad(RLSDLossFn(ours_cfg, lam=0.0), micro_batch(batch, dp, ntok, gbs), current, mask)
    assert rel_err(ours[0], theirs[0]) <= 1e-6, (ours[0], theirs[0])
    assert theirs[1].abs().sum() > 0
    assert rel_err(ours[1], theirs[1]) <= 1e-6
    for k in ("actor/pg_clipfrac", "actor/pg_clipfrac_lower"):
        assert value(ours[2][k]) == pytest.approx(value(theirs[2][k]), abs=1e-6), k
    # the synthetic batch reaches the clip and the dual clip, so the parity covers those branches
    assert value(theirs[2]["actor/pg_clipfrac"]) > 0 and value(theirs[2]["actor/pg_clipfrac_lower"]) > 0


@pytest.mark.parametrize("where", list(GLOBAL))
@pytest.mark.parametrize("lam", [0.5, 1.0])
def test_weight_on_equals_rlsd_loss(lam, where):
    """Student log-probs from logits: our loss_fn (log-probs route) vs rlsd_loss on the same logits."""
    batch, _, teacher = padded_batch(seed=7)
    mask = batch.batch["response_mask"].bool()
    responses = batch.batch["responses"]
    B, T = responses.shape
    dp, ntok, gbs = GLOBAL[where]
    logits = torch.randn(B, T, 50, generator=torch.Generator().manual_seed(3), requires_grad=True)
    batch.batch[TEACHER_KEY] = teacher
    td = micro_batch(batch, dp, ntok, gbs)
    logp = torch.log_softmax(logits, -1).gather(-1, responses[..., None]).squeeze(-1)
    nnz = td["input_ids"].values().numel()
    idx = packed_index(td)
    values = torch.zeros(nnz).index_put((idx[mask],), logp[mask])
    nested = torch.nested.nested_tensor_from_jagged(values, td["input_ids"].offsets())
    loss, metrics = RLSDLossFn(actor_config("token-mean"), lam=lam)(model_output={"log_probs": nested}, data=td)
    (grad,) = torch.autograd.grad(loss, logits)

    ref_logits = logits.detach().clone().requires_grad_(True)
    norm = None if ntok is None else ntok / dp
    ref = rlsd_loss(ref_logits, None, responses, batch.batch["advantages"], batch.batch["old_log_probs"], mask,
                    teacher_logprobs=teacher, lam=lam, eps_w=0.2, clip_low=0.2, clip_high=0.28, clip_dual=3.0,
                    loss_agg_mode="token" if norm is None else "sum", norm=norm)
    ref.loss.backward()
    assert rel_err(loss.detach(), ref.loss.detach()) <= 1e-6
    assert rel_err(grad, ref_logits.grad) <= 1e-6
    assert value(metrics["rlsd/weight_mean"]) == pytest.approx(ref.metrics["weight_mean"], rel=1e-6)


def test_weight_on_changes_the_loss():
    """With lam > 0 and a teacher that disagrees, the loss differs from verl's (the weight is applied)."""
    batch, current, teacher = padded_batch(seed=11)
    mask = batch.batch["response_mask"].bool()
    batch.batch[TEACHER_KEY] = teacher
    off = loss_and_grad(RLSDLossFn(actor_config(), lam=0.0), micro_batch(batch), current, mask)[0]
    on = loss_and_grad(RLSDLossFn(actor_config(), lam=1.0), micro_batch(batch), current, mask)[0]
    assert abs(float(on - off)) > 1e-4


def test_logits_route_equals_rlsd_loss():
    """Logits-processor call (packed (1, nnz, V) logits) then the loss call, vs rlsd_loss on the same logits."""
    batch, _, teacher = padded_batch(seed=5)
    mask = batch.batch["response_mask"].bool()
    batch.batch[TEACHER_KEY] = teacher
    td = micro_batch(batch)
    nnz = td["input_ids"].values().numel()
    packed = torch.randn(1, nnz, 50, generator=torch.Generator().manual_seed(4), requires_grad=True)
    fn = RLSDLossFn(actor_config(), lam=0.5)
    per_token = fn(student_logits=packed, data=td)[LOGPROBS_KEY]
    assert per_token.shape == (1, nnz)
    nested = torch.nested.nested_tensor_from_jagged(per_token[0], td["input_ids"].offsets())
    loss, _ = fn(model_output={LOGPROBS_KEY: nested}, data=td)
    (grad,) = torch.autograd.grad(loss, packed)

    ref_packed = packed.detach().clone().requires_grad_(True)
    student = ref_packed[0][packed_index(td)]                       # (B, T, V): row scoring response token j
    ref = rlsd_loss(student, None, batch.batch["responses"], batch.batch["advantages"], batch.batch["old_log_probs"],
                    mask, teacher_logprobs=teacher, lam=0.5, clip_low=0.2, clip_high=0.28, clip_dual=3.0)
    ref.loss.backward()
    assert rel_err(loss.detach(), ref.loss.detach()) <= 1e-6
    assert rel_err(grad, ref_packed.grad) <= 1e-6


@pytest.mark.parametrize("option, kwargs, message", [
    ("loss_agg_mode", {"loss_agg_mode": "seq-mean-bogus"}, "loss_agg_mode"),
    ("loss_mode", {"policy_loss": {"loss_mode": "geo_mean"}}, "loss_mode"),
    ("kl_loss_type", {"use_kl_loss": True, "kl_loss_type": "k3+"}, "kl_loss_type"),
])
def test_unsupported_options_raise(option, kwargs, message):
    with pytest.raises(ValueError, match=message):
        RLSDLossFn(kwargs, lam=0.5)


def test_missing_teacher_raises():
    batch, current, _ = padded_batch()
    with pytest.raises(ValueError, match=TEACHER_KEY):
        loss_and_grad(RLSDLossFn(actor_config(), lam=0.5), micro_batch(batch), current,
                      batch.batch["response_mask"].bool())
