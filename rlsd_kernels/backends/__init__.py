"""Backends: the implementations behind the ``torch.library`` ops, chosen by ``rlsd_kernels.dispatch``.

- ``logits/``: backends that take ``[B, T, V]`` logits (the vocabulary pass of ``rlsd_loss`` / ``token_logprobs``):
  ``triton`` (GPU, or CPU under ``TRITON_INTERPRET=1``; also the fused loss ``triton_loss``), ``cpp`` (C++ CPU
  extension) and ``eager`` (the eager reference over row blocks, backend name ``"reference"``).
- ``linear/``: backends that take hidden states and the LM-head weight (``rlsd_linear_loss``): ``triton`` (GEMM tiles,
  logits never materialised) and ``chunked`` (row chunks through the logits op).

Shared by the Triton kernels of both: ``triton_common`` (helpers), ``triton_epilogue`` (the per-row loss epilogue)
and ``triton_launch`` (launch parameters).
"""
