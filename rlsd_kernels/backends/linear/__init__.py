"""The fused linear op's implementation, ``chunked``: row chunks of ``hidden @ weight^T (+ bias)`` (torch GEMMs:
cuBLAS on CUDA, the CPU BLAS on CPU) through the logits backend of ``dispatch.chunk_backend`` (Triton on CUDA, C++
or the reference on CPU). ``ops/fused_linear.py`` registers its entry points as ``torch.library`` ops:

``loss_forward(...)``
    The whole RLSD loss with the gradients of hidden states, weight and bias formed chunk by chunk in the forward.
``forward(hidden, weight, bias, teacher, labels, temperature, ignore_index, want_entropy)`` / ``backward(...)``
    The scoring pass (float32 ``[N]`` vectors ``(logp_s, logp_t | None, lse_s, entropy | None)``) and its backward,
    which recomputes each chunk's logits.
"""
