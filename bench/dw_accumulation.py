"""How the fused linear op should sum a bf16 weight gradient over row chunks (docs/math.md appendix A).

``d W = sum over chunks of g_chunk^T @ h_chunk``. Three ways, each against a float64 truth on the same bf16 inputs:
eager autograd's one GEMM in bf16 (one rounding), the chunk products summed in bf16 (``addmm_`` into a bf16
tensor: one rounding per chunk), and summed in float32 then cast (what ``backends/linear/chunked.py`` does).
Prints the relative Frobenius error of each.

    python -m bench.dw_accumulation
"""
from __future__ import annotations

import torch


def errors(N: int, chunks: int, H: int = 128, V: int = 1024, seed: int = 0):
    torch.manual_seed(seed)
    g = (torch.randn(N, V) / N).to(torch.bfloat16)
    h = torch.randn(N, H).to(torch.bfloat16)
    truth = g.double().t() @ h.double()
    eager = (g.t() @ h).double()
    step = -(-N // chunks)
    acc_bf16 = torch.zeros(V, H, dtype=torch.bfloat16)
    acc_f32 = torch.zeros(V, H)
    for r in range(0, N, step):
        acc_bf16.addmm_(g[r:r + step].t(), h[r:r + step])
        acc_f32.addmm_(g[r:r + step].t().float(), h[r:r + step].float())
    rel = lambda x: ((x - truth).norm() / truth.norm()).item()  # noqa: E731
    return rel(eager), rel(acc_bf16.double()), rel(acc_f32.bfloat16().double())


def main():
    print("N      chunks  eager bf16 (1 GEMM)  bf16 sums  float32 sums -> bf16")
    for N, chunks in ((4096, 14), (16384, 14), (16384, 56)):
        e, b, f = errors(N, chunks)
        print(f"{N:<6} {chunks:<7} {e:.2e}             {b:.2e}   {f:.2e}")


if __name__ == "__main__":
    main()
