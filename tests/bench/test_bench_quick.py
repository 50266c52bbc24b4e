"""Smoke test of the benchmark suite: ``python -m bench --quick`` on CPU into a temp dir, then the schema of the
results file (keys, types, every runnable contender checked correct). Timings are not judged."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
MODES = ("fwd", "fwd+bwd")
STATUSES = {"ok", "skipped", "wrong", "oom", "error", "timeout"}


def _run_quick(tmp_path):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    cmd = [sys.executable, "-m", "bench", "--quick", "--device", "cpu", "--shapes", "128x8192", "--reps", "2",
           "--warmup", "0", "--out", str(tmp_path), "--name", "smoke"]
    proc = subprocess.run(cmd, cwd=str(ROOT), env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc, json.loads((tmp_path / "smoke.json").read_text())


def test_quick_cpu_results_schema(tmp_path):
    proc, res = _run_quick(tmp_path)
    assert res["schema"] == "rlsd-bench/1"
    assert res["device"]["type"] == "cpu" and res["device"]["slug"].startswith("cpu-")
    assert isinstance(res["device"]["name"], str)
    assert res["versions"]["torch"] == torch.__version__ and "triton" in res["versions"]
    assert isinstance(res["date"], str) and res["command"].startswith("python -m bench")
    assert res["config"]["dtype"] == "bf16" and res["config"]["mode"] == "both"
    names = res["config"]["contenders"]
    assert {"eager", "compile", "rlsd[reference]"} <= set(names)
    assert not any(n == "rlsd[triton]" for n in names)  # Triton on CPU is the interpreter: never timed

    cases = res["cases"]
    assert len(cases) == len(names) * len(res["config"]["shapes"])
    by_name = {c["contender"]: c for c in cases}
    assert by_name["liger"]["status"] == "skipped" and by_name["liger"]["reason"]
    for c in cases:
        assert c["status"] in STATUSES
        assert isinstance(c["N"], int) and isinstance(c["V"], int) and c["dtype"] == "bf16"
        if c["status"] == "skipped":
            assert isinstance(c["reason"], str) and c["reason"]
            continue
        # every contender that ran was checked correct against the reference and then timed
        assert c["status"] == "ok", (c["contender"], c["status"], c.get("reason"))
        chk = c["check"]
        assert chk["ok"] is True and chk["grad_finite"] is True
        for k in ("loss", "loss_ref", "loss_rel_err", "grad_max_abs_err", "grad_max_err_over_max_ref", "loss_rtol",
                  "grad_rtol", "grad_atol"):
            assert isinstance(chk[k], float), k
        assert set(c["modes"]) == set(MODES)
        for m in MODES:
            st = c["modes"][m]
            assert st["reps"] == 2
            assert 0 < st["min_ms"] <= st["p25_ms"] <= st["median_ms"] <= st["p75_ms"] <= st["max_ms"]
            assert isinstance(st["peak_mem_bytes"], int) and st["peak_mem_bytes"] >= 0
            assert st["bytes_model"] == (2 if m == "fwd" else 4) * c["N"] * c["V"] * 2
            assert st["achieved_gbps"] > 0 and st["bw_frac"] is None  # no peak-bandwidth fraction on CPU
            assert isinstance(st["speedup_vs_eager"], float) and isinstance(st["mem_ratio_vs_eager"], (float, type(None)))
    assert by_name["eager"]["modes"]["fwd+bwd"]["speedup_vs_eager"] == pytest.approx(1.0)
    assert (tmp_path / "smoke.md").read_text().count("|") > 10
    assert (tmp_path / "smoke.png").stat().st_size > 1000
    assert "eager" in proc.stdout and "fwd+bwd" in proc.stdout


def test_check_rejects_a_wrong_contender():
    """The correctness gate is not vacuous: a 5% error in one gradient row, or a different lam, is caught."""
    from bench import contenders, worker
    from bench.workload import Workload, make_inputs

    w = Workload(N=32, V=700, dtype=torch.bfloat16, device=torch.device("cpu"), seqs=4, lam=0.5)
    inp = make_inputs(w)
    assert worker.check_runner(contenders.factory("eager")(inp, w), inp, w)["ok"]
    r = contenders.factory("eager")(make_inputs(w), Workload(**{**w.__dict__, "lam": 0.45}))
    assert not worker.check_runner(r, inp, w)["ok"]
    inp = make_inputs(w)
    r = contenders.factory("eager")(inp, w)

    def off(g):
        g = g.clone()
        g[0, 3] *= 1.05
        return g

    r.grad_view = off
    assert not worker.check_runner(r, inp, w)["ok"]


def test_liger_adapter_matches_reference():
    """Liger's GRPO loss + selective log-softmax, made RLSD-equivalent (bench/contenders.py), equals the reference.
    Runs where liger-kernel is installed: on CUDA, or on CPU through the Triton interpreter."""
    pytest.importorskip("liger_kernel")
    from bench import contenders, worker
    from bench.workload import Workload, make_inputs

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if dev.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs CUDA or TRITON_INTERPRET=1")
    for dtype in (torch.float32, torch.bfloat16):
        for lam in (0.0, 0.5, 1.0):
            w = Workload(N=64, V=1000, dtype=dtype, device=dev, seqs=4, lam=lam)
            inp = make_inputs(w, "liger")
            res = worker.check_runner(contenders.factory("liger")(inp, w), inp, w)
            assert res["ok"], (dtype, lam, res)


def _git(*args):
    try:
        return subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True)
    except FileNotFoundError:  # no git on this machine
        return subprocess.CompletedProcess(args, 127, "", "git not found")


def test_quick_leaves_the_checkout_clean():
    """``python -m bench --quick`` with its default output folder writes into the git-ignored bench/out, never into
    the tracked bench/results."""
    if _git("rev-parse", "--is-inside-work-tree").stdout.strip() != "true":
        pytest.skip("not a git checkout")
    from bench.__main__ import SCRATCH_OUT

    assert _git("check-ignore", "-q", str(SCRATCH_OUT / "x.json")).returncode == 0  # ignored
    before = _git("status", "--porcelain", "--untracked-files=all").stdout
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    cmd = [sys.executable, "-m", "bench", "--quick", "--device", "cpu", "--shapes", "64x1000", "--backends", "eager",
           "--reps", "1", "--warmup", "0", "--no-plot"]
    proc = subprocess.run(cmd, cwd=str(ROOT), env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert str(SCRATCH_OUT) in proc.stdout
    assert _git("status", "--porcelain", "--untracked-files=all").stdout == before
