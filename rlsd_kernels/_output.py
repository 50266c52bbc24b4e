"""The output object of ``rlsd_loss`` (SPEC section 5)."""
from __future__ import annotations

from typing import Dict, NamedTuple, Optional

import torch

METRIC_NAMES = (
    "pg_clipfrac",
    "pg_clipfrac_lower",
    "ppo_kl",
    "weight_clip_low_frac",
    "weight_clip_high_frac",
    "delta_mean",
    "weight_mean",
)


class RLSDOutput(NamedTuple):
    """Result of one loss evaluation.

    A NamedTuple (not a dataclass) so that ``torch.compile(fullgraph=True)`` can return it. Metrics are kept as
    0-d tensors in ``metric_tensors`` and turned into Python floats only when ``.metrics`` is read, so that the
    loss itself never forces a device sync or a graph break.
    """

    loss: torch.Tensor
    logprobs: torch.Tensor
    teacher_logprobs: Optional[torch.Tensor]
    weights: torch.Tensor
    entropy: Optional[torch.Tensor]
    metric_tensors: Dict[str, torch.Tensor]

    @property
    def metrics(self) -> Dict[str, float]:
        if not self.metric_tensors:
            return {}
        stacked = torch.stack([self.metric_tensors[k].detach().to(torch.float64) for k in METRIC_NAMES]).tolist()
        return dict(zip(METRIC_NAMES, stacked))
