"""RLSD in TRL: ``RLSDGRPOConfig`` + ``RLSDGRPOTrainer``, a drop-in for TRL's ``GRPOConfig`` / ``GRPOTrainer``.

The trainer keeps TRL's whole loop (generation, rewards, group advantages, ``num_iterations``, gradient
accumulation, logging) and replaces only the loss: after TRL has generated and scored a batch, each row's
*teacher prompt* is built from its dataset columns with ``teacher_prompt_template`` (e.g.
``"{prompt}\\nReference answer: {answer}\\n"``), teacher prompt + the same completion ids are scored without
gradient, and the loss is :func:`rlsd_kernels.rlsd_loss` (``rlsd_route="logits"``) or the logit-free
:func:`rlsd_kernels.rlsd_linear_loss` (``rlsd_route="linear"``, the default, like TRL's own fused LM head).

TRL's ``loss_type`` normalisations map exactly onto the op's aggregation (``_aggregation``); with ``rlsd_lam=0``
the loss and its gradients are TRL's own (tests/integrations/trl). TRL's extra terms map onto the op's
docs/math.md section 2c terms (``_loss_terms``):

- ``beta > 0`` with ``use_bias_correction_kl=False``: TRL adds ``beta * (exp(ref - logp) - (ref - logp) - 1)``
  per token, which is the op's ``kl_type="k3"`` with ``kl_coef=beta`` and TRL's ``ref_per_token_logps``. The op
  clamps that estimator (verl's ``low_var_kl``: ``kl_t`` at most 10, zero gradient where the clamp is active); TRL
  does not. The two are identical while ``-11.0 < ref - logp < 2.6109`` on every token, i.e. while the reference
  gives a sampled token between 1.67e-5 and 13.6 times the policy's probability; outside that band TRL's per-token
  KL exceeds 10 and ours stays at 10 with no gradient. Such tokens are rare but reachable once the policy has
  moved far from the reference on a token it still samples (``rlsd/kl_clamped_frac`` counts them).
  ``use_bias_correction_kl=True`` (TRL's default) multiplies the KL by the differentiable ratio
  ``exp(logp - old)``, which the op does not have: refused.
- ``use_vllm`` + ``vllm_importance_sampling_correction`` with ``vllm_importance_sampling_mode`` ``token_truncate`` /
  ``sequence_truncate``: TRL multiplies the clipped policy loss (not the KL, not the entropy bonus) by
  ``min(exp(d), clip_max)``, ``d`` the masked ``old - sampler`` log-prob difference per token or summed per
  sequence; that is the op's ``rollout_is="token"|"sequence"``, ``rollout_is_mode="truncate"``,
  ``rollout_is_threshold=clip_max``, with ``rollout_logprobs`` = TRL's ``sampling_per_token_logps`` (a NaN one
  replaced by the old log-prob, TRL's ratio 1). The op clamps ``d`` to [-20, 20]: with ``clip_max < exp(20)`` that
  only changes weights below 2.1e-9. The ``*_mask`` modes are refused: TRL zeroes the ratio of a rejected token,
  which keeps it in the normalisers, the KL and the entropy bonus, while the op removes it from the mask. A
  ``clip_min > 0`` (a lower truncation) is refused: the op truncates from above only.
- ``entropy_coef > 0``: TRL subtracts ``entropy_coef`` times the mean token entropy of the micro-batch (divided by
  the accumulation steps) for every loss type; the op subtracts ``entropy_coef`` times the entropy aggregated like
  the policy loss, so the coefficient is rescaled per call for the sum-normalised types (``dapo``, ``dr_grpo``,
  ``luspo``) and passed as is for ``bnpo``. ``grpo`` averages per sequence, which no coefficient turns into a token
  mean: refused there, as is ``use_adaptive_entropy``.

Other options whose per-token algebra the fused op does not implement (entropy masks, off-policy masks,
sequence-level importance sampling of the policy ratio, CISPO / SAPO / VESPO) are refused at init with a
``ValueError``.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

import torch
from trl import GRPOConfig, GRPOTrainer
from trl.data_utils import is_conversational
from trl.trainer.utils import pad

from .. import rlsd_linear_loss, rlsd_loss, token_logprobs_linear
from ..hf import causal_lm_hidden, lm_head_of
from ..hyper import check_real

__all__ = ["RLSDGRPOConfig", "RLSDGRPOTrainer", "rlsd_lam_at"]

ROUTES = ("linear", "logits")
# TRL loss types whose surrogate is PPO's clipped ratio (the op's loss_type="ppo"); see _aggregation
SUPPORTED_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo")
# Never reached by the op's ratio (exp of a log-ratio clamped to +-20, i.e. at most 4.9e8): no dual clip, as in TRL
# without `delta`
_NO_DUAL_CLIP = 1e9
# TRL's vLLM importance-sampling modes the op reproduces exactly: its level (the op's `rollout_is`)
TRUNCATE_IS_LEVELS = {"token_truncate": "token", "sequence_truncate": "sequence"}
# The op's k3 value exp(r) - r - 1 reaches its clamp of 10 outside this band of r = ref - logp (roots of
# exp(r) - r - 1 = 10); inside it the op's k3 and TRL's unclamped estimator are the same function
K3_UNCLAMPED_BAND = (-10.999983298020256, 2.6108686381498756)


@dataclass
class RLSDGRPOConfig(GRPOConfig):
    """TRL's ``GRPOConfig`` plus the RLSD fields (docs/math.md sections 2.2 and 2.6)."""

    teacher_prompt_template: str | None = field(
        default=None,
        metadata={"help": "Format string over the dataset's columns that builds the teacher's (privileged) prompt, "
                          "e.g. '{prompt}\\nReference answer: {answer}\\n'. Required when rlsd_lam > 0."})
    rlsd_lam: float = field(
        default=0.5, metadata={"help": "Initial mix of the evidence weight, in [0, 1]; 0 is plain GRPO."})
    rlsd_lam_decay_steps: int = field(
        default=50, metadata={"help": "lam decays linearly from rlsd_lam to 0 over this many optimizer steps "
                                      "(0 keeps it constant)."})
    rlsd_eps_w: float = field(default=0.2, metadata={"help": "Clip of the evidence weight, in [0, 1)."})
    teacher_sync_steps: int = field(
        default=0, metadata={"help": "0: the live policy scores the teacher view; k > 0: a frozen copy of the "
                                     "policy, re-synced every k optimizer steps."})
    rlsd_route: str = field(
        default="linear", metadata={"help": "'linear': hidden states + LM head, no logits (single process); "
                                            "'logits': the model's logits of the completion positions."})

    def __post_init__(self):
        super().__post_init__()
        check_real("rlsd_lam", self.rlsd_lam, low=0.0, high=1.0)
        check_real("rlsd_eps_w", self.rlsd_eps_w, low=0.0, high=1.0, high_open=True)
        for name in ("rlsd_lam_decay_steps", "teacher_sync_steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an int >= 0, got {value!r}")
        if self.rlsd_route not in ROUTES:
            raise ValueError(f"rlsd_route must be one of {ROUTES}, got {self.rlsd_route!r}")
        if self.teacher_prompt_template is not None and (
                not isinstance(self.teacher_prompt_template, str) or not self.teacher_prompt_template.strip()):
            raise ValueError(f"teacher_prompt_template must be a non-empty str, got {self.teacher_prompt_template!r}")
        if self.rlsd_lam > 0 and self.teacher_prompt_template is None:
            raise ValueError("teacher_prompt_template is required when rlsd_lam > 0 (it builds the teacher's view)")


