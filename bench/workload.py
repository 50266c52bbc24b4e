"""Benchmark inputs and the byte model of SPEC section 8.

Inputs for one shape ``(N, V)``, laid out as ``[B, T, V]`` with ``B = seqs`` sequences of ``T = N / B`` tokens:

- ``student``: ``randn * scale`` in ``dtype`` (bf16 by default), ``teacher = student + 0.5 * scale * randn``, so the
  teacher is correlated with the student and the evidence weights land both inside and outside the clip range;
- ``labels``: uniform in ``[0, V)``;
- ``advantages``: per token, ``A[b, t] = s_b * (0.5 + u[b, t])``, ``s_b = +-1`` alternating by sequence (GRPO's
  outcome advantage, with a per-token magnitude; the sign is per sequence, as in GRPO/RLSD practice);
- ``old_logprobs``: the student's own float32 log-probs plus noise clamped to ``+-0.5``, so the PPO ratio spans
  ``[0.61, 1.65]``: both clip sides are hit, the dual clip (ratio > 3) never is.

Everything is generated one sequence at a time (float32 scratch of ``T x V`` only), deterministically from the
seed, directly into the destination buffer, so a contender that needs another layout (Liger: ``[B, T + 1, V]``)
gets bit-identical logits without a second full-size copy ever existing.
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
        """SPEC 8: fwd reads z_S and z_T once; fwd+bwd also re-reads z_S and writes the gradient once."""
        k = 2 if mode == "fwd" else 4
        return k * self.N * self.V * self.itemsize


@dataclass
class Inputs:
    student: torch.Tensor  # [B, T, V] (a view into a larger buffer for the liger layout)
    teacher: torch.Tensor
    labels: torch.Tensor  # int64 [B, T]
    advantages: torch.Tensor  # float32 [B, T]
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
        sign = torch.tensor([1.0 if b % 2 == 0 else -1.0 for b in range(B)], device=dev)
        g = _gen(w.seed * 7 + 3, dev)
        adv = sign[:, None] * (0.5 + torch.rand((B, T), generator=g, device=dev))
    inp = Inputs(student, teacher, labels, adv, old)
    if extra:
        inp.student_buf, inp.teacher_buf = sbuf, tbuf
    return inp
