"""Logits backends: ``triton``, ``cpp``, ``eager`` (backend names ``"triton"``, ``"cpp"``, ``"reference"``; the
module is chosen by ``dispatch.get_backend``). Each module exposes the same two functions:

``forward(student, teacher, labels, temperature, ignore_index, want_entropy)``
    ``student``/``teacher``: ``[B, T, V]`` strided views (teacher may be None, and may split the same
    ``B*T`` rows differently, e.g. ``[1, B*T]`` when only one of them is contiguous), ``labels``: int64 ``[B*T]``.
    Returns float32 ``[B*T]`` vectors ``(logp_s, logp_t | None, lse_s, entropy | None)`` where
    ``lse_s = logsumexp(student / temperature)`` and log-probs are 0 at ``ignore_index`` labels.

``backward(grad_logp, student, labels, lse, temperature, out)``
    Writes ``grad_logp[r] * (onehot(labels[r]) - softmax(student[r] / T)) / T`` into ``out`` (``[B, T, V]``,
    the dtype of ``student``; ``out`` may be ``student`` itself for the in-place backward). Rows whose label is
    ``ignore_index`` have ``grad_logp = 0`` and so get a zero gradient without the backward knowing the index.

The whole fused loss (docs/math.md sections 2-3) has a Triton implementation only, ``triton_loss`` (chosen by
``dispatch.get_loss_backend``): ``fused_loss(...)`` runs it in three kernels and ``scale_(grad, grad_output)``
scales the gradient it formed. The CPU backends compose ``forward``/``backward`` with the eager ``loss.py``
(``ops/fused_loss.py``).
"""

import torch


def alloc_row_outputs(n: int, device, has_teacher: bool, want_entropy: bool):
    """The float32 ``[n]`` outputs of a forward: ``(logp_s, logp_t | None, lse_s, entropy | None)``."""
    logp_s = torch.empty(n, dtype=torch.float32, device=device)
    lse_s = torch.empty_like(logp_s)
    logp_t = torch.empty_like(logp_s) if has_teacher else None
    ent = torch.empty_like(logp_s) if want_entropy else None
    return logp_s, logp_t, lse_s, ent
