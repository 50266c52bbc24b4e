"""Vocabulary-parallel rlsd_loss (docs/math.md section 2d): each rank holds half of the vocabulary.

    torchrun --nproc-per-node 2 examples/vocab_parallel.py

gloo on CPU; NCCL when there is one GPU per rank (NCCL refuses two ranks on one GPU). Every rank prints the same
loss, equal to the unsharded op's.
"""
import os

import torch
import torch.distributed as dist

from rlsd_kernels import rlsd_loss

gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
use_cuda = gpus >= int(os.environ.get("WORLD_SIZE", "1"))
dist.init_process_group("nccl" if use_cuda else "gloo")
rank, world = dist.get_rank(), dist.get_world_size()
device = torch.device("cuda", rank) if use_cuda else torch.device("cpu")
torch.manual_seed(0)  # the same full inputs on every rank; each keeps its own vocabulary shard
B, T, V = 2, 8, 1000
student = torch.randn(B, T, V, device=device)
teacher = torch.randn(B, T, V, device=device)
labels = torch.randint(0, V, (B, T), device=device)  # global token ids
adv = torch.randn(B, device=device)

shard = V // world
lo, hi = rank * shard, (V if rank == world - 1 else (rank + 1) * shard)  # the last rank takes the remainder
local = student[..., lo:hi].clone().requires_grad_(True)
out = rlsd_loss(local, teacher[..., lo:hi], labels, adv, vocab_parallel_group=dist.group.WORLD, vocab_start=lo)
out.loss.backward()  # local.grad: this rank's slice of the unsharded gradient

full = student.clone().requires_grad_(True)
ref = rlsd_loss(full, teacher, labels, adv)
ref.loss.backward()
assert torch.allclose(out.loss, ref.loss, rtol=1e-5, atol=1e-6)
assert torch.allclose(local.grad, full.grad[..., lo:hi], rtol=1e-5, atol=1e-6)
print(f"rank {rank}: shard [{lo}, {hi}) loss {out.loss.item():.6f} (unsharded {ref.loss.item():.6f})")
dist.destroy_process_group()