def rlsd_lam_at(args: RLSDGRPOConfig, global_step: int) -> float:
    """lam during optimizer step ``global_step + 1``: ``rlsd_lam`` decaying linearly to 0 over
    ``rlsd_lam_decay_steps`` (the reference trainer's schedule, ``rlsd_kernels.train.config.lam_at``)."""
    if args.rlsd_lam_decay_steps == 0:
        return float(args.rlsd_lam)
    return max(0.0, float(args.rlsd_lam) * (1.0 - global_step / args.rlsd_lam_decay_steps))


def _refuse_unsupported(args) -> None:
    """ValueError for the TRL options whose loss terms the fused op cannot reproduce exactly (checked before TRL's
    own init, which would otherwise e.g. start vLLM first)."""
    if args.loss_type not in SUPPORTED_LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {SUPPORTED_LOSS_TYPES} with RLSDGRPOTrainer, got "
                         f"{args.loss_type!r} (its surrogate is not PPO's clipped ratio)")
    if args.importance_sampling_level != "token":
        raise ValueError("importance_sampling_level must be 'token' with RLSDGRPOTrainer (the op's ratio is per "
                         f"token), got {args.importance_sampling_level!r}")
    if args.use_vllm and args.vllm_importance_sampling_correction:
        _refuse_unsupported_vllm_is(args)
    if args.beta < 0.0:
        raise ValueError(f"beta must be >= 0 with RLSDGRPOTrainer (the op's kl_coef), got {args.beta}")
    if args.beta != 0.0 and args.use_bias_correction_kl:
        raise ValueError("use_bias_correction_kl=True (TRL's default) multiplies the KL by the differentiable ratio "
                         "exp(logp - old), which the fused op's KL term does not have: set use_bias_correction_kl="
                         "False with beta > 0 (the KL is then TRL's k3 estimator, the op's kl_type='k3')")
    if args.top_entropy_quantile < 1.0:
        raise ValueError("top_entropy_quantile < 1 (high-entropy token mask) is not supported by RLSDGRPOTrainer")
    if args.off_policy_mask_threshold is not None:
        raise ValueError("off_policy_mask_threshold is not supported by RLSDGRPOTrainer")
    if args.use_adaptive_entropy:
        raise ValueError("use_adaptive_entropy (Skywork-OR1's entropy controller) is not supported by "
                         "RLSDGRPOTrainer; a constant entropy_coef is")
    if args.entropy_coef < 0.0:
        raise ValueError(f"entropy_coef must be >= 0 with RLSDGRPOTrainer (an entropy bonus), got {args.entropy_coef}")
    if args.entropy_coef != 0.0 and args.loss_type == "grpo":
        raise ValueError("entropy_coef > 0 is not supported with loss_type='grpo' by RLSDGRPOTrainer: TRL's bonus "
                         "is a token mean, the op aggregates it like grpo's per-sequence mean; use bnpo, dapo, "
                         "dr_grpo or luspo")
    epsilon_high = args.epsilon_high if args.epsilon_high is not None else args.epsilon
    if args.delta is not None and args.delta <= 1.0 + epsilon_high:
        raise ValueError(f"delta must be > 1 + epsilon_high = {1.0 + epsilon_high} with RLSDGRPOTrainer "
                         f"(it is then the op's dual clip), got {args.delta}")


