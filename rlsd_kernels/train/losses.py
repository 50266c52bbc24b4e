"""The one place that picks the op computing the GRPO / RLSD / GRPO+OPSD loss of a trainer step.

The fused ``rlsd_loss`` does not take the SPEC section 2c terms yet, so a step with any of them on goes through the
eager reference (exact math; the trainer's vocabulary is tiny, so the full log_softmax costs little). Once the fused
op takes the terms, this function switches to it and nothing else in the trainer changes.
"""
from __future__ import annotations

from typing import Any, Dict, Optional

import torch

from .. import rlsd_loss
from ..reference import rlsd_loss_eager


def policy_loss(student_logits: torch.Tensor, teacher_logits: Optional[torch.Tensor], labels: torch.Tensor,
                advantages: torch.Tensor, mask: torch.Tensor, hyper: Dict[str, Any], terms: Dict[str, Any],
                ref_logprobs: Optional[torch.Tensor] = None):
    """``rlsd_loss`` with the run's hyper-parameters ``hyper`` plus the section 2c ``terms`` that are on
    (``TrainConfig.extra_terms``); ``ref_logprobs`` when ``kl_coef`` is among them."""
    if not terms:
        return rlsd_loss(student_logits, teacher_logits, labels, advantages, mask=mask, return_entropy=True, **hyper)
    return rlsd_loss_eager(student_logits, teacher_logits, labels, advantages, mask=mask, return_entropy=True,
                           ref_logprobs=ref_logprobs, **hyper, **terms)
