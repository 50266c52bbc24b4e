"""The loss hyper-parameters: one frozen object that declares their defaults and bounds once.

``rlsd_loss``, ``RLSDLoss``, ``rlsd_linear_loss``, the Hugging Face helper and the trainer all hold a ``Hyper``;
``Hyper.validate()`` is the only place that checks them (``ValueError`` naming the argument). The math behind
each field is in ``docs/math.md``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from typing import Optional

LOSS_TYPES = ("ppo", "cispo")
AGG_MODES = ("token", "seq", "sum")


def check_real(name: str, value, *, low=None, high=None, low_open=False, high_open=False) -> float:
    """``float(value)`` if it is a finite real number within the bounds, else ``ValueError`` naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    if low is not None and (value < low or (low_open and value == low)):
        raise ValueError(f"{name} must be {'>' if low_open else '>='} {low}, got {value}")
    if high is not None and (value > high or (high_open and value == high)):
        raise ValueError(f"{name} must be {'<' if high_open else '<='} {high}, got {value}")
    return value


@dataclass(frozen=True)
class Hyper:
    """Hyper-parameters of the RLSD loss (defaults of the paper / DAPO; see docs/math.md)."""

    lam: float = 1.0            # mix of the evidence weight: g = (1 - lam) + lam * clip(w); 0 is GRPO
    eps_w: float = 0.2          # evidence-weight clip: w in [1 - eps_w, 1 + eps_w]
    clip_low: float = 0.2       # PPO ratio clip, lower side: ratio >= 1 - clip_low
    clip_high: float = 0.28     # PPO ratio clip, upper side (DAPO's clip-higher): ratio <= 1 + clip_high
    clip_dual: float = 3.0      # dual clip for negative advantages
    loss_type: str = "ppo"      # "ppo" | "cispo"
    loss_agg_mode: str = "token"  # "token" | "seq" | "sum"
    norm: Optional[float] = None  # the constant divisor of loss_agg_mode="sum"
    temperature: float = 1.0
    ignore_index: int = -100

    # Bounds, declared once: (low, high, low_open, high_open)
    _BOUNDS = {
        "lam": (0.0, 1.0, False, False),
        "eps_w": (0.0, 1.0, False, True),
        "clip_low": (0.0, 1.0, False, True),
        "clip_high": (0.0, None, False, False),
        "clip_dual": (1.0, None, True, False),
        "temperature": (0.0, None, True, False),
    }

    def validate(self) -> "Hyper":
        for name, (low, high, low_open, high_open) in self._BOUNDS.items():
            check_real(name, getattr(self, name), low=low, high=high, low_open=low_open, high_open=high_open)
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {self.loss_type!r}")
        if self.loss_agg_mode not in AGG_MODES:
            raise ValueError(f"loss_agg_mode must be one of {AGG_MODES}, got {self.loss_agg_mode!r}")
        if self.loss_agg_mode == "sum":
            if self.norm is None:
                raise ValueError("norm must be given when loss_agg_mode='sum'")
            check_real("norm", self.norm, low=0.0, low_open=True)
        elif self.norm is not None:
            raise ValueError(f"norm is only used with loss_agg_mode='sum', got loss_agg_mode={self.loss_agg_mode!r}")
        if isinstance(self.ignore_index, bool) or not isinstance(self.ignore_index, int):
            raise ValueError(f"ignore_index must be an int, got {type(self.ignore_index).__name__}")
        return self

    def replace(self, **changes) -> "Hyper":
        """A copy with ``changes`` applied, validated."""
        return replace(self, **changes).validate()

    @classmethod
    def names(cls):
        return tuple(f.name for f in fields(cls))

    @classmethod
    def bounds(cls, name: str):
        """``(low, high, low_open, high_open)`` of a numeric hyper-parameter (for CLI help texts)."""
        return cls._BOUNDS[name]
