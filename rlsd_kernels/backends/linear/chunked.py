"""The fused linear path: row chunks of ``hidden @ weight^T (+ bias)`` through the logits-level ops, on every device.

Each chunk's logits come from one GEMM (cuBLAS on CUDA, MKL/oneDNN on CPU) into a scratch buffer reused by every
chunk (with teacher hidden states, the teacher's log-probs first come from a walk of their own: ``TEACHER_WALK``),
and go through the logits backend that ``dispatch.chunk_backend`` picks (Triton on CUDA, C++ or the reference on
CPU). The logits never exist whole: the scratch is at most ``SCRATCH_FRACTION`` of one ``N x V`` logits tensor (and at most
``CHUNK_BUDGET_BYTES``).

Two entry points:

- :func:`loss_forward` (``rlsd_linear_loss``): the whole loss. Per chunk, the stats pass gives the log-probs, the
  O(rows) algebra of ``loss.py`` gives each row's gradient factor, the gradient sweep turns the chunk's student
  logits *in place* into ``d loss / d logits``, and two GEMMs contract it into ``d hidden`` (rows of the chunk)
  and ``d weight`` (accumulated). The gradients are complete when the forward ends: nothing is recomputed, the
  autograd backward only scales them by ``grad_output``. Four GEMMs in all, the floor of any implementation.
- :func:`forward` / :func:`backward` (``token_logprobs_linear``): scoring, differentiable through log-probs whose
  downstream gradient is unknown in the forward, so the backward recomputes each chunk's logits (five GEMMs).

An earlier Triton GEMM-tile kernel that fused the projection into the vocabulary pass ran at ~88 TFLOP/s on an
H200 (1156 ms against 124 ms for cuBLAS logits + the logits op at 16384 x 4096 x 151936,
bench/results/gpu-check-cuda-nvidia-h200-2026-11-26.md); it was removed in favour of this design.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ... import loss as loss_math
from ..logits import alloc_row_outputs

# The chunk's logits scratch (student + teacher rows) is at most this fraction of one N x V logits tensor of the
# input dtype (docs/math.md section 8's memory target), ...
SCRATCH_FRACTION = 0.15
# ... and at most this many bytes, so that very long batches do not hold GiBs of scratch (1 GiB is >= 1700 rows of
# a 151936-vocabulary chunk in bf16 with a teacher: GEMMs that large run at full speed).
CHUNK_BUDGET_BYTES = 1 << 30
# Tiny batches (under ~200 rows) still get chunks of this many rows; their scratch, MIN_CHUNK_ROWS x V per stream,
# is tiny next to any model. (A floor of 128 rows held 50% of the logits as scratch at 512 x 128 x 151936.)
MIN_CHUNK_ROWS = 16
# d weight of a bf16/fp16 weight is accumulated in float32, in this many vocabulary blocks: on CUDA each chunk's
# product is added into the block's float32 sum by the GEMM itself (_mixed_addmm); elsewhere it is formed per block
# in the input dtype (one rounding, as eager autograd's single GEMM) and then added, so the temporary is
# 1/WEIGHT_BLOCKS of the weight. The float32 sums are released block by block as they are cast back.
WEIGHT_BLOCKS = 8
# With teacher hidden states and no distillation term, the teacher's log-probs come first, from a walk of their own
# (``forward``: per chunk its GEMM and the statistics pass), and the student's walk then gets the whole scratch
# for its own rows: twice the rows per chunk, so half the chunks, each of which costs a read and a write of the
# float32 weight-gradient sums (a bf16 weight) or of the weight gradient itself (float32), beyond its GEMMs. The
# GEMMs are the same four. False: the student and teacher rows of a chunk stacked in one GEMM (the A/B switch of
# ``python -m bench.linear``'s fused_linear_stacked row). A distillation divergence reads the teacher's whole rows
# in the gradient sweep, so it keeps them stacked.
TEACHER_WALK = True


def rows_per_chunk(N: int, V: int, streams: int = 1, elem_bytes: int = 4) -> int:
    """Rows per chunk: ``SCRATCH_FRACTION`` of the batch (split over ``streams`` = student and teacher logits),
    at least ``MIN_CHUNK_ROWS``, never more than ``CHUNK_BUDGET_BYTES`` of scratch (read at call time: tests
    shrink it)."""
    by_fraction = max(MIN_CHUNK_ROWS, int(SCRATCH_FRACTION * N / streams))
    by_budget = max(1, CHUNK_BUDGET_BYTES // (streams * max(V, 1) * elem_bytes))
    return max(1, min(N, by_fraction, by_budget))


def _logits_backend(device):
    """Run the chunks on ``dispatch.chunk_backend`` (never the Triton interpreter)."""
    from ... import dispatch

    return dispatch.force_backend(dispatch.chunk_backend(device))


def _store(outs, r0: int, r1: int, *rows) -> None:
    """One chunk's rows (``logp_s, logp_t, lse_s, entropy``, ...) into the outputs of the whole batch (None: not
    asked)."""
    for out, part in zip(outs, rows):
        if out is not None:
            out[r0:r1] = part


def _chunks(n: int, step: int):
    for r0 in range(0, n, step):
        yield r0, min(n, r0 + step)


def _project(x, weight, bias, out):
    """``out = x @ weight^T + bias`` (``out`` a prefix of the scratch buffer)."""
    if bias is None:
        return torch.mm(x, weight.t(), out=out)
    return torch.addmm(bias, x, weight.t(), out=out)


def _bias_acc(bias):
    return torch.float64 if bias is not None and bias.dtype == torch.float64 else torch.float32


_MIXED_ADDMM = {}  # (device, dtype) -> "out" | "new" | None: see _mixed_addmm


def _mixed_addmm(device, dtype):
    """How ``torch.addmm(acc, a, b, out_dtype=torch.float32)`` can add a bf16/fp16 product into a float32 sum on
    ``device`` (cuBLAS accumulates in float32 and adds into ``acc`` in its epilogue: no product temporary, no
    separate add; PyTorch has it on CUDA only): ``"out"`` in place, ``"new"`` as a new tensor, ``None`` not at all.
    Found once per device and dtype by trying it on a small product (one host sync, at the first call)."""
    key = (device.type, device.index, dtype)
    if key not in _MIXED_ADDMM:
        _MIXED_ADDMM[key] = None
        if device.type == "cuda":
            g = torch.Generator(device="cpu").manual_seed(0)
            a, b, acc = (torch.randn(*shape, generator=g, device="cpu") for shape in ((64, 32), (32, 48), (64, 48)))
            a, b, acc = a.to(device, dtype), b.to(device, dtype), acc.to(device)
            want = acc + a.float() @ b.float()
            for mode in ("out", "new"):
                try:
                    x = acc.clone()
                    if mode == "out":
                        torch.addmm(x, a, b, out_dtype=torch.float32, out=x)
                    else:
                        x = torch.addmm(x, a, b, out_dtype=torch.float32)
                    if x.dtype == torch.float32 and torch.allclose(x, want, rtol=1e-3, atol=1e-3):
                        _MIXED_ADDMM[key] = mode
                        break
                except (RuntimeError, TypeError):
                    continue
    return _MIXED_ADDMM[key]


class _WeightGrad:
    """``d weight = sum over chunks of g_chunk^T @ h_chunk``. A float32/float64 weight accumulates in its own
    dtype in place; a low-precision weight in float32 blocks (``WEIGHT_BLOCKS``): summing the chunk products in
    bf16 measured 2.7x eager's error (4.5e-3 vs 1.66e-3 relative, 14 chunks: ``python -m bench.dw_accumulation``)."""

    def __init__(self, weight, n_chunks: int):
        self.dtype, self.shape, self.device = weight.dtype, weight.shape, weight.device
        self.exact = weight.dtype in (torch.float32, torch.float64)
        self.single = n_chunks == 1
        self.dw = None
        self.blocks = None

    def add(self, g, h):
        if self.single:  # one chunk: the product is the gradient
            self.dw = g.t() @ h
        elif self.exact:
            if self.dw is None:
                self.dw = torch.zeros(self.shape, dtype=self.dtype, device=self.device)
            self.dw.addmm_(g.t(), h)
        else:
            V = self.shape[0]
            step = -(-V // WEIGHT_BLOCKS)
            if self.blocks is None:
                self.blocks = [torch.zeros((min(V, v0 + step) - v0, self.shape[1]), dtype=torch.float32,
                                           device=self.device) for v0 in range(0, V, step)]
            mixed = _mixed_addmm(self.device, g.dtype)
            for b, v0 in enumerate(range(0, V, step)):
                gb = g[:, v0:v0 + step].t()
                if mixed == "out":
                    torch.addmm(self.blocks[b], gb, h, out_dtype=torch.float32, out=self.blocks[b])
                elif mixed == "new":
                    self.blocks[b] = torch.addmm(self.blocks[b], gb, h, out_dtype=torch.float32)
                else:  # the product in the input dtype (a 1/WEIGHT_BLOCKS temporary), then the float32 add
                    self.blocks[b].add_(gb @ h)

    def result(self):
        if self.dw is not None:
            return self.dw
        if self.blocks is None:  # no rows at all
            return torch.zeros(self.shape, dtype=self.dtype, device=self.device)
        parts = []
        while self.blocks:  # release each float32 block as soon as it is cast
            parts.append(self.blocks.pop(0).to(self.dtype))
        return torch.cat(parts)


class _Contraction:
    """The gradients of hidden states, weight and bias from the row chunks' logit gradients ``g``:
    ``d hidden[rows] = g @ W``, ``d W += g^T @ h[rows]`` (``_WeightGrad``), ``d b += sum_rows g``."""

    def __init__(self, hidden, weight, bias, n_chunks: int, need_hidden: bool, need_weight: bool, need_bias: bool):
        self.weight = weight
        self.bias_dtype = None if bias is None else bias.dtype
        self.dh = torch.empty(hidden.shape, dtype=hidden.dtype, device=hidden.device) if need_hidden else None
        self.dw = _WeightGrad(weight, n_chunks) if need_weight else None
        self.db = (torch.zeros(weight.shape[0], dtype=_bias_acc(bias), device=weight.device)
                   if need_bias and bias is not None else None)

    def add(self, g, h, r0: int, r1: int) -> None:
        if self.dh is not None:
            torch.mm(g, self.weight, out=self.dh[r0:r1])
        if self.dw is not None:
            self.dw.add(g, h)
        if self.db is not None:
            self.db += g.sum(0, dtype=self.db.dtype)

    def result(self):
        """``(d_hidden | None, d_weight | None, d_bias | None)`` in the dtypes of the inputs."""
        return (self.dh, None if self.dw is None else self.dw.result(),
                None if self.db is None else self.db.to(self.bias_dtype))


# ------------------------------------------------------------------------------------------- the whole loss
def loss_forward(hidden, weight, bias, teacher_hidden, labels, valid, advantages, old, teacher_logprobs, agg, h,
                 want_entropy, need_hidden, need_weight, need_bias):
    """docs/math.md sections 2-3 on ``logits = hidden @ weight^T + bias`` with the gradients formed chunk by chunk.

    ``labels`` int64 ``[N]``, ``valid`` bool ``[N]``, ``advantages``/``old``/``teacher_logprobs``/``agg`` ``[N]``
    in the accumulation dtype (``agg`` the aggregation weights of the WHOLE batch, so chunks need no global pass).
    Returns ``(loss, logp_s, logp_t | None, g, entropy | None, metrics, d_hidden | None, d_weight | None,
    d_bias | None)``.
    """
    from ... import ops
    from ...ops import fused_rows

    N, V = hidden.shape[0], weight.shape[0]
    dev = hidden.device
    acc = advantages.dtype
    any_grad = need_hidden or need_weight or (need_bias and bias is not None)
    if any_grad and takes_fused_rows(dev):
        # statistics, gradient factor and gradient in one visit of each row, into the chunk's logits
        tlp = teacher_logprobs if teacher_hidden is None else None
        logp_s, logp_t, ent, _, *grads = fused_walk(
            hidden, weight, bias, teacher_hidden, labels, h, want_entropy, need_hidden, need_weight, need_bias,
            lambda r0, r1: fused_rows.token_slice(r0, r1, advantages, agg, old, tlp))
    else:
        streams = 2 if teacher_hidden is not None else 1
        step = rows_per_chunk(N, V, streams, hidden.element_size())
        chunks = list(_chunks(N, step))
        logp_s, logp_t, lse_s, ent = alloc_row_outputs(N, dev, teacher_hidden is not None, want_entropy)
        contraction = _Contraction(hidden, weight, bias, len(chunks), need_hidden, need_weight,
                                   need_bias and bias is not None)
        scratch = torch.empty((streams * min(step, N), V), dtype=hidden.dtype, device=dev)
        T = h.temperature
        with torch.no_grad(), _logits_backend(dev):
            for r0, r1 in chunks:
                z_s, z_t = _chunk_logits(hidden, teacher_hidden, weight, bias, scratch, r0, r1)
                lab = labels[r0:r1]
                ls, lt, lse, e = ops.fused_logprobs(z_s, z_t, lab, T, h.ignore_index, want_entropy, False)
                _store((logp_s, logp_t, lse_s, ent), r0, r1, ls, lt, lse, e)
                if not any_grad:
                    continue
                lt_rows = lt if z_t is not None else (None if teacher_logprobs is None else teacher_logprobs[r0:r1])
                coef = loss_math.token_coef(ls.to(acc), None if lt_rows is None else lt_rows.to(acc),
                                            advantages[r0:r1], None if old is None else old[r0:r1], valid[r0:r1],
                                            agg[r0:r1], h)
                ops.fused_logprobs_backward_inplace(coef.to(torch.float32), z_s, lab, lse, T)  # z_s is now d logits
                contraction.add(z_s, hidden[r0:r1], r0, r1)
            del scratch
        grads = contraction.result()
    lt_all = logp_t if teacher_hidden is not None else teacher_logprobs
    loss, _, g, metrics = loss_math.loss_and_coef(logp_s.to(acc), None if lt_all is None else lt_all.to(acc),
                                                  advantages, old, valid, agg, h)
    return (loss, logp_s, logp_t, g, ent, metrics) + tuple(grads)


def takes_fused_rows(device, x=None) -> bool:
    """Whether the chunk backend of ``device`` has the fused rows (C++, Triton) for the terms ``x`` (None: the plain
    loss): ``fused_walk`` then serves the loss."""
    from ... import dispatch
    from ...ops import fused_rows

    with _logits_backend(device):
        return fused_rows.backend_takes(dispatch.get_backend(device), x)


def _chunk_logits(hidden, teacher_hidden, weight, bias, scratch, r0: int, r1: int):
    """Rows ``[r0, r1)``'s student and teacher logits from one GEMM (the hidden blocks stacked: W is read once for
    both) into the front of ``scratch``."""
    r = r1 - r0
    hs = hidden[r0:r1]
    x = hs if teacher_hidden is None else torch.cat([hs, teacher_hidden[r0:r1]])
    z = _project(x, weight, bias, scratch[:x.shape[0]])
    return z[:r], (z[r:] if teacher_hidden is not None else None)


def uses_teacher_walk(teacher_hidden, x=None) -> bool:
    """Whether the loss takes the teacher's log-probs from ``teacher_walk`` first (``TEACHER_WALK``): teacher hidden
    states and no distillation divergence (``x``: the section 2c terms, None for the plain loss)."""
    return TEACHER_WALK and teacher_hidden is not None and (x is None or x.distill_coef <= 0)


def fused_walk(hidden, weight, bias, teacher_hidden, labels, h, want_entropy, need_hidden, need_weight, need_bias,
               tokens_of, x=None):
    """One walk over the row chunks: per chunk one GEMM, the backend's fused rows (statistics, each row's gradient
    factor, and the gradient written into the chunk's logits: ``ops/fused_rows.py``), then ``d hidden`` /
    ``d weight`` / ``d bias``. Four GEMMs in all, for the plain loss and for its token-local section 2c terms ``x``
    alike. With ``teacher_hidden`` the teacher's log-probs come from ``forward`` first (``uses_teacher_walk``)
    and enter each chunk as its ``teacher_lp``, or else the chunk's teacher rows are stacked into its GEMM.
    ``tokens_of(r0, r1)``: the fused rows' per-token inputs of the chunk. Returns ``(logp_s, logp_t | None,
    entropy | None, div | None, d_hidden | None, d_weight | None, d_bias | None)``, the per-token outputs flat
    ``[N]``."""
    from ...ops import fused_rows
    from ...loss_terms import Terms

    x = Terms() if x is None else x
    N, V = hidden.shape[0], weight.shape[0]
    dev = hidden.device
    walked_from = None
    if uses_teacher_walk(teacher_hidden, x):  # the student's chunks then get the whole scratch (TEACHER_WALK)
        walked_from, teacher_hidden = teacher_hidden, None
    streams = 2 if teacher_hidden is not None else 1
    step = rows_per_chunk(N, V, streams, hidden.element_size())
    chunks = list(_chunks(N, step))
    logp_s, logp_t, lse_s, ent = alloc_row_outputs(N, dev, teacher_hidden is not None,
                                                   bool(want_entropy) or x.entropy_coef > 0)
    div = torch.empty(N, dtype=torch.float32, device=dev) if x.distill_coef > 0 else None
    grads = _Contraction(hidden, weight, bias, len(chunks), need_hidden, need_weight, need_bias and bias is not None)
    scratch = torch.empty((streams * min(step, N), V), dtype=hidden.dtype, device=dev)
    walked = None
    if walked_from is not None:  # the teacher's walk: its log-probs, chunk by chunk in the same scratch
        walked = forward(walked_from, weight, bias, None, labels, h.temperature, h.ignore_index, False, scratch)[0]
    with torch.no_grad(), _logits_backend(dev):
        for r0, r1 in chunks:
            z_s, z_t = _chunk_logits(hidden, teacher_hidden, weight, bias, scratch, r0, r1)
            tokens = tokens_of(r0, r1)
            if walked is not None:
                tokens = dict(tokens, teacher_lp=walked[r0:r1].to(torch.float64))
            (ls, lt, lse, e, _, d, _), _ = fused_rows.forward_and_grad(z_s, z_t, labels[r0:r1], h, tokens,
                                                                      want_entropy, x, out=z_s)
            _store((logp_s, logp_t, lse_s, ent, div), r0, r1, ls, lt, lse, e, d)
            grads.add(z_s, hidden[r0:r1], r0, r1)  # z_s is now d logits
        del scratch
    return (logp_s, logp_t if walked is None else walked, ent, div) + grads.result()


# ------------------------------------------------------------------------------- scoring (token_logprobs_linear)
def forward(hidden, weight, bias, teacher, labels, temperature, ignore_index, want_entropy, scratch=None):
    """The statistics of every row (``(logp_s, logp_t | None, lse_s, entropy | None)``, flat ``[N]``): per chunk one
    GEMM (the teacher's rows stacked) into a scratch buffer, then the statistics pass. ``scratch``: a buffer of at
    least one chunk's logits to project into (``fused_walk``'s, for the teacher's walk), or None."""
    from ... import ops

    N, V = hidden.shape[0], weight.shape[0]
    dev = hidden.device
    streams = 2 if teacher is not None else 1
    step = rows_per_chunk(N, V, streams, hidden.element_size())
    if scratch is None:
        scratch = torch.empty((streams * min(step, N), V), dtype=hidden.dtype, device=dev)
    logp_s, logp_t, lse_s, ent = alloc_row_outputs(N, dev, teacher is not None, want_entropy)
    with torch.no_grad(), _logits_backend(dev):
        for r0, r1 in _chunks(N, step):
            z_s, z_t = _chunk_logits(hidden, teacher, weight, bias, scratch, r0, r1)
            ls, lt, lse, e = ops.fused_logprobs(z_s, z_t, labels[r0:r1], temperature, ignore_index, want_entropy,
                                                False)
            _store((logp_s, logp_t, lse_s, ent), r0, r1, ls, lt, lse, e)
    return logp_s, logp_t, lse_s, ent


def backward(grad_logp, hidden, weight, bias, labels, lse, temperature, need_hidden, need_weight, need_bias):
    from ... import ops

    N, V = hidden.shape[0], weight.shape[0]
    chunks = list(_chunks(N, rows_per_chunk(N, V, 1, hidden.element_size())))
    grads = _Contraction(hidden, weight, bias, len(chunks), need_hidden, need_weight, need_bias)
    grad = grad_logp.reshape(-1).to(torch.float32)
    lse = lse.reshape(-1).to(torch.float32)
    with torch.no_grad(), _logits_backend(hidden.device):
        for r0, r1 in chunks:
            h = hidden[r0:r1]
            z = F.linear(h, weight, bias).contiguous()
            ops.fused_logprobs_backward_inplace(grad[r0:r1].contiguous(), z, labels[r0:r1], lse[r0:r1].contiguous(),
                                                temperature)
            grads.add(z, h, r0, r1)
    return grads.result()


# ------------------------------------------------------------------------------ the section 2c terms (two passes)
# With the terms on, a token's gradient factor depends on its whole sequence (GSPO, sequence-level IS) or on the
# batch's rejection mask, so the loss algebra runs once all log-probs are known and the chunks are walked twice:
# statistics, then (backward) the recomputed logits turned into the gradient. Five GEMMs (six with a divergence,
# which also needs the teacher's chunk in the second walk), against four for the plain loss.
def forward_terms(hidden, weight, bias, teacher, labels, temperature, ignore_index, div_mode, beta):
    from ... import dispatch

    N, V = hidden.shape[0], weight.shape[0]
    dev = hidden.device
    step = rows_per_chunk(N, V, 2 if teacher is not None else 1, hidden.element_size())
    outs = None
    with torch.no_grad(), _logits_backend(dev):
        backend = dispatch.get_backend(dev)
        for r0, r1 in _chunks(N, step):
            z_s = F.linear(hidden[r0:r1], weight, bias)
            z_t = F.linear(teacher[r0:r1], weight, bias) if teacher is not None else None
            got = backend.forward_terms(z_s[None], None if z_t is None else z_t[None], labels[r0:r1], temperature,
                                        ignore_index, True, div_mode, beta)
            if outs is None:
                outs = [None if t is None else torch.empty(N, dtype=t.dtype, device=dev) for t in got]
            for buf, t in zip(outs, got):
                if buf is not None:
                    buf[r0:r1] = t
    if outs is None:  # no rows
        outs = [torch.empty(0, device=dev)] * 7
    return tuple(outs)


def backward_terms(coef, ent_coef, div_coef, hidden, weight, bias, teacher, labels, lse, entropy, lse_t, div, aux,
                   temperature, div_mode, beta, need_hidden, need_weight, need_bias):
    from ... import dispatch

    N, V = hidden.shape[0], weight.shape[0]
    dev = hidden.device
    chunks = list(_chunks(N, rows_per_chunk(N, V, 2 if div_mode else 1, hidden.element_size())))
    grads = _Contraction(hidden, weight, bias, len(chunks), need_hidden, need_weight, need_bias)
    sl = lambda t, r0, r1: None if t is None else t[r0:r1].contiguous()  # noqa: E731
    with torch.no_grad(), _logits_backend(dev):
        backend = dispatch.get_backend(dev)
        for r0, r1 in chunks:
            h = hidden[r0:r1]
            z = F.linear(h, weight, bias).contiguous()
            z_t = F.linear(teacher[r0:r1], weight, bias)[None] if div_mode else None
            backend.backward_terms(sl(coef, r0, r1), sl(ent_coef, r0, r1), sl(div_coef, r0, r1), z[None], z_t,
                                   labels[r0:r1], sl(lse, r0, r1), sl(entropy, r0, r1), sl(lse_t, r0, r1),
                                   sl(div, r0, r1), sl(aux, r0, r1), temperature, div_mode, beta, z[None])
            grads.add(z, h, r0, r1)
    return grads.result()
