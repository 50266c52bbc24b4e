"""Vocabulary-parallel op (docs/math.md section 2d) over gloo on localhost: 2 and 3 ranks, uneven shards.

Each spawned job runs many cases on every CPU backend (spawning costs seconds, so checks are grouped); the test
process compares what the ranks returned with one another (bit-identical) and with the unsharded op on the same
backend and the float64 eager reference (section 7's float32 tolerance); the ranks' gradient shards concatenated
must equal the unsharded gradient.
"""
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import parallel_jobs as jobs
from helpers import Backend, machine_backends, running_on

from rlsd_kernels import reference, rlsd_loss, token_logprobs
from rlsd_kernels.reference import rlsd_loss_eager, token_logprobs_eager

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not built")

CPU_BACKENDS = [str(b) for b in machine_backends() if b.device.type == "cpu"]
RTOL, ATOL = 1e-5, 1e-6

CASES = [
    # token aggregation, teacher logits, mask, off-policy, temperature, per-token advantages
    dict(op="loss", seed=1, B=3, T=5, teacher="logits", mask=True, old=True, temperature=0.7, lam=0.8),
    # seq aggregation, teacher log-probs, per-sequence advantages, in-place backward
    dict(op="loss", seed=2, B=3, T=4, teacher="logprobs", agg="seq", adv_per_seq=True, inplace=True, mask=True),
    # GRPO (no teacher), CISPO, large logits
    dict(op="loss", seed=3, B=2, T=4, loss_type="cispo", old=True, scale=30.0),
    # scoring with entropy, out-of-place and in-place backward
    dict(op="logprobs", seed=4, B=2, T=5, temperature=1.3),
    dict(op="logprobs", seed=6, B=2, T=3, inplace=True),
    # sharded LM head: rlsd_linear_loss with teacher hidden states, bias, seq aggregation
    dict(op="linear", seed=7, B=2, T=4, agg="seq", mask=True, temperature=0.9),
    # section 2c terms, one at a time: KL to a reference (k2), teacher logits, off-policy, token aggregation
    dict(op="loss", seed=8, B=3, T=4, teacher="logits", mask=True, old=True, temperature=0.7,
         terms=dict(kl_coef=0.2, kl_type="k2")),
    # rollout IS (sequence level, rejection), seq aggregation, teacher log-probs, in-place backward
    dict(op="loss", seed=9, B=3, T=4, teacher="logprobs", agg="seq", adv_per_seq=True, inplace=True, old=True,
         terms=dict(rollout_is="sequence", rollout_is_mode="mask", rollout_is_threshold=1.5)),
    # GSPO, seq aggregation
    dict(op="loss", seed=10, B=2, T=5, teacher="logits", old=True, agg="seq", terms=dict(loss_type="gspo")),
    # entropy bonus, large logits (|lse| > 32: the C++ sweep falls back to the reference one on a shard), in place
    dict(op="loss", seed=11, B=2, T=4, mask=True, temperature=1.3, scale=30.0, inplace=True,
         terms=dict(entropy_coef=0.05)),
    # distillation: forward KL with a clip, reverse KL (seq aggregation), JSD (large logits)
    dict(op="loss", seed=12, B=3, T=4, teacher="logits", mask=True, lam=0.5,
         terms=dict(distill_coef=0.5, distill_clip=0.8)),
    dict(op="loss", seed=13, B=2, T=4, teacher="logits", agg="seq", temperature=0.8, inplace=True,
         terms=dict(distill_coef=0.3, distill_divergence="reverse_kl")),
    dict(op="loss", seed=14, B=2, T=4, teacher="logits", old=True, scale=30.0,
         terms=dict(distill_coef=0.4, distill_divergence="jsd", distill_beta=0.3)),
    # every term at once, seq aggregation, the student a shifted [:, :-1] view
    dict(op="loss", seed=15, B=3, T=4, teacher="logits", mask=True, old=True, agg="seq", temperature=0.9,
         shifted=True, terms=dict(kl_coef=0.1, rollout_is="token", loss_type="gspo", entropy_coef=0.02, distill_coef=0.3,
                    distill_divergence="jsd")),
    # opsd_loss with each divergence
    dict(op="opsd", seed=16, B=2, T=4, mask=True, divergence="forward_kl"),
    dict(op="opsd", seed=17, B=2, T=4, agg="seq", divergence="reverse_kl", clip=1.0, temperature=0.8),
    dict(op="opsd", seed=18, B=3, T=3, mask=True, divergence="jsd", beta=0.7),
    # sharded LM head with terms: KL, entropy, reverse-KL distillation from teacher hidden states
    dict(op="linear", seed=19, B=2, T=4, mask=True,
         terms=dict(kl_coef=0.1, entropy_coef=0.03, distill_coef=0.5, distill_divergence="reverse_kl")),
]
# collectives per forward + backward: the layout check and the gather of the partials (every term and opsd_loss
# included); JSD adds the gather of its mixture sums; the linear op adds the all-reduce of d hidden
COLLECTIVES = {"loss": 2, "logprobs": 2, "linear": 3, "opsd": 2}


