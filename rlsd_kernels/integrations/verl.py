"""RLSD in verl (tested with verl 0.9.1, FSDP engine workers): teacher log-probs as a batch step, and a ``loss_fn``.

- :func:`add_teacher_log_probs` builds teacher-prompt + response inputs (the prompt from a format template over the
  batch's non-tensor fields, the response tokens unchanged), scores them with the actor's ``compute_log_prob`` and
  stores the per-response-token log-probs as ``batch.batch[TEACHER_KEY]``.
- :class:`RLSDLossFn` is a picklable ``loss_fn`` for ``actor_rollout_wg.set_loss_fn``. Called as verl's engine calls
  ``ppo_loss`` (``model_output, data, dp_group``) it applies the RLSD loss on verl's per-token log-probs; called as
  the engine's logits processor (``student_logits=(1, nnz, V)``, when the micro-batch has ``distillation_use_topk``)
  it scores the packed logits with the fused :func:`rlsd_kernels.token_logprobs` and hands them back per token.
- :class:`RLSDTrainerMixin` wires both into verl's DataProto trainer ``RayPPOTrainer`` (``trainer.use_v1=false``);
  :func:`main` (``python -m rlsd_kernels.integrations.verl`` + verl's Hydra overrides) runs verl's PPO entry point
  with it. verl's TransferQueue trainer (``trainer.use_v1=true``, verl's default) is not supported yet.

verl's options are mapped onto the loss exactly (clip ratios, dual clip, every ``loss_agg_mode`` with verl's global
batch normalisation, ``loss_mode`` vanilla / gspo, ``use_kl_loss`` with the kl / mse / low_var_kl estimators,
``entropy_coeff``, rollout-correction ``rollout_is_weights``); options the loss cannot honour raise ``ValueError``
naming the option.
"""
from __future__ import annotations

from typing import Mapping, Optional

import torch

from verl import DataProto
from verl.utils import tensordict_utils as tu
from verl.utils.metric import AggregationType, Metric
from verl.workers.utils.padding import left_right_2_no_padding, no_padding_2_padding

from ..api import token_logprobs
from .._inputs import logits_stand_in, prepare
from ..hyper import Hyper
from ..loss import loss_from_logprobs
from ..loss_terms import Terms, loss_with_terms

__all__ = ["TEACHER_KEY", "LOGPROBS_KEY", "verl_aggregation", "RLSDLossFn", "build_teacher_batch",
           "add_teacher_log_probs", "RLSDTrainerMixin", "rlsd_trainer_class", "main"]

TEACHER_KEY = "rlsd_teacher_log_probs"   # not verl's "teacher_logprobs" (its top-k distillation field)
LOGPROBS_KEY = "rlsd_log_probs"          # per-token log-probs handed back by the logits route


def _get(config, name, default=None):
    if isinstance(config, Mapping):
        return config.get(name, default)
    return getattr(config, name, default)