def _refuse_unsupported_vllm_is(args) -> None:
    """ValueError for the vLLM importance-sampling settings the op's rollout IS term does not reproduce exactly."""
    mode = args.vllm_importance_sampling_mode
    if mode not in TRUNCATE_IS_LEVELS:
        raise ValueError(f"vllm_importance_sampling_mode={mode!r} is not supported by RLSDGRPOTrainer: TRL's mask modes "
                         "zero the ratio of a rejected token but keep it in the loss normalisers, the KL and the "
                         "entropy bonus, while the op removes it from the mask. Use one of "
                         f"{tuple(TRUNCATE_IS_LEVELS)} or vllm_importance_sampling_correction=False")
    if args.vllm_importance_sampling_clip_min not in (None, 0, 0.0):
        raise ValueError("vllm_importance_sampling_clip_min > 0 (a lower truncation of the ratio) is not supported by "
                         f"RLSDGRPOTrainer, got {args.vllm_importance_sampling_clip_min}; leave it None")
    cap = args.vllm_importance_sampling_clip_max
    if cap is None or not math.isfinite(cap) or cap <= 1.0:
        raise ValueError("vllm_importance_sampling_clip_max must be a finite float > 1 with RLSDGRPOTrainer (the "
                         f"op's rollout_is_threshold), got {cap}")


