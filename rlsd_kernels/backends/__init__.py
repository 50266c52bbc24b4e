"""Backends: the implementations behind the ``torch.library`` ops, chosen by ``rlsd_kernels.dispatch``.

- ``logits/``: backends that take ``[B, T, V]`` logits (the vocabulary pass of ``rlsd_loss`` / ``token_logprobs``
  and of the row terms): ``triton`` (GPU, or CPU under ``TRITON_INTERPRET=1``; also the fused loss ``triton_loss``
  and the row terms ``triton_terms``), ``cpp`` (C++ CPU extension) and ``eager`` (the eager reference over row
  blocks, backend name ``"reference"``).
- ``linear/``: the fused linear op (``rlsd_linear_loss``): ``chunked``, row chunks of torch GEMMs through the logits
  backend of the device.

Shared by the Triton kernels: ``triton_common`` (helpers), ``triton_epilogue`` (the per-row loss epilogue) and
``triton_launch`` (launch parameters).
"""
