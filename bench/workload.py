"""Benchmark inputs and the byte model of docs/math.md section 8.

Inputs for one shape ``(N, V)``, laid out as ``[B, T, V]`` with ``B = seqs`` sequences of ``T = N / B`` tokens:

- ``student``: ``randn * scale`` in ``dtype`` (bf16 by default), ``teacher = student + 0.5 * scale * randn``, so the
  teacher is correlated with the student and the evidence weights land both inside and outside the clip range;
- ``labels``: uniform in ``[0, V)``;
- ``advantages``: per token, ``A[b, t] = s_b * (0.5 + u[b, t])``, ``s_b = +-1`` alternating by sequence (GRPO's
  outcome advantage, with a per-token magnitude; the sign is per sequence, as in GRPO/RLSD practice); with
  ``adv="seq"`` (the GPU check) one advantage per sequence, ``A[b] = s_b * (0.5 + u[b])``, shape ``[B]``;
- ``old_logprobs``: the student's own float32 log-probs plus noise clamped to ``+-0.5``, so the PPO ratio spans
  ``[0.61, 1.65]``: both clip sides are hit, the dual clip (ratio > 3) never is.

Everything is generated one sequence at a time (float32 scratch of ``T x V`` only), deterministically from the
seed, directly into the destination buffer, so a contender that needs another layout (Liger: ``[B, T + 1, V]``)
gets bit-identical logits without a second full-size copy ever existing.

:func:`make_shared_inputs` (the GPU check: one allocation per shape for every contender) holds ``N + B`` rows per
logits tensor: the first ``N`` rows are the contiguous ``[B, T, V]`` inputs of the plain contenders, the whole
buffer is Liger's ``[B, T + 1, V]`` layout. The two views see different rows of the same random data (same
distribution, same shapes, same bytes), which is all timing needs; correctness is checked on separate small inputs.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
          "fp32": torch.float32, "float32": torch.float32}


@dataclass
class Workload:
    N: int
    V: int
    dtype: torch.dtype
    device: torch.device
    seqs: int = 8
    scale: float = 2.0
    seed: int = 0
    lam: float = 0.5
    adv: str = "token"  # "token": advantages [B, T]; "seq": one per sequence, [B]

    @property
    def B(self) -> int:
        return self.seqs if self.N % self.seqs == 0 else 1

    @property
    def T(self) -> int:
        return self.N // self.B

    @property
    def itemsize(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()

    def bytes_moved(self, mode: str) -> int:
        """docs/math.md section 8: fwd reads z_S and z_T once; fwd+bwd also re-reads z_S and writes the gradient
        once."""
        k = 2 if mode == "fwd" else 4
        return k * self.N * self.V * self.itemsize


@dataclass
class Inputs:
    student: torch.Tensor  # [B, T, V] (a view into a larger buffer for the liger layout)
    teacher: torch.Tensor
    labels: torch.Tensor  # int64 [B, T]
    advantages: torch.Tensor  # float32 [B, T] (per token) or [B] (per sequence)
    old_logprobs: torch.Tensor  # float32 [B, T]
    student_buf: Optional[torch.Tensor] = None  # liger layout: the [B, T + 1, V] buffers
    teacher_buf: Optional[torch.Tensor] = None


def _gen(seed: int, device) -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    return g


def _student_row(w: Workload, b: int) -> torch.Tensor:
    g = _gen(w.seed * 1_000_003 + 2 * b + 11, w.device)
    return torch.randn((w.T, w.V), generator=g, device=w.device) * w.scale


def refill_student(inp: Inputs, w: Workload) -> None:
    """Rewrite the student logits (after an in-place backward overwrote them with the gradient)."""
    with torch.no_grad():
        for b in range(w.B):
            inp.student[b].copy_(_student_row(w, b))


def _advantages(w: Workload) -> torch.Tensor:
    sign = torch.tensor([1.0 if b % 2 == 0 else -1.0 for b in range(w.B)], device=w.device)
    g = _gen(w.seed * 7 + 3, w.device)
    if w.adv == "seq":
        return sign * (0.5 + torch.rand((w.B,), generator=g, device=w.device))
    if w.adv != "token":
        raise ValueError(f"Workload.adv must be 'token' or 'seq', got {w.adv!r}")
    return sign[:, None] * (0.5 + torch.rand((w.B, w.T), generator=g, device=w.device))


def _old_logprobs(student: torch.Tensor, labels: torch.Tensor, w: Workload, salt: int) -> torch.Tensor:
    B, T = labels.shape
    old = torch.empty((B, T), dtype=torch.float32, device=w.device)
    for b in range(B):
        x = torch.log_softmax(student[b].float(), dim=-1)
        old[b] = x.gather(1, labels[b][:, None]).squeeze(1)
        del x
    g = _gen(w.seed * 7 + salt, w.device)
    return old + (0.1 * torch.randn((B, T), generator=g, device=w.device)).clamp(-0.5, 0.5)


@torch.no_grad()
def make_shared_inputs(w: Workload):
    """``(plain, liger)`` inputs over one pair of ``(N + B) x V`` buffers (see the module docstring): ``plain``
    holds contiguous ``[B, T, V]`` views of the first ``N`` rows, ``liger`` the ``[B, T + 1, V]`` view of all rows
    (``liger.student`` is its ``[:, :T]`` view). Labels and advantages are shared; old log-probs are each view's own."""
    B, T, V, dev = w.B, w.T, w.V, w.device
    rows = B * (T + 1)
    sflat = torch.empty((rows, V), dtype=w.dtype, device=dev)
    tflat = torch.empty((rows, V), dtype=w.dtype, device=dev)
    for r0 in range(0, rows, T):  # one sequence's worth of float32 scratch at a time
        r1 = min(rows, r0 + T)
        g = _gen(w.seed * 1_000_003 + 2 * r0 + 11, dev)
        x = torch.randn((r1 - r0, V), generator=g, device=dev) * w.scale
        sflat[r0:r1].copy_(x)
        g = _gen(w.seed * 1_000_003 + 2 * r0 + 12, dev)
        x += torch.randn((r1 - r0, V), generator=g, device=dev) * (0.5 * w.scale)
        tflat[r0:r1].copy_(x)
        del x
    labels = torch.randint(0, V, (B, T), generator=_gen(w.seed * 7 + 1, dev), device=dev)
    adv = _advantages(w)
    ps, pt = sflat[: B * T].view(B, T, V), tflat[: B * T].view(B, T, V)
    ls, lt = sflat.view(B, T + 1, V), tflat.view(B, T + 1, V)
    plain = Inputs(ps, pt, labels, adv, _old_logprobs(ps, labels, w, 2))
    liger = Inputs(ls[:, :T], lt[:, :T], labels, adv, _old_logprobs(ls[:, :T], labels, w, 2), ls, lt)
    return plain, liger


