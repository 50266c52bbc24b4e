"""The optional terms of docs/math.md section 2c, on flat ``[N]`` per-token vectors: the KL estimators, rollout
importance weights, GSPO's sequence ratio, and how all terms combine with the section 2 loss of ``loss.py``
(``loss_with_terms``). The full-vocabulary pieces (entropy, divergences) reach ``loss_with_terms`` as per-token
tensors computed by the caller (the kernels' row terms, or the eager reference)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch

from .hyper import LOSS_TYPES, Hyper, check_real
from .loss import (TokenTerms, _clamp, _inside, _output, _weights_or_grpo, aggregate, masked_inputs, metric_values,
                   token_terms)
from ._output import RLSDOutput

KL_TYPES = ("k1", "k2", "k3")
ROLLOUT_IS_LEVELS = ("token", "sequence")
ROLLOUT_IS_MODES = ("truncate", "mask")
DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")
EXTRA_METRIC_NAMES = ("kl_mean", "entropy_mean", "rollout_is_mean", "rollout_is_clipfrac", "distill_mean")


def _choice(name: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")


def check_divergence(divergence, beta, clip, prefix: str = ""):
    """Validate a section 2b divergence choice (``prefix`` "distill_" names the rlsd_loss arguments); returns
    ``(beta, clip)`` as floats (``clip`` None when off)."""
    _choice(f"{prefix}divergence", divergence, DIVERGENCES)
    if divergence == "jsd":
        if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not (0.0 < float(beta) < 1.0):
            raise ValueError(f"{prefix}beta must be in (0, 1) for jsd, got {beta}")
    if clip is not None:
        if isinstance(clip, bool) or not isinstance(clip, (int, float)):
            raise ValueError(f"{prefix}clip must be a positive finite number or None, got {type(clip).__name__}")
        clip = float(clip)
        if not math.isfinite(clip) or clip <= 0:
            raise ValueError(f"{prefix}clip must be a positive finite number, got {clip}")
    return (float(beta) if divergence == "jsd" else beta), clip


@dataclass(frozen=True)
class Terms:
    """The section 2c switches of one call; every term is off by default (then the loss is exactly section 2)."""

    kl_coef: float = 0.0
    kl_type: str = "k3"
    rollout_is: Optional[str] = None
    rollout_is_threshold: float = 2.0
    rollout_is_mode: str = "truncate"
    gspo: bool = False                   # loss_type="gspo"
    entropy_coef: float = 0.0
    distill_coef: float = 0.0
    distill_divergence: str = "forward_kl"
    distill_beta: float = 0.5
    distill_clip: Optional[float] = None

    def validate(self) -> "Terms":
        """Checks that need no tensor (ValueError naming the argument)."""
        for name in ("kl_coef", "entropy_coef", "distill_coef"):
            check_real(name, getattr(self, name), low=0.0)
        _choice("kl_type", self.kl_type, KL_TYPES)
        if self.rollout_is is not None:
            _choice("rollout_is", self.rollout_is, (None,) + ROLLOUT_IS_LEVELS)
        check_real("rollout_is_threshold", self.rollout_is_threshold, low=1.0, low_open=True)
        _choice("rollout_is_mode", self.rollout_is_mode, ROLLOUT_IS_MODES)
        check_divergence(self.distill_divergence, self.distill_beta, self.distill_clip, "distill_")
        return self

    @property
    def on(self) -> bool:
        """Whether any term is on (else the caller runs plain section 2, bit for bit)."""
        return (self.kl_coef > 0 or self.rollout_is is not None or self.gspo or self.entropy_coef > 0
                or self.distill_coef > 0)

    @property
    def needs_full_distribution(self) -> bool:
        """Terms that need the full vocabulary rows, not just the per-token log-probs."""
        return self.entropy_coef > 0 or self.distill_coef > 0


def hyper_and_terms(lam, eps_w, clip_low, clip_high, clip_dual, loss_type, loss_agg_mode, norm, temperature,
                    ignore_index, kl_coef, kl_type, rollout_is, rollout_is_threshold, rollout_is_mode, entropy_coef,
                    distill_coef, distill_divergence, distill_beta, distill_clip):
    """``(Hyper, Terms)`` of one call of the loss functions' flat keyword arguments, the terms validated (the hyper-
    parameters are validated by the caller's input checks). ``loss_type="gspo"`` is section 2's PPO algebra with
    the GSPO sequence ratio: ``Hyper.loss_type`` "ppo" and ``Terms.gspo``."""
    if loss_type not in LOSS_TYPES + ("gspo",):
        raise ValueError(f"loss_type must be one of {LOSS_TYPES + ('gspo',)}, got {loss_type!r}")
    x = Terms(kl_coef, kl_type, rollout_is, rollout_is_threshold, rollout_is_mode, loss_type == "gspo", entropy_coef,
              distill_coef, distill_divergence, distill_beta, distill_clip).validate()
    h = Hyper(lam, eps_w, clip_low, clip_high, clip_dual, "ppo" if x.gspo else loss_type, loss_agg_mode, norm,
              temperature, ignore_index)
    return h, x


def kl_penalty(logp_s, ref, kl_type: str):
    """verl's per-token KL estimators to a reference policy, differentiable through ``logp_s``:
    k1 ``logp_s - ref``; k2 ``(logp_s - ref)^2 / 2``; k3 (low-variance) ``exp(r) - r - 1``, ``r = ref - logp_s``,
    with ``r`` clamped to [-20, 20] and the result to [-10, 10]."""
    if kl_type == "k1":
        return logp_s - ref
    if kl_type == "k2":
        d = logp_s - ref
        return 0.5 * d * d
    r = _clamp(ref - logp_s, -20.0, 20.0)
    return _clamp(torch.exp(r) - r - 1.0, -10.0, 10.0)


def seq_sum(x, seq_ids, num_seqs: int):
    """Per token, the sum of ``x`` over the token's sequence."""
    return torch.zeros(num_seqs, dtype=x.dtype, device=x.device).index_add(0, seq_ids, x)[seq_ids]


