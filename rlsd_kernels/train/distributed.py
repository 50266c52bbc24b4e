"""Data parallelism for the reference trainer under ``torchrun`` (gloo on CPU, NCCL on CUDA).

``torchrun --nproc-per-node P -m rlsd_kernels.train ...`` sets ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK``; the
trainer then builds a :class:`DataParallel` and every rank:

- draws the same global batch of prompts and generates the same rollouts (every rank holds the same weights and the
  same random state, so the samples, rewards and advantages equal those of a single-process run);
- scores and differentiates only its own prompts (whole groups of G samples: ``--prompts-per-step`` must be a
  multiple of the number of ranks): the teacher pass, the student forward and the loss backward are split;
- scales its loss so that the ranks' gradients, averaged by one all-reduce, are the gradient of the single-process
  loss (token / seq aggregation: weighted by the rank's share of the global tokens / sequences; sum: as is);
- steps the optimizer on identical gradients, so the weights stay identical without a broadcast.

The loss curve then matches the single-process run up to floating-point reduction order. Rank 0 writes the run's
outputs; the other ranks write theirs under ``OUT/rank<r>/`` (so nothing collides).
"""
from __future__ import annotations

import os
from typing import Dict, Optional

import torch
import torch.distributed as dist


def launched() -> bool:
    """Whether a launcher (``torchrun``) started this process as one of several ranks."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ


class DataParallel:
    def __init__(self, device: torch.device):
        self.device = self.device_for(device)
        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        self.rank, self.world = dist.get_rank(), dist.get_world_size()

    @staticmethod
    def device_for(device: torch.device) -> torch.device:
        """Under NCCL each rank drives the GPU of its ``LOCAL_RANK``."""
        if device.type != "cuda":
            return device
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return torch.device("cuda", local)

    def check(self, prompts_per_step: int) -> None:
        if prompts_per_step % self.world:
            raise ValueError(f"--prompts-per-step ({prompts_per_step}) must be a multiple of the number of ranks "
                             f"({self.world}) under torchrun")

    def share(self, n: int) -> slice:
        """This rank's contiguous slice of ``n`` items (``n`` a multiple of the world size)."""
        k = n // self.world
        return slice(self.rank * k, (self.rank + 1) * k)

    def loss_share(self, valid_local: torch.Tensor, mode: str) -> torch.Tensor:
        """``f_r`` with ``loss_global = sum_r f_r * loss_r`` for the op's aggregation ``mode`` (one all-reduce)."""
        if mode == "sum":
            return torch.ones((), device=valid_local.device)
        if mode == "token":
            count = valid_local.sum().to(torch.float64)
        else:  # seq: sequences with at least one valid token
            count = (valid_local.reshape(valid_local.shape[0], -1).sum(-1) > 0).sum().to(torch.float64)
        total = count.clone()
        dist.all_reduce(total)
        return (count / total.clamp(min=1.0)).to(torch.float32)

    def average_gradients(self, model: torch.nn.Module) -> None:
        """The mean of every parameter's gradient over the ranks, in one all-reduce of a flat buffer."""
        params = [p for p in model.parameters() if p.requires_grad]
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat /= self.world
        offset = 0
        for p, g in zip(params, grads):
            n = g.numel()
            p.grad = flat[offset:offset + n].view_as(p).clone()
            offset += n

    def weighted_means(self, values: Dict[str, float], weight: float) -> Dict[str, float]:
        """Means over the ranks of per-rank means, weighted by ``weight`` (e.g. the rank's valid tokens)."""
        keys = list(values)
        t = torch.tensor([values[k] * weight for k in keys] + [weight], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return {k: float(t[i] / max(float(t[-1]), 1e-30)) for i, k in enumerate(keys)}

    def sum(self, x: float) -> float:
        t = torch.tensor([x], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return float(t[0])

    def out_dir(self, out: str) -> str:
        return out if self.rank == 0 else os.path.join(out, f"rank{self.rank}")


def from_launcher(device: torch.device) -> Optional[DataParallel]:
    """A :class:`DataParallel` when ``torchrun`` launched this process as one of several ranks, else None."""
    return DataParallel(device) if launched() else None
