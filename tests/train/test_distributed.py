"""The reference trainer under torchrun (data parallel over 2 CPU ranks, gloo) follows the single-process run: the
same global batch and seed give the same loss curve up to floating-point reduction order."""
import json
import os
import pathlib
import subprocess
import sys

import pytest

from pinned import TINY_FLAGS

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _curve(out):
    with open(out / "metrics.jsonl") as f:
        return [json.loads(line) for line in f]


def _run(argv, out):
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    res = subprocess.run(argv + ["-m", "rlsd_kernels.train", *TINY_FLAGS, "--method", "rlsd", "--steps", "3",
                                 "--out", str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return _curve(out)


def test_two_ranks_match_single_process(tmp_path):
    single = _run([sys.executable], tmp_path / "single")
    # torchrun runs a script or, with -m, a module: the trainer's package entry point
    dp = _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"],
              tmp_path / "dp")
    assert (tmp_path / "dp" / "rank1" / "metrics.jsonl").exists()  # rank 1 writes apart from rank 0
    assert [h["step"] for h in dp] == [h["step"] for h in single]
    for a, b in zip(single[1:], dp[1:]):
        for key in ("loss", "reward_mean", "grad_norm", "entropy", "weight_mean", "pg_clipfrac"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-5), (a["step"], key, a[key], b[key])
    for a, b in zip(single, dp):
        if "eval_acc" in a:
            assert a["eval_acc"] == b["eval_acc"]
