"""RLSDLossFn with verl's KL loss, GSPO, entropy bonus and rollout-correction weights against verl's own ppo_loss
(its policy loss + kl_penalty + agg_loss as its actor combines them), and against rlsd_loss with the weight on."""
import pytest

pytest.importorskip("verl")

import torch  # noqa: E402
from batches import micro_batch, packed_index, packed_logprobs, padded_batch  # noqa: E402
from test_loss_fn import GLOBAL, actor_config, rel_err, value  # noqa: E402
from verl.workers.utils.losses import ppo_loss  # noqa: E402

from rlsd_kernels import rlsd_loss  # noqa: E402
from rlsd_kernels.integrations.verl import TEACHER_KEY, RLSDLossFn  # noqa: E402

EXACT_KL_TYPES = ["kl", "k1", "mse", "k2", "mse+", "k2+", "low_var_kl", "k3"]
CASES = [("token-mean", "local"), ("token-mean", "global"), ("seq-mean-token-mean", "global"),
         ("seq-mean-token-sum-norm", "local")]


def with_extras(batch, seed, ref=True, weights=None):
    """Adds verl's ``ref_log_prob`` (far enough from the current log-probs to reach k3's clamps' neighbourhood)
    and, when given, ``rollout_is_weights``."""
    g = torch.Generator().manual_seed(100 + seed)
    B, T = batch.batch["responses"].shape
    if ref:
        batch.batch["ref_log_prob"] = batch.batch["old_log_probs"] + 0.8 * torch.randn(B, T, generator=g)
    if weights is not None:
        batch.batch["rollout_is_weights"] = weights
    return batch


def token_weights(batch, seed):
    """Token-level weights as verl's rollout correction leaves them: zero on padding, truncated at 2, and some
    zeroed in-mask tokens (IcePop rejection)."""
    g = torch.Generator().manual_seed(200 + seed)
    mask = batch.batch["response_mask"].float()
    w = torch.exp(0.6 * torch.randn(mask.shape, generator=g)).clamp(max=2.0) * mask
    w[3, 0] = 0.0
    return w


def sequence_weights(batch, seed):
    g = torch.Generator().manual_seed(300 + seed)
    mask = batch.batch["response_mask"].float()
    return torch.exp(0.5 * torch.randn(mask.shape[0], 1, generator=g)).expand_as(mask) * mask


def run(fn, td, current, mask, entropy=None):
    """Loss, gradient w.r.t. the packed log-probs (and the packed entropy, when given), metrics."""
    values, nested = packed_logprobs(td, current, mask)
    output = {"log_probs": nested}
    leaves = [values]
    if entropy is not None:
        ent_values, ent_nested = packed_logprobs(td, entropy, mask)
        output["entropy"] = ent_nested
        leaves.append(ent_values)
    loss, metrics = fn(model_output=output, data=td)
    grads = torch.autograd.grad(loss, leaves)
    return loss.detach(), grads, metrics


TOL = {torch.float32: 1e-6, torch.float64: 1e-12}


def term_scale(cfg_kw, metrics):
    """|pg_loss| + kl_loss_coef |kl_loss| + entropy_coeff |entropy_loss| from verl's metrics: the magnitude the
    rounding of a sum of terms is relative to (the terms may nearly cancel, as with a KL loss on a small PG loss)."""
    scale = abs(value(metrics["actor/pg_loss"]))
    if cfg_kw.get("use_kl_loss"):
        scale += cfg_kw["kl_loss_coef"] * abs(value(metrics["kl_loss"]))
    if "actor/entropy_loss" in metrics:
        scale += cfg_kw.get("entropy_coeff", 0.0) * abs(value(metrics["actor/entropy_loss"]))
    return scale


def cast(batch, current, entropy, dtype):
    for k in ("old_log_probs", "advantages", "ref_log_prob", "rollout_is_weights"):
        if k in batch.batch.keys():
            batch.batch[k] = batch.batch[k].to(dtype)
    return current.to(dtype), None if entropy is None else entropy.to(dtype)


