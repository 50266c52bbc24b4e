"""The one place that calls the loss op of a GRPO / RLSD / GRPO+OPSD trainer step on logits.

The fused ``rlsd_loss`` takes the docs/math.md section 2c terms (``TrainConfig.extra_terms``) as keyword arguments; with
none of them on it is exactly section 2.
"""
from __future__ import annotations

from typing import Any, Dict, Optional

import torch

from .. import rlsd_loss


def policy_loss(student_logits: torch.Tensor, teacher_logits: Optional[torch.Tensor], labels: torch.Tensor,
                advantages: torch.Tensor, mask: torch.Tensor, hyper: Dict[str, Any], terms: Dict[str, Any],
                ref_logprobs: Optional[torch.Tensor] = None):
    """``rlsd_loss`` with the run's hyper-parameters ``hyper`` plus the section 2c ``terms`` that are on
    (``TrainConfig.extra_terms``); ``ref_logprobs`` when ``kl_coef`` is among them."""
    return rlsd_loss(student_logits, teacher_logits, labels, advantages, mask=mask, return_entropy=True,
                     ref_logprobs=ref_logprobs if "kl_coef" in terms else None, **hyper, **terms)