def _collectives(case):
    jsd = case.get("divergence") == "jsd" or case.get("terms", {}).get("distill_divergence") == "jsd"
    return COLLECTIVES[case["op"]] + int(jsd)


def _spawn(sizes, backends, cases):
    world = len(sizes)
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(jobs.job, args=(world, f"{tmp}/init", tmp, backends, cases, sizes), nprocs=world, join=True)
        results = [torch.load(f"{tmp}/rank{r}.pt", weights_only=False) for r in range(world)]
    for r, res in enumerate(results):
        assert "exception" not in res, f"rank {r} failed:\n{res.get('exception')}"
    return results


def _reference(case, x):
    """float64 eager ground truth of a case: the outputs and the full gradient."""
    x64 = {k: (v.double() if v.is_floating_point() else v) for k, v in x.items()}
    student = x64["student"].clone().requires_grad_(True)
    if case["op"] == "opsd":
        loss, _ = reference.opsd_loss(student, x64["teacher"], x64["labels"], **jobs.opsd_kwargs(case, x64))
        loss.backward()
        return {"loss": loss, "grad": student.grad}
    if case["op"] == "loss":
        kw = jobs.loss_kwargs(case, x64)
        kw.pop("inplace_backward")
        teacher = x64["teacher"] if case.get("teacher") == "logits" else None
        if case.get("teacher") == "logprobs":
            kw["teacher_logprobs"] = case["teacher_logprobs"].double()
        res = rlsd_loss_eager(student, teacher, x64["labels"], x64["advantages"], **kw)
        res.loss.backward()
        return {"loss": res.loss, "logprobs": res.logprobs, "entropy": res.entropy, "grad": student.grad}
    logp, ent = token_logprobs_eager(student, x64["labels"], case.get("temperature", 1.0), True)
    (logp * x64["grad_weights"]).sum().backward()
    return {"logprobs": logp, "entropy": ent, "grad": student.grad}