# ------------------------------------------------------------------------------------------- aggregation
def verl_aggregation(loss_agg_mode: str, response_mask, dp_size=1, batch_num_tokens=None, global_batch_size=None,
                     loss_scale_factor=None):
    """verl's ``agg_loss(loss_agg_mode, dp_size, batch_num_tokens, global_batch_size, loss_scale_factor)`` as our
    ``(loss_agg_mode, norm, scale)``: ``verl loss == scale * rlsd loss(loss_agg_mode, norm)`` on this micro-batch."""
    dp = int(dp_size or 1)
    mask = response_mask.to(torch.bool)
    if loss_agg_mode == "token-mean":
        if batch_num_tokens is None:
            if dp > 1:
                raise ValueError("loss_agg_mode='token-mean' with dp_size > 1 needs batch_num_tokens")
            return "token", None, 1.0
        return "sum", max(float(batch_num_tokens), 1e-30) / dp, 1.0
    if loss_agg_mode == "token-sum":
        return "sum", 1.0 / dp, 1.0
    if loss_agg_mode in ("seq-mean-token-sum", "seq-mean-token-sum-norm"):
        if global_batch_size is None:
            if dp > 1:
                raise ValueError(f"loss_agg_mode={loss_agg_mode!r} with dp_size > 1 needs global_batch_size")
            global_batch_size = int(mask.any(-1).sum())
        norm = max(float(global_batch_size), 1.0) / dp
        if loss_agg_mode == "seq-mean-token-sum-norm":
            norm *= float(loss_scale_factor if loss_scale_factor is not None else mask.shape[-1])
        return "sum", norm, 1.0
    if loss_agg_mode == "seq-mean-token-mean":
        if global_batch_size is None:
            if dp > 1:
                raise ValueError("loss_agg_mode='seq-mean-token-mean' with dp_size > 1 needs global_batch_size")
            return "seq", None, 1.0
        # ours divides by the local non-empty sequences, verl by global_batch_size / dp_size
        return "seq", None, mask.any(-1).sum().to(torch.float32) * dp / float(global_batch_size)
    raise ValueError(f"loss_agg_mode {loss_agg_mode!r} is not supported by the RLSD loss; use token-mean, "
                     "token-sum, seq-mean-token-sum, seq-mean-token-sum-norm or seq-mean-token-mean")


def _clip_ratios(actor_config):
    """verl's (clip_ratio_low, clip_ratio_high, clip_ratio_c), defaults resolved as compute_policy_loss_vanilla does."""
    clip = _get(actor_config, "clip_ratio", 0.2)
    low = _get(actor_config, "clip_ratio_low")
    high = _get(actor_config, "clip_ratio_high")
    return (clip if low is None else low), (clip if high is None else high), _get(actor_config, "clip_ratio_c", 3.0)


# verl's kl_loss_type -> our kl_type. The "+" variants are verl's straight-through estimators (the value of the named
# estimator, the gradient of k2): only "k2+" / "mse+" equal their plain estimator; "abs" and "full" have no match.
KL_LOSS_TYPES = {"kl": "k1", "k1": "k1", "mse": "k2", "k2": "k2", "mse+": "k2", "k2+": "k2", "low_var_kl": "k3",
                 "k3": "k3"}


def _terms_of(actor_config) -> Terms:
    """verl's loss options the RLSD loss applies exactly, as section 2c terms; ValueError naming any other option.

    - ``policy_loss.loss_mode``: "vanilla" (section 2) or "gspo" (``loss_type="gspo"``, verl's
      compute_policy_loss_gspo);
    - ``use_kl_loss`` / ``kl_loss_coef`` / ``kl_loss_type``: ``kl_coef * agg(kl_t)`` on ``ref_log_prob``, verl's
      actor aggregating the KL with the policy loss's ``loss_agg_mode``, as ours does;
    - ``entropy_coeff``: ``- entropy_coeff * agg(H_t)`` on the engine's differentiable per-token entropy.
    """
    policy_loss = _get(actor_config, "policy_loss") or {}
    loss_mode = _get(policy_loss, "loss_mode", "vanilla")
    if loss_mode not in ("vanilla", "gspo"):
        raise ValueError(f"actor.policy_loss.loss_mode={loss_mode!r}: the RLSD loss replaces verl's 'vanilla' and "
                         "'gspo' losses only")
    entropy_coeff = float(_get(actor_config, "entropy_coeff", 0.0) or 0.0)
    if entropy_coeff < 0:
        raise ValueError(f"actor.entropy_coeff must be >= 0 with the RLSD loss_fn, got {entropy_coeff}")
    kl_coef, kl_type = 0.0, "k3"
    if _get(actor_config, "use_kl_loss", False):
        kl_loss_type = _get(actor_config, "kl_loss_type", "low_var_kl")
        if kl_loss_type not in KL_LOSS_TYPES:
            raise ValueError(f"actor.kl_loss_type={kl_loss_type!r} has no exact equivalent in the RLSD loss (the "
                             "straight-through k1+/k3+ take k2's gradient; abs/full are not implemented); use one "
                             f"of {sorted(KL_LOSS_TYPES)}")
        kl_coef = float(_get(actor_config, "kl_loss_coef", 0.001))
        if kl_coef < 0:
            raise ValueError(f"actor.kl_loss_coef must be >= 0 with the RLSD loss_fn, got {kl_coef}")
        kl_type = KL_LOSS_TYPES[kl_loss_type]
    return Terms(kl_coef=kl_coef, kl_type=kl_type, gspo=loss_mode == "gspo", entropy_coef=entropy_coeff).validate()


