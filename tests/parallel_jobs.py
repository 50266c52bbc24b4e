"""Jobs that the vocabulary-parallel tests spawn (one process per rank, gloo on localhost).

Each job runs a list of cases on every backend it is given and saves, per rank, what the op returned (loss,
log-probs, metrics, the gradient of its shard) and how many collectives each call issued; the test process then
compares the ranks with one another and with the unsharded op. Inputs are drawn from a seed, identically on every
rank, and each rank slices its own vocabulary shard.
"""
from __future__ import annotations

import contextlib
import os
import traceback

import torch
import torch.distributed as dist

COLLECTIVES = ("all_reduce", "all_gather", "all_gather_single", "all_gather_into_tensor", "broadcast",
               "reduce_scatter", "reduce_scatter_tensor", "all_to_all", "all_to_all_single", "barrier", "reduce")


@contextlib.contextmanager
def count_collectives():
    """Counts every ``torch.distributed`` collective called inside the block (``counter["n"]``)."""
    counter = {"n": 0}
    saved = {}
    for name in COLLECTIVES:
        fn = getattr(dist, name, None)
        if fn is None:
            continue
        saved[name] = fn

        def wrapped(*a, _fn=fn, **k):
            counter["n"] += 1
            return _fn(*a, **k)
        setattr(dist, name, wrapped)
    try:
        yield counter
    finally:
        for name, fn in saved.items():
            setattr(dist, name, fn)


def make_inputs(case, device="cpu"):
    """Full (unsharded) inputs of a case, the same on every rank."""
    g = torch.Generator().manual_seed(case["seed"])
    B, T, V = case["B"], case["T"], case["V"]
    scale = case.get("scale", 3.0)
    x = {"student": torch.randn(B, T, V, generator=g, device=device) * scale}
    x["teacher"] = torch.randn(B, T, V, generator=g, device=device) * scale
    labels = torch.randint(0, V, (B, T), generator=g, device=device)
    labels[0, -1] = -100  # an ignored position
    x["labels"] = labels
    adv_shape = (B,) if case.get("adv_per_seq") else (B, T)
    x["advantages"] = torch.randn(adv_shape, generator=g, device=device)
    x["old"] = -torch.rand(B, T, generator=g, device=device) * 3
    x["mask"] = torch.rand(B, T, generator=g, device=device) > 0.2
    x["grad_weights"] = torch.randn(B, T, generator=g, device=device)
    H = 8
    x["hidden"] = torch.randn(B, T, H, generator=g, device=device)
    x["teacher_hidden"] = torch.randn(B, T, H, generator=g, device=device)
    x["weight"] = torch.randn(V, H, generator=g, device=device)
    x["bias"] = torch.randn(V, generator=g, device=device)
    # section 2c: reference-policy and sampler log-probs (drawn last: the draws above do not move)
    x["ref"] = x["old"] - 0.3 * torch.randn(B, T, generator=g, device=device)
    x["rollout"] = x["old"] - 0.5 * torch.randn(B, T, generator=g, device=device)
    return x


def loss_kwargs(case, x):
    """Keyword arguments of ``rlsd_loss`` for a case (teacher logits sliced later)."""
    kw = dict(loss_agg_mode=case.get("agg", "token"), temperature=case.get("temperature", 1.0),
              return_entropy=True, inplace_backward=case.get("inplace", False), lam=case.get("lam", 1.0),
              loss_type=case.get("loss_type", "ppo"))
    if case.get("old"):
        kw["old_logprobs"] = x["old"]
    if case.get("mask"):
        kw["mask"] = x["mask"]
    terms = case.get("terms", {})
    kw.update(terms)  # section 2c switches (kl_coef, rollout_is, loss_type="gspo", entropy_coef, distill_*)
    if terms.get("kl_coef"):
        kw["ref_logprobs"] = x["ref"]
    if terms.get("rollout_is"):
        kw["rollout_logprobs"] = x["rollout"]
    return kw


def opsd_kwargs(case, x):
    """Keyword arguments of ``opsd_loss`` for a case."""
    kw = dict(divergence=case.get("divergence", "forward_kl"), beta=case.get("beta", 0.5), clip=case.get("clip"),
              loss_agg_mode=case.get("agg", "token"), temperature=case.get("temperature", 1.0))
    if case.get("mask"):
        kw["mask"] = x["mask"]
    return kw


