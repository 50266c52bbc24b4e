"""An ``autograd.Function`` around a ``torch.library`` op's own ``setup_context`` / ``backward``, for eager calls.

The autograd that ``register_autograd`` installs costs ~100 us of host time per call in
``torch._library.utils.fill_defaults``, which rebuilds the schema's argument list (24 entries for the loss op) once
per argument; at 16384 x 32000 on a GPU that is a tenth of the whole forward+backward. Here the op is dispatched
below autograd and the context is set up from the arguments as given. torch.compile and ``torch.ops.rlsd_kernels.*``
keep the registered path (what ``opcheck`` and the compile tests check); both share the same two functions.
"""
from __future__ import annotations

import torch


def eager_autograd(setup_context, backward):
    """``call(op, student, *rest)`` = ``op(student, *rest)`` with the autograd of ``setup_context`` / ``backward``
    (the functions given to ``op.register_autograd``). Only ``student`` is an input of the autograd node: the ops
    give no other argument a gradient, so the rest travel as one tuple."""

    class _Eager(torch.autograd.Function):
        @staticmethod
        def forward(ctx, op, student, rest):
            args = (student,) + rest
            with torch._C._AutoDispatchBelowAutograd():
                out = op(*args)
            setup_context(ctx, args, out)
            return out

        @staticmethod
        def backward(ctx, *grads):
            return None, backward(ctx, *grads)[0], None

    def call(op, student, *rest):
        return _Eager.apply(op, student, rest)

    return call