# ------------------------------------------------------------------------------------------------ loss_fn
class RLSDLossFn:
    """``loss_fn`` for ``actor_rollout_wg.set_loss_fn``: verl's ppo_loss (vanilla or GSPO policy loss, KL loss,
    entropy bonus, rollout-correction weights) with RLSD evidence weights.

    ``actor_config``: verl's actor config (``ActorConfig`` or a mapping; clip ratios, ``loss_agg_mode``,
    ``loss_scale_factor``, ``policy_loss.loss_mode``, ``use_kl_loss`` / ``kl_loss_coef`` / ``kl_loss_type``,
    ``entropy_coeff`` are read from it). ``lam`` / ``eps_w``: the RLSD weight (``lam=0`` is verl's loss).
    ``lam`` may be reassigned between steps. The micro-batch must hold ``TEACHER_KEY`` when ``lam > 0``.
    """

    def __init__(self, actor_config, lam: float = 0.5, eps_w: float = 0.2):
        self.terms = _terms_of(actor_config)
        low, high, dual = _clip_ratios(actor_config)
        self.loss_agg_mode = _get(actor_config, "loss_agg_mode", "token-mean")
        self.loss_scale_factor = _get(actor_config, "loss_scale_factor")
        verl_aggregation(self.loss_agg_mode, torch.ones(1, 1))   # unsupported modes fail here, not mid-training
        self.hyper = Hyper(lam=lam, eps_w=eps_w, clip_low=low, clip_high=high, clip_dual=dual).validate()

    @property
    def lam(self) -> float:
        return self.hyper.lam

    @lam.setter
    def lam(self, value: float) -> None:
        self.hyper = self.hyper.replace(lam=value)

    def __call__(self, model_output=None, data=None, dp_group=None, student_logits=None, data_format: str = "thd"):
        if student_logits is not None:
            return self.score_logits(student_logits, data, data_format)
        return self.loss(model_output, data)

    def score_logits(self, student_logits, data, data_format: str = "thd"):
        """Logits-processor call: packed ``(1, nnz, V)`` logits (already divided by the temperature) to per-token
        log-probs of the next input token, ``(1, nnz)``, through the fused op."""
        if data_format != "thd":
            raise ValueError(f"data_format={data_format!r}: the RLSD logits route needs packed ('thd') logits")
        input_ids = data["input_ids"]
        flat = input_ids.values() if input_ids.is_nested else input_ids.reshape(-1)
        labels = torch.roll(flat, shifts=-1, dims=0)[None]   # the label of position t is token t + 1
        if tuple(labels.shape) != tuple(student_logits.shape[:-1]):
            raise ValueError(f"student_logits must have shape (1, {flat.numel()}, V) (packed, unsharded), got "
                             f"{tuple(student_logits.shape)}")
        return {LOGPROBS_KEY: token_logprobs(student_logits, labels)}

    def loss(self, model_output, data):
        """verl's ppo_loss contract: ``(loss, metrics)`` for one micro-batch."""
        key = LOGPROBS_KEY if LOGPROBS_KEY in model_output else "log_probs"
        log_prob = no_padding_2_padding(model_output[key], data)
        entropy = None
        if self.terms.entropy_coef > 0:
            if model_output.get("entropy", None) is None:
                raise ValueError("actor.entropy_coeff > 0 needs the per-token entropy in the model output (verl "
                                 "computes it when entropy_coeff != 0 or actor.calculate_entropy is set)")
            entropy = no_padding_2_padding(model_output["entropy"], data)
        fields = ["response_mask", "old_log_probs", "advantages"]
        if "rollout_is_weights" in data.keys():
            fields.append("rollout_is_weights")
        if self.terms.kl_coef > 0:
            if "ref_log_prob" not in data.keys():
                raise ValueError("actor.use_kl_loss needs the reference log-probs in the batch ('ref_log_prob')")
            fields.append("ref_log_prob")
        if TEACHER_KEY in data.keys():
            fields.append(TEACHER_KEY)
        elif self.hyper.lam > 0:
            raise ValueError(f"lam={self.hyper.lam} needs the teacher log-probs in the batch ({TEACHER_KEY!r}); run "
                             "add_teacher_log_probs before update_actor")
        padded = data.select(*fields).to_padded_tensor()
        mask = padded["response_mask"].to(torch.bool)
        mode, norm, scale = verl_aggregation(
            self.loss_agg_mode, mask, data["dp_size"], data["batch_num_tokens"], data["global_batch_size"],
            self.loss_scale_factor)
        h = self.hyper.replace(loss_agg_mode=mode, norm=norm)
        teacher = padded.get(TEACHER_KEY) if self.hyper.lam > 0 else None
        advantages = padded["advantages"]
        if "rollout_is_weights" in padded.keys():
            # verl multiplies each token's policy loss by its (detached, >= 0) weight; both policy losses are
            # positively homogeneous in the advantage (the clip branches and the RLSD weight depend on its sign
            # only), so w * loss_t(A) == loss_t(w * A) exactly, zero weights (IcePop) included
            weights = padded["rollout_is_weights"].to(advantages.dtype)
            if bool((weights[mask] < 0).any()):
                raise ValueError("rollout_is_weights must be >= 0 (the advantage scaling is exact for those only)")
            advantages = advantages * weights
        loss, metrics = rlsd_loss_from_logprobs(log_prob, padded["old_log_probs"], advantages, mask, teacher, h,
                                                scale, self.terms, padded.get("ref_log_prob"), entropy)
        # as ppo_loss: per-token metrics are means over micro-batches, and a loss normalised over the global batch
        # is a partial sum per micro-batch
        metrics = Metric.from_dict(metrics, aggregation=AggregationType.MEAN)
        global_norm = (data["dp_size"] > 1 or data["batch_num_tokens"] is not None
                       or data["global_batch_size"] is not None or self.loss_scale_factor is not None)
        metrics["actor/pg_loss"] = Metric(value=loss.detach(),
                                          aggregation=AggregationType.SUM if global_norm else AggregationType.MEAN)
        return loss, metrics