class RolloutIS(NamedTuple):
    weight: torch.Tensor   # w_is, multiplies the policy-gradient term (min(rho, C); 1 in mask mode), detached
    keep: torch.Tensor     # bool: the token stays in the mask m (mask mode drops rejected tokens / sequences)
    rho: torch.Tensor      # raw importance ratio exp(clamp(log_rho, -20, 20)), detached
    flagged: torch.Tensor  # bool: truncated (rho > C) or rejected (rho outside [1/C, C])


def rollout_is_weights(old, rollout, valid, level: str, mode: str, threshold: float, seq_ids=None,
                       num_seqs: int = 0) -> RolloutIS:
    """Rollout importance-sampling correction (section 2c) from the trainer's ``old`` log-probs and the sampler's
    ``rollout`` log-probs; ``valid`` is the section 2 mask (sequence level sums over it)."""
    with torch.no_grad():
        diff = torch.where(valid, old - rollout, 0.0)
        log_rho = diff if level == "token" else seq_sum(diff, seq_ids, num_seqs)
        rho = torch.exp(_clamp(log_rho, -20.0, 20.0))
        if mode == "truncate":
            flagged = rho > threshold
            return RolloutIS(torch.minimum(rho, torch.full_like(rho, threshold)), valid, rho, flagged)
        flagged = ~((rho <= threshold) & (rho >= 1.0 / threshold))   # nan counts as rejected
        return RolloutIS(torch.ones_like(rho), valid & ~flagged, rho, flagged)


def rollout_is_of(x: "Terms", old, rollout, valid, seq_ids=None, num_seqs: int = 0) -> RolloutIS:
    """The call's rollout IS (``x.rollout_is`` on): :func:`rollout_is_weights` of ``old`` (already zero outside
    ``valid``) and the sampler's ``rollout`` log-probs in ``old``'s dtype, zeroed outside ``valid`` alike. One
    function for the loss (``loss_with_terms``) and the C++ one-visit path (``ops/fused_rows.py``), so that both see
    the same weights and the same rejection mask."""
    return rollout_is_weights(old, torch.where(valid, rollout.detach().to(old.dtype), 0.0), valid, x.rollout_is,
                              x.rollout_is_mode, float(x.rollout_is_threshold), seq_ids, num_seqs)


