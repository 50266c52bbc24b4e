"""rlsd-kernels: the fused RLSD (Self-Distilled RLVR) loss.

``rlsd_loss`` / ``RLSDLoss`` / ``token_logprobs`` / ``opsd_loss`` are the public API (docs/math.md section 5);
``rlsd_linear_loss`` / ``token_logprobs_linear`` take hidden states and the LM-head weight instead of logits;
``rlsd_kernels.reference`` holds the eager ground truth.
"""
from ._output import RLSDOutput
from .api import RLSDLoss, opsd_loss, rlsd_loss, token_logprobs
from .linear import rlsd_linear_loss, token_logprobs_linear

__all__ = ["rlsd_loss", "RLSDLoss", "token_logprobs", "opsd_loss", "RLSDOutput", "rlsd_linear_loss", "token_logprobs_linear"]
__version__ = "0.1.0"
