"""Every ``torch.library`` op of the package (schema, fake kernel, autograd), one module per op:

- ``fused_logprobs``: the vocabulary pass for scoring (``token_logprobs``), differentiable through its log-probs;
- ``fused_loss``: the whole RLSD loss (``rlsd_loss``), gradient formed in the forward;
- ``fused_loss_terms``: ``rlsd_loss`` with the section 2c terms on (the scoring op + the O(N) algebra);
- ``fused_linear``: hidden states + LM-head weight: the whole loss (``rlsd_linear_loss``) and the scoring pass
  (``token_logprobs_linear``).

Importing this package registers them all.
"""
from .fused_linear import fused_linear_logprobs, fused_linear_logprobs_backward, fused_linear_rlsd_loss
from .fused_logprobs import fused_logprobs, fused_logprobs_backward, fused_logprobs_backward_inplace
from .fused_loss import fused_rlsd_loss, scale_grad_

__all__ = ["fused_logprobs", "fused_logprobs_backward", "fused_logprobs_backward_inplace", "fused_rlsd_loss",
           "scale_grad_", "fused_linear_logprobs", "fused_linear_logprobs_backward", "fused_linear_rlsd_loss"]
