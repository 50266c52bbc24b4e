"""The output object of ``rlsd_loss`` (docs/math.md section 5)."""
from __future__ import annotations

from typing import Dict, NamedTuple, Optional, Tuple

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

    A NamedTuple (not a dataclass) so that ``torch.compile(fullgraph=True)`` can return it. The metrics are one
    float32 tensor (``METRIC_NAMES`` order) turned into Python floats only when ``.metrics`` is read, so that the
    loss itself never forces a device sync or a graph break.

    ``input_errors`` (int64 ``[3]`` or None) is how the Triton backend reports bad *values* without stalling the
    stream: ``[number of labels outside [0, V) that are not ignore_index, the first such label, 1 if cu_seqlens is
    malformed]``. Those tokens were left out of the loss (as if masked). Reading ``.metrics`` (or calling
    ``check_inputs()``) raises the ``ValueError`` the CPU backends raise before any kernel runs.

    ``extra_metric_names`` names the optional metrics of the docs/math.md section 2c terms that are on (e.g.
    ``("kl_mean",)``); their values follow the ``METRIC_NAMES`` ones in ``metric_values``. Empty (the default) when
    no such term is on, so ``metrics`` then holds exactly the ``METRIC_NAMES`` keys.
    """

    loss: torch.Tensor
    logprobs: torch.Tensor
    teacher_logprobs: Optional[torch.Tensor]
    weights: torch.Tensor
    entropy: Optional[torch.Tensor]
    metric_values: Optional[torch.Tensor]
    input_errors: Optional[torch.Tensor] = None
    vocab: int = 0
    ignore_index: int = -100
    extra_metric_names: Tuple[str, ...] = ()
    base_metric_names: Tuple[str, ...] = METRIC_NAMES  # () for opsd_loss, whose only metric is distill_mean

    @property
    def metric_names(self) -> Tuple[str, ...]:
        return tuple(self.base_metric_names) + tuple(self.extra_metric_names)

    @property
    def metric_tensors(self) -> Dict[str, torch.Tensor]:
        if self.metric_values is None:
            return {}
        return dict(zip(self.metric_names, self.metric_values.detach().unbind(0)))

    def _raise_for(self, errors) -> None:
        bad, first, bad_cu = errors
        if bad:
            raise ValueError(f"labels holds {first} ({bad} label(s) in all), outside [0, {self.vocab}) and not "
                             f"ignore_index={self.ignore_index}; those tokens were left out of the loss")
        if bad_cu:
            raise ValueError(f"cu_seqlens must start at 0, be non-decreasing and end at nnz={self.logprobs.numel()}")

    def check_inputs(self) -> None:
        """Raise the ValueError for bad label / cu_seqlens values found by the kernels (one host sync)."""
        if self.input_errors is not None:
            self._raise_for(self.input_errors.tolist())

    @property
    def metrics(self) -> Dict[str, float]:
        if self.metric_values is None:
            return {}
        values = self.metric_values.detach().to(torch.float64)
        names = self.metric_names
        if self.input_errors is None:
            return dict(zip(names, values.tolist()))
        # one transfer for the metrics and the error flags
        both = torch.cat([values, self.input_errors.to(torch.float64)]).tolist()
        k = len(names)
        self._raise_for([int(both[k]), self.input_errors[1].item() if both[k] else 0, int(both[k + 2])])
        return dict(zip(names, both[:k]))
