"""Backends of the fused log-prob pass. Each module exposes the same two functions:

``forward(student, teacher, labels, temperature, ignore_index, want_entropy)``
    ``student``/``teacher``: ``[B, T, V]`` strided views (teacher may be None, and may split the same
    ``B*T`` rows differently, e.g. ``[1, B*T]`` when only one of them is contiguous), ``labels``: int64 ``[B*T]``.
    Returns float32 ``[B*T]`` vectors ``(logp_s, logp_t | None, lse_s, entropy | None)`` where
    ``lse_s = logsumexp(student / temperature)`` and log-probs are 0 at ``ignore_index`` labels.

``backward(grad_logp, student, labels, lse, temperature, out)``
    Writes ``grad_logp[r] * (onehot(labels[r]) - softmax(student[r] / T)) / T`` into ``out`` (``[B, T, V]``,
    the dtype of ``student``; ``out`` may be ``student`` itself for the in-place backward). Rows whose label is
    ``ignore_index`` have ``grad_logp = 0`` and so get a zero gradient without the backward knowing the index.
"""
