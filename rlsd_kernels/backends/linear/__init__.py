"""Fused-linear backends: ``triton`` (GEMM tiles, CUDA) and ``chunked`` (row chunks through the logits op; CPU,
float64 and devices Triton does not serve), chosen by ``dispatch.get_linear_backend``. Each module exposes:

``forward(hidden, weight, bias, teacher, labels, temperature, ignore_index, want_entropy)``
    ``hidden [N, H]``, ``weight [V, H]`` (any strides), ``bias [V]`` or None, ``teacher [N, H]`` or None (teacher
    hidden states, projected with the same weight and bias), ``labels`` int64 ``[N]``. Returns float32 ``[N]``
    vectors ``(logp_s, logp_t | None, lse_s, entropy | None)`` of ``logits = hidden @ weight.T + bias``, as the
    logits backends' ``forward`` (see ``backends/logits/__init__.py``); the logits are never materialised whole.

``backward(grad_logp, hidden, weight, bias, labels, lse, temperature, need_hidden, need_weight, need_bias)``
    Returns ``(d_hidden | None, d_weight | None, d_bias | None)`` in the dtypes of the inputs (None where not asked),
    the gradients of ``sum_r grad_logp[r] * logp_s[r]`` through the projection.
"""
