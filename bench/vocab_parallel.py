"""Overhead of the vocabulary-parallel op (docs/math.md section 2d) on CPU: the same total work (``N x V`` logits,
RLSD with a teacher, forward + backward) done by

- ``unsharded``:   ``rlsd_loss`` in one process;
- ``sharded P=1``: ``rlsd_loss(..., vocab_parallel_group=WORLD)`` in a group of one (the sharded path's own cost:
                   its shard statistics pass, the gather, the separate gradient sweep);
- ``sharded P=2``: two processes on gloo, each holding ``N x V/2``.

Every process runs with ``--threads`` intra-op threads, so P=2 uses twice the cores of the others: the column
``cpu-seconds`` (wall time x threads x processes) is the work comparison, wall time the latency one. Each case also
records the number of ``torch.distributed`` collectives per forward + backward (a structural count). The same three
cases run once more with a section 2c term (``--term``, default the JSD distillation term, the one that needs a second
gather; ``none`` skips them).

Usage::

    python -m bench.vocab_parallel --n 512 --v 32000 --reps 5     # writes bench/results/vocab-parallel-cpu.md
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))


def _inputs(n, v, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, v, generator=g), torch.randn(n, v, generator=g), torch.randint(0, v, (n,), generator=g),
            torch.randn(n, generator=g))


def _time(fn, reps):
    fn()  # warm-up (builds / loads the kernels)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


TERMS = {
    "none": {},
    "kl": dict(kl_coef=0.1),
    "entropy": dict(entropy_coef=0.01),
    "forward_kl": dict(distill_coef=0.5, distill_divergence="forward_kl"),
    "reverse_kl": dict(distill_coef=0.5, distill_divergence="reverse_kl"),
    "jsd": dict(distill_coef=0.5, distill_divergence="jsd"),
}


def _step(student, teacher, labels, adv, group=None, start=None, term="none"):
    from rlsd_kernels import rlsd_loss

    s = student.clone().requires_grad_(True)
    vp = {} if group is None else {"vocab_parallel_group": group, "vocab_start": start}
    kw = dict(TERMS[term])
    if kw.get("kl_coef"):
        kw["ref_logprobs"] = torch.zeros(labels.shape)
    rlsd_loss(s, teacher, labels, adv, lam=0.5, **kw, **vp).loss.backward()


def _rank(rank, world, init_file, out_dir, n, v, reps, threads, term):
    from parallel_jobs import count_collectives

    torch.set_num_threads(threads)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    student, teacher, labels, adv = _inputs(n, v)
    size = v // world
    lo, hi = rank * size, (rank + 1) * size if rank < world - 1 else v
    s, t = student[:, lo:hi].contiguous(), teacher[:, lo:hi].contiguous()
    with count_collectives() as count:
        _step(s, t, labels, adv, dist.group.WORLD, lo, term)
    median = _time(lambda: _step(s, t, labels, adv, dist.group.WORLD, lo, term), reps)
    torch.save({"median": median, "collectives": count["n"]}, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def sharded(world, n, v, reps, threads, term="none"):
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_rank, args=(world, f"{tmp}/init", tmp, n, v, reps, threads, term), nprocs=world, join=True)
        res = [torch.load(f"{tmp}/rank{r}.pt") for r in range(world)]
    return max(r["median"] for r in res), res[0]["collectives"]


def unsharded(n, v, reps, threads, term="none"):
    torch.set_num_threads(threads)
    student, teacher, labels, adv = _inputs(n, v)
    return _time(lambda: _step(student, teacher, labels, adv, term=term), reps)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=512)
    ap.add_argument("--v", type=int, default=32000)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--term", choices=sorted(TERMS), default="jsd",
                    help="section 2c term of the second set of rows (none: skip them)")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "vocab-parallel-cpu.md"))
    args = ap.parse_args(argv)
    from rlsd_kernels import dispatch

    sets = [[("unsharded", 1, unsharded(args.n, args.v, args.reps, args.threads), 0)]]
    for world in (1, 2):
        t, c = sharded(world, args.n, args.v, args.reps, args.threads)
        sets[0].append((f"sharded P={world}", world, t, c))
    if args.term != "none":
        tag = f", {args.term}"
        sets.append([(f"unsharded{tag}", 1, unsharded(args.n, args.v, args.reps, args.threads, args.term), 0)])
        for world in (1, 2):
            t, c = sharded(world, args.n, args.v, args.reps, args.threads, args.term)
            sets[1].append((f"sharded P={world}{tag}", world, t, c))
    lines = [f"# Vocabulary-parallel overhead on CPU ({platform.processor() or platform.machine()})", "",
             f"`python -m bench.vocab_parallel --n {args.n} --v {args.v} --reps {args.reps} --threads {args.threads}"
             f" --term {args.term}`"
             f" (torch {torch.__version__}, backend {dispatch.select_backend('cpu')}, gloo). RLSD with teacher "
             f"logits, float32, forward + backward, median of {args.reps}; the machine is shared, so expect noise. "
             f"Rows with a term name add that docs/math.md section 2c term; they compare with their own unsharded row.",
             "", "| case | processes | wall ms | vs unsharded | cpu-seconds vs unsharded | collectives / call |",
             "|---|---|---|---|---|---|"]
    for rows in sets:
        base = rows[0][2]
        for name, procs, t, c in rows:
            lines.append(f"| {name} | {procs} | {t * 1e3:.1f} | {t / base:.2f}x | {t * procs / base:.2f}x | {c} |")
    text = "\n".join(lines) + "\n"
    print(text)
    with open(args.out, "w") as f:
        f.write(text)


if __name__ == "__main__":
    main()