def compare(cfg_kw, batch, current, where, dtype, entropy=None,
            metric_names=("actor/pg_clipfrac", "actor/ppo_kl")):
    """verl's ppo_loss vs ours on the same micro-batch: loss within TOL of the terms' magnitude, gradients (w.r.t.
    the packed log-probs and entropy) within TOL of the largest, the shared metrics."""
    current, entropy = cast(batch, current, entropy, dtype)
    mask = batch.batch["response_mask"].bool()
    dp, ntok, gbs = GLOBAL[where]
    theirs_cfg, ours_cfg = actor_config(**cfg_kw), actor_config(**cfg_kw)
    theirs = run(lambda **k: ppo_loss(theirs_cfg, **k), micro_batch(batch, dp, ntok, gbs), current, mask, entropy)
    ours = run(RLSDLossFn(ours_cfg, lam=0.0), micro_batch(batch, dp, ntok, gbs), current, mask, entropy)
    assert ours[0].dtype == dtype
    scale = term_scale(cfg_kw, theirs[2])
    assert float((ours[0] - theirs[0]).abs()) <= TOL[dtype] * scale, (ours[0], theirs[0], scale)
    for g_ours, g_theirs in zip(ours[1], theirs[1]):
        assert g_theirs.abs().sum() > 0
        assert rel_err(g_ours, g_theirs) <= TOL[dtype]
    for k in metric_names:
        assert value(ours[2][k]) == pytest.approx(value(theirs[2][k]), abs=1e-6), k
    return ours, theirs


@pytest.fixture(params=[torch.float32, torch.float64], ids=["f32", "f64"])
def dtype(request):
    return request.param


@pytest.mark.parametrize("mode, where", CASES)
@pytest.mark.parametrize("kl_loss_type", EXACT_KL_TYPES)
def test_kl_loss_equals_verl(kl_loss_type, mode, where, dtype):
    batch, current, _ = padded_batch(seed=1)
    with_extras(batch, 1)
    ours, theirs = compare({"loss_agg_mode": mode, "use_kl_loss": True, "kl_loss_coef": 0.3,
                            "kl_loss_type": kl_loss_type}, batch, current, where, dtype)
    assert value(theirs[2]["kl_loss"]) != 0


def test_kl_loss_changes_the_loss():
    """The KL term is applied: the loss moves by kl_loss_coef * agg(kl)."""
    batch, current, _ = padded_batch(seed=2)
    with_extras(batch, 2)
    mask = batch.batch["response_mask"].bool()
    off = run(RLSDLossFn(actor_config(), lam=0.0), micro_batch(batch), current, mask)[0]
    on = run(RLSDLossFn(actor_config(use_kl_loss=True, kl_loss_coef=0.3, kl_loss_type="k3"), lam=0.0),
             micro_batch(batch), current, mask)[0]
    r = batch.batch["ref_log_prob"] - current
    kl = (torch.exp(r) - r - 1)[mask].mean()
    assert float(on - off) == pytest.approx(0.3 * float(kl), rel=1e-5)


@pytest.mark.parametrize("mode, where", CASES)
def test_gspo_equals_verl(mode, where, dtype):
    batch, current, _ = padded_batch(seed=3, logp_noise=0.3)
    compare({"loss_agg_mode": mode, "policy_loss": {"loss_mode": "gspo"}}, batch, current, where, dtype,
            metric_names=("actor/pg_clipfrac", "actor/ppo_kl", "actor/pg_clipfrac_lower"))


@pytest.mark.parametrize("mode, where", CASES)
@pytest.mark.parametrize("loss_mode", ["vanilla", "gspo"])
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_rollout_is_weights_equal_verl(level, loss_mode, mode, where, dtype):
    batch, current, _ = padded_batch(seed=4, logp_noise=0.4)
    weights = token_weights(batch, 4) if level == "token" else sequence_weights(batch, 4)
    with_extras(batch, 4, ref=False, weights=weights)
    # pg_clipfrac is verl's before the weights; ours counts zero-weight tokens as unclipped
    compare({"loss_agg_mode": mode, "policy_loss": {"loss_mode": loss_mode}}, batch, current, where, dtype,
            metric_names=("actor/ppo_kl",) if level == "token" else ("actor/ppo_kl", "actor/pg_clipfrac"))