def run_case(case, x, lo, hi, group=None):
    """One call of the op on the vocabulary slice ``[lo, hi)`` (the whole vocabulary without a group)."""
    from rlsd_kernels import opsd_loss, rlsd_linear_loss, rlsd_loss, token_logprobs

    vp = {} if group is None else {"vocab_parallel_group": group, "vocab_start": lo}
    if case["op"] == "linear":  # LM-head rows [lo, hi) on this rank; d hidden complete, d weight / d bias local
        hidden = x["hidden"].clone().requires_grad_(True)
        weight = x["weight"][lo:hi].clone().requires_grad_(True)
        bias = x["bias"][lo:hi].clone().requires_grad_(True)
        kw = loss_kwargs(case, x)
        kw.pop("inplace_backward")
        res = rlsd_linear_loss(hidden, weight, x["labels"], x["advantages"], teacher_hidden=x["teacher_hidden"],
                               lm_head_bias=bias, **kw, **vp)
        res.loss.backward()
        return dict(loss=res.loss.detach(), logprobs=res.logprobs, entropy=res.entropy,
                    teacher_logprobs=res.teacher_logprobs.detach(), hidden_grad=hidden.grad.clone(),
                    grad=weight.grad.clone(), bias_grad=bias.grad.clone(),
                    metrics=torch.tensor(list(res.metrics.values()), dtype=torch.float64, device="cpu"))
    student = leaf = x["student"][..., lo:hi].clone().requires_grad_(True)
    if case.get("shifted"):  # the student is a [:, :-1] view (no merged row stride), the teacher contiguous
        leaf = torch.cat([x["student"][..., lo:hi], x["student"][:, :1, lo:hi]], 1).requires_grad_(True)
        student = leaf[:, :-1]
    out = {}
    if case["op"] == "loss":
        kw = loss_kwargs(case, x)
        teacher = x["teacher"][..., lo:hi] if case.get("teacher") == "logits" else None
        if case.get("shifted"):
            teacher = teacher.contiguous()
        if case.get("teacher") == "logprobs":
            kw["teacher_logprobs"] = case["teacher_logprobs"]
        res = rlsd_loss(student, teacher, x["labels"], x["advantages"], **kw, **vp)
        res.loss.backward()
        out.update(loss=res.loss.detach(), logprobs=res.logprobs, weights=res.weights, entropy=res.entropy,
                   metrics=torch.tensor(list(res.metrics.values()), dtype=torch.float64, device="cpu"))
        if res.teacher_logprobs is not None:
            out["teacher_logprobs"] = res.teacher_logprobs.detach()
    elif case["op"] == "opsd":
        res = opsd_loss(student, x["teacher"][..., lo:hi], x["labels"], **opsd_kwargs(case, x), return_entropy=True,
                        **vp)
        res.loss.backward()
        out.update(loss=res.loss.detach(), logprobs=res.logprobs, entropy=res.entropy,
                   teacher_logprobs=res.teacher_logprobs.detach(),
                   metrics=torch.tensor(list(res.metrics.values()), dtype=torch.float64, device="cpu"))
    else:
        logp, ent = token_logprobs(student, x["labels"], case.get("temperature", 1.0), True,
                                   inplace_backward=case.get("inplace", False), **vp)
        (logp * x["grad_weights"]).sum().backward()
        out.update(logprobs=logp.detach(), entropy=ent)
    out["grad"] = None if leaf.grad is None else leaf.grad[:, :student.shape[1]].detach().clone()
    return out


def shard_bounds(sizes, rank):
    lo = sum(sizes[:rank])
    return lo, lo + sizes[rank]


def teacher_logprobs_for(case, x):
    """Global teacher log-probs (unsharded, float32), for the ``teacher_logprobs`` route."""
    from rlsd_kernels.reference import token_logprobs_eager

    return token_logprobs_eager(x["teacher"], x["labels"], case.get("temperature", 1.0))


def job(rank, world, init_file, out_dir, backends, cases, sizes):
    """Entry point of one spawned rank: every (backend, case) pair; saves ``rank{r}.pt``."""
    from helpers import Backend, running_on

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    results = {}
    try:
        lo, hi = shard_bounds(sizes, rank)
        for backend in backends:
            with running_on(Backend(backend, "cpu")):
                for i, case in enumerate(cases):
                    x = make_inputs(case)
                    if case.get("teacher") == "logprobs":
                        case = dict(case, teacher_logprobs=teacher_logprobs_for(case, x))
                    with count_collectives() as count:
                        out = run_case(case, x, lo, hi, dist.group.WORLD)
                    out["collectives"] = count["n"]
                    results[(backend, i)] = out
        results["errors"] = _validation_errors(rank, world, sizes)
    except Exception:  # report to the test process instead of hanging it
        results = {"exception": traceback.format_exc()}
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def _validation_errors(rank, world, sizes):
    """ValueError messages (or None) of bad sharded calls, the same on every rank."""
    from rlsd_kernels import rlsd_loss, token_logprobs

    case = {"seed": 5, "B": 2, "T": 3, "V": sum(sizes)}
    x = make_inputs(case)
    lo, hi = shard_bounds(sizes, rank)
    msgs = {}

    def attempt(key, fn):
        try:
            fn()
            msgs[key] = None
        except ValueError as exc:
            msgs[key] = str(exc)

    # every rank claims to start at 0: the shards overlap
    attempt("overlap", lambda: token_logprobs(x["student"][..., lo:hi], x["labels"],
                                              vocab_parallel_group=dist.group.WORLD, vocab_start=0))
    bad = x["labels"].clone()
    bad[1, 1] = sum(sizes)  # one past the global vocabulary
    attempt("label", lambda: rlsd_loss(x["student"][..., lo:hi], None, bad, x["advantages"],
                                       vocab_parallel_group=dist.group.WORLD, vocab_start=lo))
    attempt("start", lambda: token_logprobs(x["student"][..., lo:hi], x["labels"],
                                            vocab_parallel_group=dist.group.WORLD, vocab_start=-3))
    # section 2c: distillation without teacher logits
    attempt("distill", lambda: rlsd_loss(x["student"][..., lo:hi], None, x["labels"], x["advantages"],
                                         distill_coef=0.5, vocab_parallel_group=dist.group.WORLD, vocab_start=lo))
    return msgs