def _refuse_unsupported_setup(trainer, args) -> None:
    """ValueError for what only the built trainer knows: an MoE aux loss, several processes with the linear route."""
    if trainer.aux_loss_enabled:
        raise ValueError("the MoE router aux loss is not supported by RLSDGRPOTrainer: set router_aux_loss_coef=0")
    if args.rlsd_route == "linear" and trainer.accelerator.num_processes > 1:
        raise ValueError("rlsd_route='linear' calls the backbone directly and supports one process only; use "
                         "rlsd_route='logits' for multi-process training")


class RLSDGRPOTrainer(GRPOTrainer):
    """TRL's ``GRPOTrainer`` with the RLSD loss; takes an :class:`RLSDGRPOConfig` as ``args``."""

    def __init__(self, *trl_args, args: RLSDGRPOConfig | None = None, **trl_kwargs):
        if not isinstance(args, RLSDGRPOConfig):
            raise ValueError(f"args must be an RLSDGRPOConfig, got {type(args).__name__}")
        _refuse_unsupported(args)
        super().__init__(*trl_args, args=args, **trl_kwargs)
        _refuse_unsupported_setup(self, args)
        self._teacher_copy = None
        self._teacher_synced_at = 0
        if args.teacher_sync_steps > 0:
            self._teacher_copy = copy.deepcopy(self.accelerator.unwrap_model(self.model)).eval().requires_grad_(False)

    # ------------------------------------------------------------------------------------ teacher prompts
    def _teacher_prompts(self, rows):
        """Each row's teacher prompt: the template over its columns (conversational rows: into the last message)."""
        template = self.args.teacher_prompt_template
        prompts = []
        for row in rows:
            conversational = is_conversational(row)
            values = dict(row)
            if conversational:
                values["prompt"] = row["prompt"][-1]["content"]
            try:
                text = template.format(**values)
            except KeyError as missing:
                raise ValueError(f"teacher_prompt_template names the column {missing}, which the dataset row lacks "
                                 f"(columns: {sorted(row)})") from None
            prompts.append(row["prompt"][:-1] + [{**row["prompt"][-1], "content": text}] if conversational else text)
        return prompts

    def _generate_and_score_completions(self, inputs):
        output = super()._generate_and_score_completions(inputs)
        if self.args.teacher_prompt_template is None:
            return output
        # TRL's output keeps only tensors; the dataset columns are in `inputs`, one row per completion
        ids, _, _ = self._tokenize_prompts(self._teacher_prompts(inputs))
        device = output["prompt_ids"].device
        ids = [torch.tensor(x) for x in ids]
        output["teacher_prompt_ids"] = pad(ids, padding_value=self._tokenizer.pad_token_id, padding_side="left",
                                           pad_to_multiple_of=self.pad_to_multiple_of).to(device)
        output["teacher_prompt_mask"] = pad([torch.ones_like(x) for x in ids], padding_value=0, padding_side="left",
                                            pad_to_multiple_of=self.pad_to_multiple_of).to(device)
        return output

    # ------------------------------------------------------------------------------------ teacher scoring
    def _teacher_model(self):
        live = self.accelerator.unwrap_model(self.model)
        if self._teacher_copy is None:
            return live
        if self.state.global_step - self._teacher_synced_at >= self.args.teacher_sync_steps:
            self._teacher_copy.load_state_dict(live.state_dict())
            self._teacher_synced_at = self.state.global_step
        return self._teacher_copy

    def _score_teacher(self, inputs, completion_ids, completion_mask, student_head):
        """Keyword arguments for the op: ``teacher_hidden`` (linear route, live teacher sharing the student's head)
        or per-token ``teacher_logprobs``, scored under no_grad."""
        teacher = self._teacher_model()
        n = completion_ids.size(1)
        ids = torch.cat([inputs["teacher_prompt_ids"], completion_ids], dim=1)
        mask = torch.cat([inputs["teacher_prompt_mask"], completion_mask], dim=1)
        with torch.no_grad(), self.accelerator.autocast():
            hidden = causal_lm_hidden(teacher, ids, mask)[:, -n - 1:-1]
            weight, bias = lm_head_of(teacher)
            if self.args.rlsd_route == "linear" and weight is student_head[0] and bias is student_head[1]:
                return {"teacher_hidden": hidden}
            if self.args.cast_lm_head_to_fp32:
                hidden = hidden.float()
            weight = weight.to(hidden.dtype)
            bias = None if bias is None else bias.to(hidden.dtype)
            return {"teacher_logprobs": token_logprobs_linear(hidden, weight, completion_ids, bias, self.temperature)}

    # ------------------------------------------------------------------------------------ the loss
    def _aggregation(self, mask, inputs, mode):
        """``(loss_agg_mode, norm, scale)`` so that ``scale * op_loss`` is TRL's normalised loss for its loss_type,
        including the division by the gradient-accumulation steps that TRL applies (HF's own scaling is off)."""
        accum = self.current_gradient_accumulation_steps if mode == "train" else 1
        rows = mask.size(0)
        if self.loss_type == "grpo":
            # TRL: mean over ALL rows of each row's token mean (an empty row counts as 0); the op's "seq" mode
            # averages over the non-empty rows only, hence the factor non_empty / rows
            non_empty = int((mask.sum(-1) > 0).sum())
            return "seq", None, non_empty / rows / accum
        if self.loss_type == "bnpo":
            return "token", None, 1.0 / accum
        if self.loss_type == "dr_grpo":
            return "sum", float(rows * self.max_completion_length * accum), 1.0
        if self.loss_type == "luspo":
            return "sum", float(rows * accum), 1.0
        # dapo: the token count of the whole generation batch, rescaled to one accumulation window
        norm = inputs["num_items_in_batch"].clamp(min=1.0) / self.accelerator.num_processes
        if mode == "train":
            norm = norm * accum / self.args.steps_per_generation
        return "sum", float(norm), 1.0

    def _loss_terms(self, inputs, mask, old, agg_mode, norm, mode):
        """The op's section 2c keyword arguments for TRL's KL, vLLM importance sampling and entropy bonus (the
        mapping and its limits are in the module docstring)."""
        terms = {}
        if self.beta != 0.0:
            terms.update(ref_logprobs=inputs["ref_per_token_logps"], kl_coef=float(self.beta), kl_type="k3")
        if self.use_vllm and self.vllm_importance_sampling_correction:
            if old is None:
                raise ValueError("old_per_token_logps is missing from the batch: TRL computes it whenever "
                                 "vllm_importance_sampling_correction is on")
            sampled = inputs["sampling_per_token_logps"]
            # TRL turns a NaN difference (no sampler log-prob) into 0, i.e. ratio 1: the same as sampler = old
            sampled = torch.where(torch.isnan(sampled), old, sampled)
            terms.update(rollout_logprobs=sampled, rollout_is=TRUNCATE_IS_LEVELS[self.vllm_importance_sampling_mode],
                         rollout_is_threshold=float(self.vllm_importance_sampling_clip_max), rollout_is_mode="truncate")
        if self.entropy_coef != 0.0:
            coef = float(self.entropy_coef)
            if agg_mode == "sum":  # the op divides the entropy sum by `norm`; TRL by the token count and accum steps
                accum = self.current_gradient_accumulation_steps if mode == "train" else 1
                coef = coef * norm / (float(mask.sum().clamp(min=1.0)) * accum)
            terms["entropy_coef"] = coef
        return terms

    def current_rlsd_lam(self) -> float:
        return rlsd_lam_at(self.args, self.state.global_step)

    def _compute_loss(self, model, inputs):
        completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
        input_ids = torch.cat([inputs["prompt_ids"], completion_ids], dim=1)
        attention_mask = torch.cat([inputs["prompt_mask"], completion_mask], dim=1)
        mask = completion_mask if "tool_mask" not in inputs else completion_mask * inputs["tool_mask"]
        n = completion_ids.size(1)
        mode = "train" if self.model.training else "eval"
        lam = self.current_rlsd_lam()
        agg_mode, norm, scale = self._aggregation(mask, inputs, mode)
        hyper = dict(lam=lam, eps_w=self.args.rlsd_eps_w, clip_low=self.epsilon_low, clip_high=self.epsilon_high,
                     clip_dual=self.args.delta if self.args.delta is not None else _NO_DUAL_CLIP, loss_type="ppo",
                     loss_agg_mode=agg_mode, norm=norm, temperature=self.temperature, return_entropy=True)
        old = inputs.get("old_per_token_logps")  # None: on-policy (ratio 1), as in TRL
        advantages = inputs["advantages"]
        unwrapped = self.accelerator.unwrap_model(model)
        head = lm_head_of(unwrapped)
        teacher = self._score_teacher(inputs, completion_ids, completion_mask, head) if lam > 0 else {}
        terms = self._loss_terms(inputs, mask, old, agg_mode, norm, mode)

        if self.args.rlsd_route == "logits":
            with self.accelerator.autocast():  # through the (possibly wrapped) model, as TRL calls it
                logits = model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=n + 1).logits
            out = rlsd_loss(logits[:, :-1], None, completion_ids, advantages, old, mask, **teacher, **terms, **hyper)
        else:
            with self.accelerator.autocast():
                hidden = causal_lm_hidden(unwrapped, input_ids, attention_mask)[:, -n - 1:-1]
            weight, bias = head
            if self.args.cast_lm_head_to_fp32:
                hidden = hidden.float()
            elif hidden.dtype != weight.dtype:  # autocast: project in the activations' dtype, as F.linear would
                weight = weight.to(hidden.dtype)
                bias = None if bias is None else bias.to(hidden.dtype)
            if "teacher_hidden" in teacher:
                teacher["teacher_hidden"] = teacher["teacher_hidden"].to(hidden.dtype)
            out = rlsd_linear_loss(hidden, weight, completion_ids, advantages, old, mask, lm_head_bias=bias,
                                   **teacher, **terms, **hyper)
        loss = out.loss * scale
        self._log_rlsd_metrics(out, mask, lam, mode, terms, loss)
        return loss

    def _log_rlsd_metrics(self, out, mask, lam, mode, terms, loss):
        """Our metrics (docs/math.md sections 2.7 and 2c) and the entropy, through TRL's metric store (averaged per
        log). The op's ``kl_mean`` is logged under TRL's own name ``kl``; with the entropy bonus on, TRL's
        ``policy_loss`` and ``entropy_coef`` are logged as TRL logs them."""
        values = self.accelerator.gather(out.metric_values.detach()[None]).mean(0)  # mean over processes
        out.check_inputs()
        for name, value in zip(out.metric_names, values.tolist()):
            if name == "entropy_mean":  # logged below under TRL's name `entropy`
                continue
            self._metrics[mode]["kl" if name == "kl_mean" else f"rlsd/{name}"].append(value)
        self._metrics[mode]["rlsd/lam"].append(lam)
        m = mask.to(out.entropy.dtype)
        totals = self.accelerator.reduce(torch.stack([(out.entropy * m).sum(), m.sum()]), reduction="sum")
        self._metrics[mode]["entropy"].append((totals[0] / totals[1].clamp(min=1.0)).item())
        if "kl_coef" in terms:
            r = (terms["ref_logprobs"] - out.logprobs.detach()).to(m.dtype)
            clamped = ((r <= K3_UNCLAMPED_BAND[0]) | (r >= K3_UNCLAMPED_BAND[1])).to(m.dtype)
            counts = self.accelerator.reduce(torch.stack([(clamped * m).sum(), m.sum()]), reduction="sum")
            self._metrics[mode]["rlsd/kl_clamped_frac"].append((counts[0] / counts[1].clamp(min=1.0)).item())
        if self.entropy_coef != 0.0:
            # TRL's policy_loss: the loss before the bonus, before the division by the accumulation steps (dapo's
            # normaliser already holds them)
            accum = self.current_gradient_accumulation_steps if mode == "train" else 1
            bonus = self.entropy_coef * float((out.entropy.detach() * m).sum() / m.sum().clamp(min=1.0)) / accum
            policy = (float(loss.detach()) + bonus) * (1 if self.loss_type == "dapo" else accum)
            self._metrics[mode]["policy_loss"].append(
                self.accelerator.gather(torch.tensor(policy, device=m.device)).nanmean().item())
            if mode == "train" and self.accelerator.sync_gradients:
                self._metrics[mode]["entropy_coef"].append(self.entropy_coef)