@pytest.mark.parametrize("mode, where", CASES)
def test_entropy_bonus_equals_verl(mode, where, dtype):
    batch, current, _ = padded_batch(seed=5)
    entropy = torch.rand(current.shape, generator=torch.Generator().manual_seed(55)) * 3
    compare({"loss_agg_mode": mode, "entropy_coeff": 0.01}, batch, current, where, dtype, entropy=entropy)


@pytest.mark.parametrize("mode, where", CASES)
def test_all_options_together_equal_verl(mode, where, dtype):
    batch, current, _ = padded_batch(seed=6, logp_noise=0.3)
    with_extras(batch, 6, weights=token_weights(batch, 6))
    entropy = torch.rand(current.shape, generator=torch.Generator().manual_seed(66)) * 3
    compare({"loss_agg_mode": mode, "policy_loss": {"loss_mode": "gspo"}, "entropy_coeff": 0.02,
             "use_kl_loss": True, "kl_loss_coef": 0.1, "kl_loss_type": "low_var_kl"}, batch, current, where,
            dtype, entropy=entropy, metric_names=("actor/ppo_kl",))


@pytest.mark.parametrize("loss_mode", ["vanilla", "gspo"])
def test_weight_on_with_terms_equals_rlsd_loss(loss_mode):
    """lam > 0 with the KL loss and the entropy bonus: our loss_fn (log-probs + verl's entropy of the same logits)
    vs rlsd_loss on the logits with ref_logprobs / kl_coef / entropy_coef / loss_type."""
    from verl.utils.torch_functional import entropy_from_logits

    batch, _, teacher = padded_batch(seed=8, logp_noise=0.3)
    with_extras(batch, 8)
    batch.batch[TEACHER_KEY] = teacher
    mask = batch.batch["response_mask"].bool()
    responses = batch.batch["responses"]
    B, T = responses.shape
    logits = torch.randn(B, T, 50, generator=torch.Generator().manual_seed(9), requires_grad=True)
    td = micro_batch(batch)
    idx, offsets = packed_index(td), td["input_ids"].offsets()
    nnz = td["input_ids"].values().numel()

    def packed(per_token):
        values = torch.zeros(nnz).index_put((idx[mask],), per_token[mask])
        return torch.nested.nested_tensor_from_jagged(values, offsets)

    logp = torch.log_softmax(logits, -1).gather(-1, responses[..., None]).squeeze(-1)
    cfg = actor_config(policy_loss={"loss_mode": loss_mode}, use_kl_loss=True, kl_loss_coef=0.2,
                       kl_loss_type="low_var_kl", entropy_coeff=0.05)
    loss, metrics = RLSDLossFn(cfg, lam=0.5)(model_output={"log_probs": packed(logp),
                                                           "entropy": packed(entropy_from_logits(logits))}, data=td)
    (grad,) = torch.autograd.grad(loss, logits)

    ref_logits = logits.detach().clone().requires_grad_(True)
    ref = rlsd_loss(ref_logits, None, responses, batch.batch["advantages"], batch.batch["old_log_probs"], mask,
                    teacher_logprobs=teacher, lam=0.5, eps_w=0.2, clip_low=0.2, clip_high=0.28, clip_dual=3.0,
                    loss_type="gspo" if loss_mode == "gspo" else "ppo", ref_logprobs=batch.batch["ref_log_prob"],
                    kl_coef=0.2, kl_type="k3", entropy_coef=0.05)
    ref.loss.backward()
    assert rel_err(loss.detach(), ref.loss.detach()) <= 1e-6
    assert rel_err(grad, ref_logits.grad) <= 1e-6
    assert value(metrics["rlsd/kl_mean"]) == pytest.approx(ref.metrics["kl_mean"], rel=1e-6)


@pytest.mark.parametrize("kwargs, message", [
    ({"policy_loss": {"loss_mode": "clip_cov"}}, "loss_mode"),
    ({"use_kl_loss": True, "kl_loss_type": "k3+"}, "kl_loss_type"),
    ({"use_kl_loss": True, "kl_loss_type": "low_var_kl+"}, "kl_loss_type"),
    ({"use_kl_loss": True, "kl_loss_type": "kl+"}, "kl_loss_type"),
    ({"use_kl_loss": True, "kl_loss_type": "abs"}, "kl_loss_type"),
    ({"use_kl_loss": True, "kl_loss_type": "full"}, "kl_loss_type"),
    ({"use_kl_loss": True, "kl_loss_coef": -0.1}, "kl_loss_coef"),
    ({"entropy_coeff": -0.01}, "entropy_coeff"),
])
def test_inexact_options_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        RLSDLossFn(kwargs, lam=0.5)