def _check(results, sizes, backends, cases):
    for backend in backends:
        for i, case in enumerate(cases):
            x = jobs.make_inputs(case)
            if case.get("teacher") == "logprobs":
                case = dict(case, teacher_logprobs=jobs.teacher_logprobs_for(case, x))
            outs = [res[(backend, i)] for res in results]
            where = f"{backend} case {i} {case['op']}"
            # every rank returns the same bits (loss, log-probs, metrics, entropy, weights)
            for key, value in outs[0].items():
                if key in ("grad", "bias_grad", "collectives") or value is None:
                    continue
                for r, o in enumerate(outs[1:], 1):
                    assert torch.equal(o[key], value), f"{where}: {key} differs between rank 0 and rank {r}"
            # structural: one layout check + one gather of the per-row partials per forward, none in the backward
            assert all(o["collectives"] == _collectives(case) for o in outs), \
                f"{where}: {[o['collectives'] for o in outs]}"
            with running_on(Backend(backend, "cpu")):
                full = jobs.run_case(case, x, 0, sum(sizes))
            if case["op"] == "linear":  # d hidden is complete on every rank, d weight / d bias are row shards
                torch.testing.assert_close(outs[0]["hidden_grad"], full["hidden_grad"], rtol=RTOL, atol=ATOL)
                for key in ("grad", "bias_grad"):
                    torch.testing.assert_close(torch.cat([o[key] for o in outs]), full[key], rtol=RTOL, atol=ATOL)
                for key in ("loss", "logprobs", "entropy", "teacher_logprobs", "metrics"):
                    torch.testing.assert_close(outs[0][key], full[key], rtol=RTOL, atol=ATOL, msg=f"{where}: {key}")
                continue
            grad = torch.cat([o["grad"] for o in outs], dim=-1)
            ref = _reference(case, x)
            for key in ("loss", "logprobs", "entropy", "weights", "teacher_logprobs", "metrics"):
                if key in full and full[key] is not None:
                    torch.testing.assert_close(outs[0][key], full[key], rtol=RTOL, atol=ATOL, msg=f"{where}: {key}")
            for key in ("loss", "logprobs", "entropy"):
                if key in ref:
                    torch.testing.assert_close(outs[0][key].double(), ref[key].detach(), rtol=RTOL, atol=ATOL,
                                               msg=f"{where}: {key} vs float64 reference")
            torch.testing.assert_close(grad.double(), ref["grad"], rtol=RTOL, atol=ATOL, msg=lambda m: f"{where}: grad vs ref: {m}")
            torch.testing.assert_close(grad, full["grad"], rtol=RTOL, atol=ATOL, msg=lambda m: f"{where}: grad vs unsharded: {m}")


@pytest.mark.parametrize("sizes", [(16, 21), (10, 17, 6)], ids=["2ranks", "3ranks"])
def test_sharded_matches_unsharded(sizes):
    cases = [dict(c, V=sum(sizes)) for c in CASES]
    results = _spawn(list(sizes), CPU_BACKENDS, cases)
    _check(results, sizes, CPU_BACKENDS, cases)
    errors = [res["errors"] for res in results]
    assert all(e == errors[0] for e in errors), "ranks raised different errors"
    assert "vocab_start" in errors[0]["overlap"] and "tile" in errors[0]["overlap"]
    assert errors[0]["label"] is not None and errors[0]["label"].startswith("labels")
    assert errors[0]["start"] is not None and "vocab_start" in errors[0]["start"]
    assert errors[0]["distill"] is not None and "distill_coef" in errors[0]["distill"]


def test_vocab_start_without_group():
    x = torch.randn(2, 3, 5)
    labels = torch.zeros(2, 3, dtype=torch.long)
    with pytest.raises(ValueError, match="vocab_start"):
        token_logprobs(x, labels, vocab_start=0)
    with pytest.raises(ValueError, match="vocab_start"):
        rlsd_loss(x, None, labels, torch.zeros(2, 3), vocab_start=0)


def test_group_needs_initialised_distributed():
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    x = torch.randn(2, 3, 5)
    with pytest.raises(ValueError, match="vocab_parallel_group"):
        token_logprobs(x, torch.zeros(2, 3, dtype=torch.long), vocab_parallel_group=object())


def test_readme_torchrun_example_runs():
    """The README's tensor-parallel block runs as written (torchrun -> ``python -m torch.distributed.run``)."""
    import os
    import pathlib
    import re
    import subprocess
    import sys

    root = pathlib.Path(__file__).resolve().parent.parent
    text = (root / "README.md").read_text(encoding="utf-8")
    blocks = re.findall(r"executed by tests/test_vocab_parallel.py -->\n```bash\n(.*?)```", text, re.S)
    assert len(blocks) == 1
    cmd = blocks[0].strip()
    assert cmd.startswith("torchrun ")
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone"] + cmd.split()[1:]
    env = dict(os.environ, PYTHONPATH=str(root) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    res = subprocess.run(argv, cwd=root, env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    losses = re.findall(r"rank \d: shard \[\d+, \d+\) loss (\S+) \(unsharded (\S+)\)", res.stdout)
    assert len(losses) == 2 and len({loss for loss, _ in losses}) == 1