def make_inputs(w: Workload, layout: str = "plain") -> Inputs:
    """Build the inputs; ``layout="liger"`` allocates ``[B, T + 1, V]`` logits (causal-LM output incl. the last
    position, as Liger's GRPO kernels expect) and returns ``[:, :T]`` views of them as ``student``/``teacher``."""
    B, T, V, dev = w.B, w.T, w.V, w.device
    extra = 1 if layout == "liger" else 0
    sbuf = torch.empty((B, T + extra, V), dtype=w.dtype, device=dev)
    tbuf = torch.empty((B, T + extra, V), dtype=w.dtype, device=dev)
    if extra:
        sbuf[:, T:].zero_()
        tbuf[:, T:].zero_()
    student, teacher = (sbuf[:, :T], tbuf[:, :T]) if extra else (sbuf, tbuf)
    g_lab = _gen(w.seed * 7 + 1, dev)
    labels = torch.randint(0, V, (B, T), generator=g_lab, device=dev)
    old = torch.empty((B, T), dtype=torch.float32, device=dev)
    with torch.no_grad():
        for b in range(B):
            student[b].copy_(_student_row(w, b))
            g = _gen(w.seed * 1_000_003 + 2 * b + 12, dev)
            x = student[b].float() + torch.randn((T, V), generator=g, device=dev) * (0.5 * w.scale)
            teacher[b].copy_(x)
            x = torch.log_softmax(student[b].float(), dim=-1)
            old[b] = x.gather(1, labels[b][:, None]).squeeze(1)
            del x
        g = _gen(w.seed * 7 + 2, dev)
        old += (0.1 * torch.randn((B, T), generator=g, device=dev)).clamp(-0.5, 0.5)
        adv = _advantages(w)
    inp = Inputs(student, teacher, labels, adv, old)
    if extra:
        inp.student_buf, inp.teacher_buf = sbuf, tbuf
    return inp