def gspo_terms(logp_s, logp_t, advantages, old_logp, valid, seq_ids, num_seqs: int, h: Hyper) -> TokenTerms:
    """GSPO (section 2c, verl's definition): the sequence-level ratio ``exp(mean_t m_t (logp_s - old))`` with a
    per-token gradient path, PPO clip without dual clip. Masked positions must already hold finite values."""
    ls = logp_s.detach()
    g, w, delta = _weights_or_grpo(ls, logp_t, advantages, h)
    a_hat = advantages * g
    old = ls if old_logp is None else old_logp
    with torch.no_grad():
        m = valid.to(ls.dtype)
        kl_seq = seq_sum(m * (ls - old), seq_ids, num_seqs) / seq_sum(m, seq_ids, num_seqs).clamp(min=1.0)
    seq_log_ratio = _clamp(logp_s - ls + kl_seq, -math.inf, 10.0)
    ratio = torch.exp(seq_log_ratio)
    lo, hi = 1.0 - h.clip_low, 1.0 + h.clip_high
    ratio_c = _clamp(ratio, lo, hi)
    l1 = -a_hat * ratio
    l2 = -a_hat * ratio_c
    loss_t = torch.maximum(l1, l2)
    with torch.no_grad():
        r = ratio.detach()
        d_ratio = r * _inside(seq_log_ratio.detach(), -math.inf, 10.0)
        c1, c2 = -a_hat * d_ratio, -a_hat * d_ratio * _inside(r, lo, hi)
        l1d, l2d = l1.detach(), l2.detach()
        coef = torch.where(l1d > l2d, c1, torch.where(l2d > l1d, c2, 0.5 * (c1 + c2)))
        clipped = l2d > l1d
        dual = torch.zeros_like(clipped)
        log_ratio = (logp_s - old).detach()
    return TokenTerms(loss_t, coef, g, w, delta, clipped, dual, log_ratio)


def masked_mean(x, valid):
    return torch.where(valid, x.detach().to(torch.float32), 0.0).sum() / valid.to(torch.float32).sum().clamp(min=1.0)


def loss_with_terms(logp_s, logp_t, prep, h: Hyper, x: Terms, *, ref=None, rollout=None, entropy_t=None,
                    distill_t=None, entropy=None) -> RLSDOutput:
    """Section 2 plus the section 2c terms, under autograd (flat ``[N]`` inputs; ``logp_s``, ``entropy_t`` and
    ``distill_t`` carry the gradient):

    ``loss = agg(w_is * loss_t) + kl_coef * agg(kl_t) - entropy_coef * agg(H_t) + distill_coef * agg(D_t)``,

    every ``agg`` over the same mask ``m`` (section 2's, less the tokens that rollout rejection drops), computed as
    one aggregation of the per-token sum. ``ref`` / ``rollout`` are per-token log-probs (needed when their term is
    on); ``entropy_t`` / ``distill_t`` the per-token entropy / divergence (needed when theirs is on).
    """
    valid = prep.valid
    ls, lt, old = masked_inputs(logp_s, logp_t, prep.old_logprobs, valid)
    extra = {}
    w_is = None
    if x.rollout_is is not None:
        ris = rollout_is_of(x, ls.detach() if old is None else old, rollout, valid, prep.seq_ids, prep.num_seqs)
        extra["rollout_is_mean"] = masked_mean(ris.rho, valid)
        extra["rollout_is_clipfrac"] = masked_mean(ris.flagged, valid)
        valid, w_is = ris.keep, ris.weight
    if x.gspo:
        terms = gspo_terms(ls, lt, prep.advantages, old, valid, prep.seq_ids, prep.num_seqs, h)
    else:
        terms = token_terms(ls, lt, prep.advantages, old, h)
    per_t = terms.loss_t if w_is is None else w_is * terms.loss_t
    if x.kl_coef > 0:
        kl_t = kl_penalty(ls, torch.where(prep.valid, ref.detach().to(ls.dtype), 0.0), x.kl_type)
        per_t = per_t + x.kl_coef * kl_t
        extra["kl_mean"] = masked_mean(kl_t, valid)
    if x.entropy_coef > 0:
        ent_t = torch.where(prep.valid, entropy_t.to(ls.dtype), 0.0)
        per_t = per_t - x.entropy_coef * ent_t
        extra["entropy_mean"] = masked_mean(ent_t, valid)
    if x.distill_coef > 0:
        d_t = torch.where(prep.valid, distill_t.to(ls.dtype), 0.0)
        per_t = per_t + x.distill_coef * d_t
        extra["distill_mean"] = masked_mean(d_t, valid)
    loss = aggregate(per_t, valid, h, prep.seq_ids, prep.num_seqs)
    names = tuple(n for n in EXTRA_METRIC_NAMES if n in extra)
    values = metric_values(terms, valid, h)
    if names:
        values = torch.cat([values, torch.stack([extra[n] for n in names])])
    return _output(loss, logp_s, logp_t, terms, entropy, prep, values, names)


__all__ = ["KL_TYPES", "ROLLOUT_IS_LEVELS", "ROLLOUT_IS_MODES", "DIVERGENCES", "EXTRA_METRIC_NAMES",
           "check_divergence", "Terms", "hyper_and_terms", "kl_penalty", "seq_sum", "RolloutIS", "rollout_is_weights",
           "rollout_is_of", "gspo_terms", "masked_mean", "loss_with_terms"]
