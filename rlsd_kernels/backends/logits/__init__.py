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

``forward_terms(student, teacher, labels, temperature, ignore_index, want_entropy, div_mode, beta)``
    ``forward`` (with the entropy) plus, for a divergence mode (``DIV_MODES``), ``[B*T]`` vectors ``lse_t`` (the
    teacher's lse), ``div`` (``D_t`` of section 2b, unclipped) and ``aux`` (JSD: ``KL(p_S || M)``); ``None`` for
    mode 0. ``lse_s`` and ``lse_t`` are float64 here: at |logits| ~ 1e4 a float32 lse is rounded by ~5e-4, which
    the gradient sweep would turn into a relative error of every probability.

``backward_terms(coef, ent_coef, div_coef, student, teacher, labels, lse, entropy, lse_t, div, aux, temperature,
div_mode, beta, out)``
    Writes ``[coef (onehot - p) - ent_coef p (log p + H) + div_coef dD/dz] / T`` into ``out``: the gradient with
    the entropy bonus and the distillation term (``ent_coef`` / ``div_coef`` None when off).

``fused_rows(student, teacher, labels, temperature, ignore_index, want_entropy, div_mode, beta, tokens, hyper, out)``
    Optional (C++: ``csrc/rlsd_fused_rows.h``; Triton: ``triton_rows.py``): ``forward_terms``' outputs and the whole
    gradient of the loss with its token-local section 2c terms into ``out``, in one visit of each row, from the
    per-token inputs and scalars of ``ops/fused_rows.py``; ``FUSED_ROWS_DIV_MODES`` lists the divergences it takes.

The whole fused loss (docs/math.md sections 2-3) has a Triton implementation only, ``triton_loss`` (chosen by
``dispatch.get_loss_backend``): ``fused_loss(...)`` runs it in three kernels and ``scale_(grad, grad_output)``
scales the gradient it formed. The CPU backends compose ``forward``/``backward`` with the eager ``loss.py``
(``ops/fused_loss.py``).
"""

import torch

# The distillation divergence of the row terms (docs/math.md section 2b) as the backends' integer mode.
DIV_MODES = {None: 0, "forward_kl": 1, "reverse_kl": 2, "jsd": 3}


ROW_CHUNK = 2048  # csrc/rlsd_chunks.h kChunk: the C++ backend walks a row in chunks of this many elements


def row_stats_size(n: int, vocab: int) -> int:
    """Floats of the C++ ``forward``'s ``row_stats`` for ``n`` rows: each row's max and sum, then its running max after
    each chunk (the C++ side checks the size)."""
    return n * (2 + -(-vocab // ROW_CHUNK))


def alloc_row_outputs(n: int, device, has_teacher: bool, want_entropy: bool):
    """The float32 ``[n]`` outputs of a forward: ``(logp_s, logp_t | None, lse_s, entropy | None)``."""
    logp_s = torch.empty(n, dtype=torch.float32, device=device)
    lse_s = torch.empty_like(logp_s)
    logp_t = torch.empty_like(logp_s) if has_teacher else None
    ent = torch.empty_like(logp_s) if want_entropy else None
    return logp_s, logp_t, lse_s, ent