def test_missing_inputs_raise():
    batch, current, _ = padded_batch(seed=10)
    mask = batch.batch["response_mask"].bool()
    with pytest.raises(ValueError, match="ref_log_prob"):
        run(RLSDLossFn(actor_config(use_kl_loss=True, kl_loss_coef=0.1), lam=0.0), micro_batch(batch), current, mask)
    with pytest.raises(ValueError, match="entropy"):
        run(RLSDLossFn(actor_config(entropy_coeff=0.01), lam=0.0), micro_batch(batch), current, mask)


def test_negative_rollout_weights_raise():
    batch, current, _ = padded_batch(seed=12)
    mask = batch.batch["response_mask"].bool()
    weights = token_weights(batch, 12)
    weights[0, 0] = -0.5
    with_extras(batch, 12, ref=False, weights=weights)
    with pytest.raises(ValueError, match="rollout_is_weights"):
        run(RLSDLossFn(actor_config(), lam=0.0), micro_batch(batch), current, mask)


@pytest.mark.parametrize("loss_mode", ["vanilla", "gspo"])
def test_weight_on_with_rollout_weights_equals_rlsd_loss_rollout_term(loss_mode):
    """lam > 0 with positive token-level rollout weights w: the advantage scaling equals the op's own rollout IS
    term fed ``rollout_logprobs = old - log(w)`` (truncate mode, threshold above max(w), so w_is = w). float64
    inputs; the op's section 2c path returns a float32 loss, hence 1e-6 on the loss."""
    batch, _, teacher = padded_batch(seed=13, logp_noise=0.3)
    weights = torch.exp(0.6 * torch.randn(teacher.shape, generator=torch.Generator().manual_seed(14))).clamp(max=2.0)
    weights = weights * batch.batch["response_mask"]
    with_extras(batch, 13, ref=False, weights=weights)
    batch.batch[TEACHER_KEY] = teacher
    cast(batch, teacher, None, torch.float64)
    batch.batch[TEACHER_KEY] = teacher.double()
    mask = batch.batch["response_mask"].bool()
    responses = batch.batch["responses"]
    B, T = responses.shape
    logits = torch.randn(B, T, 50, generator=torch.Generator().manual_seed(15), dtype=torch.float64,
                         requires_grad=True)
    td = micro_batch(batch)
    idx, offsets = packed_index(td), td["input_ids"].offsets()
    logp = torch.log_softmax(logits, -1).gather(-1, responses[..., None]).squeeze(-1)
    values = torch.zeros(td["input_ids"].values().numel(), dtype=torch.float64).index_put((idx[mask],), logp[mask])
    cfg = actor_config(policy_loss={"loss_mode": loss_mode})
    loss, _ = RLSDLossFn(cfg, lam=0.5)(model_output={"log_probs": torch.nested.nested_tensor_from_jagged(
        values, offsets)}, data=td)
    (grad,) = torch.autograd.grad(loss, logits)

    old = batch.batch["old_log_probs"]
    rollout = torch.where(mask, old - torch.log(torch.where(mask, weights.double(), 1.0)), old)
    ref_logits = logits.detach().clone().requires_grad_(True)
    ref = rlsd_loss(ref_logits, None, responses, batch.batch["advantages"], old, mask, teacher_logprobs=teacher.double(),
                    lam=0.5, eps_w=0.2, clip_low=0.2, clip_high=0.28, clip_dual=3.0,
                    loss_type="gspo" if loss_mode == "gspo" else "ppo", rollout_logprobs=rollout, rollout_is="token",
                    rollout_is_threshold=4.0, rollout_is_mode="truncate")
    ref.loss.backward()
    assert rel_err(loss.detach(), ref.loss.detach().double()) <= 1e-6
    assert rel_err(grad, ref_logits.grad) <= 1e-6