def rlsd_loss_from_logprobs(log_prob, old_log_prob, advantages, mask, teacher_log_prob, h: Hyper, scale=1.0,
                            terms: Optional[Terms] = None, ref_log_prob=None, entropy=None):
    """Section 2 (plus the section 2c ``terms``: KL to ``ref_log_prob``, GSPO, the bonus on the differentiable
    ``entropy``) on ``(B, T)`` per-token log-probs (``log_prob`` carries the gradient); returns ``(loss, metrics)``
    with verl-style metric names."""
    acc = torch.float64 if log_prob.dtype == torch.float64 else torch.float32
    labels = torch.zeros(log_prob.shape, dtype=torch.int64, device=log_prob.device)
    prep = prepare(logits_stand_in(log_prob[..., None], 1), None, labels, advantages, old_log_prob, mask,
                   teacher_log_prob, None, h)
    flat = lambda t: None if t is None else t.reshape(-1).to(acc)  # noqa: E731
    if terms is None or not terms.on:
        out = loss_from_logprobs(log_prob.reshape(-1).to(acc), prep.teacher_logprobs, prep, h)
    else:
        out = loss_with_terms(log_prob.reshape(-1).to(acc), prep.teacher_logprobs, prep, h, terms,
                              ref=flat(ref_log_prob), entropy_t=flat(entropy))
    loss = out.loss * scale
    m = out.metrics
    # verl's own metric names where they mean the same thing; the RLSD weight and section 2c metrics under rlsd/
    shared = ("pg_clipfrac", "pg_clipfrac_lower", "ppo_kl")
    metrics = {"actor/pg_loss": loss.detach().item(), **{f"actor/{k}": m[k] for k in shared}}
    extra = ("kl_mean", "entropy_mean")
    metrics.update({f"rlsd/{k}": m[k] for k in extra if k in m})
    if terms is not None and terms.kl_coef > 0:
        metrics["kl_coef"] = terms.kl_coef
    if teacher_log_prob is not None:
        metrics.update({f"rlsd/{k}": v for k, v in m.items() if k not in shared + extra})
    return loss, metrics


# ---------------------------------------------------------------------------------------- teacher batch
class _Fields(dict):
    """Format namespace: a missing field names itself and the fields there are."""

    def __missing__(self, key):
        raise ValueError(f"teacher_prompt_template uses {{{key}}} but the batch has no such field; fields: "
                         f"{sorted(self)}")


def build_teacher_batch(batch: DataProto, tokenizer, template: str, max_prompt_length: Optional[int] = None):
    """Teacher inputs: ``template.format(prompt=<decoded student prompt>, **non_tensor_fields_of_the_row)``
    tokenised, left-padded, followed by the unchanged (right-padded) response tokens, in verl's padded layout
    (``prompts``, ``responses``, ``input_ids``, ``attention_mask``, ``position_ids``, ``response_mask``)."""
    if not isinstance(template, str) or not template:
        raise ValueError("template must be a non-empty format string over the batch's non-tensor fields")
    prompts, responses = batch.batch["prompts"], batch.batch["responses"]
    attn = batch.batch["attention_mask"]
    P, B = prompts.shape[1], prompts.shape[0]
    texts = []
    for i in range(B):
        row = _Fields({k: v[i] for k, v in batch.non_tensor_batch.items()})
        row.setdefault("prompt", tokenizer.decode(prompts[i][attn[i, :P].bool()], skip_special_tokens=False))
        texts.append(template.format_map(row))
    ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    if any(len(x) == 0 for x in ids):   # verl's unpadding assumes every prompt has a token
        raise ValueError("template produced a teacher prompt with no tokens")
    longest = max(len(x) for x in ids)
    if max_prompt_length is not None and longest > max_prompt_length:
        raise ValueError(f"a teacher prompt has {longest} tokens, more than max_prompt_length={max_prompt_length}")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    t_prompts = torch.full((B, longest), pad, dtype=prompts.dtype)
    t_mask = torch.zeros((B, longest), dtype=attn.dtype)
    for i, x in enumerate(ids):   # left padding, as verl's prompts
        if x:
            t_prompts[i, longest - len(x):] = torch.tensor(x, dtype=prompts.dtype)
            t_mask[i, longest - len(x):] = 1
    resp_mask = attn[:, P:]
    attention_mask = torch.cat([t_mask.to(attn.device), resp_mask], dim=1)
    position_ids = (torch.cumsum(attention_mask, dim=1) - 1).clamp(min=0)
    tensors = {"prompts": t_prompts.to(prompts.device), "responses": responses,
               "input_ids": torch.cat([t_prompts.to(prompts.device), responses], dim=1),
               "attention_mask": attention_mask, "position_ids": position_ids,
               "response_mask": batch.batch["response_mask"] if "response_mask" in batch.batch.keys() else resp_mask}
    return DataProto.from_dict(tensors=tensors, meta_info=dict(batch.meta_info))


def add_teacher_log_probs(batch: DataProto, actor_rollout_wg, tokenizer, template: str,
                          max_prompt_length: Optional[int] = None) -> DataProto:
    """Score the teacher view with the actor (``compute_log_prob``, no gradient, as verl's ref-in-actor pass) and
    store ``(B, response_length)`` float32 log-probs as ``batch.batch[TEACHER_KEY]``; returns ``batch``."""
    teacher = build_teacher_batch(batch, tokenizer, template, max_prompt_length)
    td = left_right_2_no_padding(teacher.to_tensordict())
    tu.assign_non_tensor(td, calculate_entropy=False, compute_loss=False)
    output = actor_rollout_wg.compute_log_prob(td)
    log_probs = no_padding_2_padding(tu.get(output, "log_probs"), td)
    batch.batch[TEACHER_KEY] = log_probs.float()
    return batch


class RLSDTrainerMixin:
    """Mix into verl's ``RayPPOTrainer`` (``class T(RLSDTrainerMixin, RayPPOTrainer)``): installs
    :class:`RLSDLossFn` after ``init_workers`` and adds the teacher log-probs before each actor update. Settings
    come from ``config.rlsd`` (``teacher_prompt_template``, ``lam``, ``eps_w``, ``max_teacher_prompt_length``)."""

    def init_workers(self):
        super().init_workers()
        rlsd = self.config.get("rlsd")
        if rlsd is None or not rlsd.get("teacher_prompt_template"):
            raise ValueError("rlsd.teacher_prompt_template must be set (e.g. +rlsd.teacher_prompt_template=...)")
        self.rlsd_loss_fn = RLSDLossFn(self.config.actor_rollout_ref.actor, lam=float(rlsd.get("lam", 0.5)),
                                       eps_w=float(rlsd.get("eps_w", 0.2)))
        self.actor_rollout_wg.set_loss_fn(self.rlsd_loss_fn)

    def _update_actor(self, batch):
        if self.rlsd_loss_fn.lam > 0:
            rlsd = self.config.rlsd
            add_teacher_log_probs(batch, self.actor_rollout_wg, self.tokenizer, rlsd.teacher_prompt_template,
                                  rlsd.get("max_teacher_prompt_length"))
        return super()._update_actor(batch)


def rlsd_trainer_class():
    """``RayPPOTrainer`` with :class:`RLSDTrainerMixin` (built on demand: importing the trainer pulls in Ray)."""
    from verl.trainer.ppo.ray_trainer import RayPPOTrainer

    return type("RLSDRayPPOTrainer", (RLSDTrainerMixin, RayPPOTrainer), {})


def _rlsd_task_runner():
    """verl's DataProto task runner (a Ray actor) whose trainer is the RLSD one."""
    import ray
    from verl.trainer import main_ppo_v0

    class RLSDTaskRunner(main_ppo_v0.TaskRunner.__ray_actor_class__):
        def run(self, config):
            # main_ppo_v0 builds the trainer from its module-level name; this runs inside the runner's process
            main_ppo_v0.RayPPOTrainer = rlsd_trainer_class()
            return super().run(config)

    return ray.remote(RLSDTaskRunner)


def main():
    """verl's ``main_ppo`` (same Hydra config and overrides) with the RLSD trainer; needs ``trainer.use_v1=false``
    and an ``rlsd`` section (``+rlsd.teacher_prompt_template=...``)."""
    from verl.trainer import main_ppo

    run_ppo = main_ppo.run_ppo

    def run_rlsd(config, task_runner_class):
        if config.trainer.use_v1:
            raise ValueError("trainer.use_v1 must be false: RLSD runs on verl's DataProto trainer (RayPPOTrainer)")
        if not config.get("rlsd", {}).get("teacher_prompt_template"):
            raise ValueError("rlsd.teacher_prompt_template must be set (e.g. +rlsd.teacher_prompt_template=...)")
        return run_ppo(config, _rlsd_task_runner())

    main_ppo.run_ppo = run_rlsd
    main_ppo.main()


if __name__ == "__main__":
    main()
