"""The GPU check's harness, run on CPU (no GPU here): end to end on a tiny shape, the results schema and the summary,
the deadline ("skipped (time)"), out-of-memory and wrong contenders, the test-suite stage, the launch sweep's
handling of whatever LAUNCH/SWEEP hold, and the shell wrapper. Nothing here judges a timing."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from bench import contenders, gpu_report, grid, probes, testrun, timing
from bench.contenders import Runner

ROOT = Path(__file__).resolve().parents[2]
CPU = torch.device("cpu")


def _env():
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)  # the harness never times the interpreter; cpp serves CPU tensors
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    return env


def _cpp_or_skip():
    from rlsd_kernels.backends.logits import cpp

    if not cpp.available():
        pytest.skip("the C++ backend is not available here")


def test_gpu_check_cpu_end_to_end(tmp_path):
    """Tests stage (one passing, one failing fake test), gate, grid, profile, sweep, linear; schema and summary."""
    _cpp_or_skip()
    fake = tmp_path / "fake_tests" / "test_fake.py"
    fake.parent.mkdir()
    fake.write_text("def test_ok():\n    pass\n\n\ndef test_bad():\n    assert False, 'boom'\n")
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "bench.gpu_check", "--device", "cpu", "--quick", "--shapes", "64x1000",
           "--tests", str(fake), "--tests-workers", "1", "--roles", "ours_rlsd,ours_grpo,liger_rlsd,eager,ours_inplace",
           "--linear-shape", "512x32x500", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=str(ROOT), env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]  # 1 = the tests did not pass

    (path,) = out.glob("gpu-check-cpu-*.json")
    slug = path.stem[len("gpu-check-"):]
    res = json.loads(path.read_text())
    assert path.with_suffix(".md").read_text().startswith("# rlsd-kernels GPU check")
    assert (out / "tests.log").exists()
    assert res["schema"] == "rlsd-gpu-check/1" and res["device"]["slug"] == slug and res["device"]["type"] == "cpu"
    assert res["device"]["copy_bw"]["bytes_per_s"] > 0
    assert res["exit_code"] == 1 and res["watchdog"] is False
    t = res["tests"]
    assert t["status"] == "failed" and t["counts"] == {"passed": 1, "failed": 1}
    assert any("test_bad" in f for f in t["failures"])

    checks = {c["contender"]: c for c in res["checks"]}
    assert checks["rlsd[cpp]"]["status"] == "ok" and checks["grpo[cpp]"]["status"] == "ok"
    assert checks["liger"]["status"] == "skipped"  # Triton/CUDA only
    cases = {c["role"]: c for c in res["cases"]}
    assert set(cases) == {"ours_rlsd", "ours_grpo", "liger_rlsd", "eager", "ours_inplace"}
    for role in ("ours_rlsd", "ours_grpo", "eager"):
        c = cases[role]
        assert c["status"] == "ok" and set(c["modes"]) == {"fwd", "fwd+bwd"}
        for m, st in c["modes"].items():
            assert 0 < st["min_ms"] <= st["median_ms"] <= st["max_ms"] and st["reps"] >= 3
            passes = {"fwd": 1, "fwd+bwd": 2}[m] if role == "ours_grpo" else {"fwd": 2, "fwd+bwd": 3}[m]
            assert st["bytes_model"] == passes * 64 * 1000 * 2 and st["bw_frac"] > 0
            assert st["peak_mem_bytes"] is None  # CUDA allocator statistics only
        prof = c["profile"]
        assert prof["marked"] and prof["host_ms"] > 0 and prof["kernels"] is None  # no device activity on CPU
    assert set(cases["ours_inplace"]["modes"]) == {"fwd+bwd"}
    assert cases["liger_rlsd"]["status"] == "skipped"

    rows = res["sweep"]["rows"]
    from rlsd_kernels.backends import triton_launch

    assert {r["setting"] for r in rows} >= {f"SWEEP[{i}]" for i in range(len(triton_launch.SWEEP))}
    assert {r["op"] for r in rows} == {"rlsd fwd+bwd", "grpo fwd+bwd", "token_logprobs fwd"}
    # scoring is timed for the first setting only: no SWEEP entry changes the scoring kernels' keys
    assert len({r["setting"] for r in rows if r["op"] == "token_logprobs fwd"}) == 1
    assert all(r["status"] == "ok" for r in rows)
    assert res["sweep"]["summary"]["overall"] in {r["setting"] for r in rows}
    from bench import linear

    assert [r["row"] for r in res["linear"]] == list(linear.ROWS)
    # every row runs on CPU except Liger's (CUDA only), which is skipped with its reason
    assert {r["row"]: r["status"] for r in res["linear"]} == {**{row: "ok" for row in linear.ROWS},
                                                             "liger_grpo": "skipped"}

    # the summary table comes last
    tail = proc.stdout.strip().splitlines()
    assert tail[-1].startswith("total wall") and "exit 1" in tail[-1]
    text = "\n".join(tail[-25:])
    for col in gpu_report.SUMMARY_HEADER:
        assert col in text
    assert "64x1000" in text and "tests: FAILED: 1 passed, 1 failed" in text


# ------------------------------------------------------------------------------------------------ in-process units
def _cfg():
    return grid.GridConfig(device=CPU, rep_budget_s=0.0, case_need_s=0.0, log=lambda s: None)


def _fake(name, loss_fn, grpo=False):
    def make(inp, w):
        leaf = inp.student.requires_grad_(True)
        return Runner(leaf, lambda: loss_fn(leaf), lambda g: g)

    return grid.Entry(name, "ours_rlsd" if not grpo else "ours_grpo", grpo=grpo, make=make)


def _ok_gate(*entries):
    return {e.name: {"status": "ok"} for e in entries}


def test_deadline_skips_with_time_reason():
    cfg = _cfg()
    plan = [_fake("a", lambda z: z.float().sum())]
    past = timing.Deadline(time.time() - 1)
    cases = grid.run_shape(16, 50, plan, _ok_gate(*plan), cfg, past)
    assert [c["status"] for c in cases] == ["skipped"] and cases[0]["reason"].startswith("time")
    assert gpu_report.status_cell(cases[0]) == "skipped (time)"
    # a check that was skipped for time shows the same way at every shape
    gated = grid.run_grid_case(plan[0], cfg.workload(16, 50), None, {"status": "skipped", "reason": past.reason(5)}, cfg,
                          timing.Deadline(None))
    assert gpu_report.status_cell(gated) == "skipped (time)"
    from bench import linear

    rows = linear.run_in_process("16x8x50", "float32", "cpu", 1, deadline=past, log=lambda s: None)
    assert {r["status"] for r in rows} == {"skipped"} and all(r["error"].startswith("time") for r in rows)
    w = cfg.workload(16, 50)
    from bench.workload import make_shared_inputs

    sw = probes.launch_sweep(w, make_shared_inputs(w), "cpp", CPU, past, log=lambda s: None)
    assert sw["rows"] and all(r["status"] == "skipped" and r["reason"].startswith("time") for r in sw["rows"])
    res = {"config": {"shapes": [[16, 50]]}, "cases": cases}
    assert "skipped (time)" in gpu_report.summary_rows(res)[0][1]


def test_oom_and_error_are_reported_and_the_grid_goes_on():
    def oom(z):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 100.00 GiB")

    def boom(z):
        raise RuntimeError("kernel exploded")

    plan = [_fake("oom", oom), _fake("boom", boom), _fake("fine", lambda z: z.float().logsumexp(-1).mean())]
    cases = grid.run_shape(16, 50, plan, _ok_gate(*plan), _cfg(), timing.Deadline(None))
    by = {c["contender"]: c for c in cases}
    assert by["oom"]["status"] == "oom" and "out of memory" in by["oom"]["reason"]
    assert by["boom"]["status"] == "error" and "kernel exploded" in by["boom"]["reason"] and by["boom"]["traceback"]
    assert by["fine"]["status"] == "ok" and by["fine"]["modes"]["fwd+bwd"]["median_ms"] > 0
    assert timing.is_oom(torch.cuda.OutOfMemoryError("x")) and not timing.is_oom(RuntimeError("x"))


def test_wrong_contender_is_gated_and_never_timed():
    calls = []

    def wrong(z):
        calls.append(1)
        return 1.01 * z.float().log_softmax(-1).mean()

    e = _fake("wrong", wrong)
    cfg = _cfg()
    gate = grid.check(e, cfg, 16, 50)
    assert gate["status"] == "wrong" and gate["check"]["ok"] is False
    n = len(calls)
    (case,) = grid.run_shape(16, 50, [e], {e.name: gate}, cfg, timing.Deadline(None))
    assert case["status"] == "wrong" and case["modes"] == {} and len(calls) == n


def test_ours_and_eager_pass_the_gate_with_per_sequence_advantages():
    _cpp_or_skip()
    cfg = _cfg()
    for e in grid.entries(CPU, ("ours_rlsd", "ours_grpo", "eager", "ours_inplace")):
        g = grid.check(e, cfg, 32, 300)
        assert g["status"] == "ok", (e.name, g)


def test_liger_contenders_per_sequence_advantages():
    """Liger's pair and its GRPO kernel alone equal the reference with per-sequence advantages (the GPU check's
    workload). Wherever liger-kernel is installed: CUDA, or CPU through the Triton interpreter."""
    pytest.importorskip("liger_kernel")
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if dev.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs CUDA or TRITON_INTERPRET=1")
    cfg = grid.GridConfig(device=dev, dtype=torch.float32)
    for name, grpo in (("liger", False), ("liger_grpo", True)):
        e = grid.Entry(name, name, grpo=grpo, make=contenders.factory(name))
        g = grid.check(e, cfg, 32, 300)
        assert g["status"] == "ok", (name, g)


def test_contenders_ask_the_dispatcher(monkeypatch):
    from rlsd_kernels import dispatch

    real = dispatch.select_backend

    def fake(device, *, forced=None, **kw):
        if forced == "cpp":
            raise ValueError("backend 'cpp' cannot serve cpu tensors: pretend no compiler")
        return "reference" if forced is None else real(device, forced=forced, **kw)

    monkeypatch.setattr(dispatch, "select_backend", fake)
    assert contenders.backends_for(CPU) == ["reference"]
    assert "pretend no compiler" in contenders.availability("rlsd[cpp]", CPU)
    assert contenders.expand(["rlsd", "grpo"], CPU) == ["rlsd[reference]", "grpo[reference]"]
    assert [e.name for e in grid.entries(CPU, ("ours_rlsd", "ours_grpo"))] == ["rlsd[reference]", "grpo[reference]"]


def test_launch_sweep_takes_whatever_keys_launch_has(monkeypatch):
    _cpp_or_skip()
    from rlsd_kernels.backends import triton_launch as tl

    from bench.workload import make_shared_inputs

    key = sorted(tl.LAUNCH)[0]
    monkeypatch.setattr(tl, "SWEEP", [{key: tl.LAUNCH[key]}, {"no_such_key": 1}])
    w = _cfg().workload(16, 50)
    sw = probes.launch_sweep(w, make_shared_inputs(w), "cpp", CPU, timing.Deadline(None), rep_budget_s=0.0,
                             log=lambda s: None)
    st = {(r["setting"], r["op"]): r["status"] for r in sw["rows"]}
    assert st[("SWEEP[0]", "rlsd fwd+bwd")] == "ok" and st[("SWEEP[1]", "rlsd fwd+bwd")] == "error"
    assert ("LAUNCH", "rlsd fwd+bwd") not in st  # SWEEP[0] is the current setting: not timed twice
    assert dict(tl.LAUNCH)[key] == sw["rows"][0]["params"][key]


def test_sweep_summary_picks_fastest():
    rows = [{"setting": s, "params": {"k": s}, "N": 1, "V": v, "op": op, "status": "ok", "median_ms": ms}
            for s, v, op, ms in [("A", 10, "f", 1.0), ("B", 10, "f", 2.0), ("A", 20, "f", 1.5), ("B", 20, "f", 1.0),
                                 ("A", 10, "g", 1.0), ("B", 10, "g", 1.1)]]
    s = probes.sweep_summary(rows)
    assert {(p["V"], p["op"]): p["fastest"] for p in s["per_case"]} == {(10, "f"): "A", (20, "f"): "B",
                                                                          (10, "g"): "A"}
    assert s["overall"] == "A"  # geomean of (1, 1.5, 1) < geomean of (2, 1, 1.1)


def test_fastest_setting_never_adopts_a_setting_with_an_error():
    rows = [{"setting": s, "params": {"k": s}, "N": 1, "V": 10, "op": op, "status": st, "median_ms": ms}
            for s, op, st, ms in [("A", "rlsd fwd+bwd", "ok", 2.0), ("A", "grpo fwd+bwd", "ok", 2.0),
                                  ("B", "rlsd fwd+bwd", "ok", 1.0), ("B", "grpo fwd+bwd", "error", None),
                                  ("C", "rlsd fwd+bwd", "ok", 1.5), ("C", "grpo fwd+bwd", "ok", 1.5)]]
    assert probes.fastest_setting(rows)["setting"] == "C"  # B is faster but disagreed with the defaults once


def test_sweep_settings_must_agree_with_the_first():
    import torch

    g = torch.randn(16, 40)
    ref = {}
    assert probes._agrees(ref, "rlsd", (torch.tensor(1.5), g), 16) is None  # the first setting is the reference
    assert probes._agrees(ref, "rlsd", (torch.tensor(1.5), g * (1 + 1e-3)), 16) is None
    assert "loss" in probes._agrees(ref, "rlsd", (torch.tensor(1.6), g), 16)
    bad = g.clone()
    bad[15] += 1.0  # the last row is always sampled
    assert "gradient" in probes._agrees(ref, "rlsd", (torch.tensor(1.5), bad), 16)


def test_testrun_parse_and_command(monkeypatch):
    p = testrun.parse("....F\nFAILED tests/test_x.py::test_y - assert 0\n"
                      "3 failed, 221 passed, 5 skipped, 2 errors in 130.21s (0:02:10)\n")
    assert p["counts"] == {"failed": 3, "passed": 221, "skipped": 5, "errors": 2}
    assert p["failures"] == ["FAILED tests/test_x.py::test_y - assert 0"]
    assert testrun.parse("== 7 passed in 1.0s ==")["counts"] == {"passed": 7}
    cut = testrun.parse("$ python -m pytest -q tests\n..F.s.....  [ 40%]\n..E\n!!! KeyboardInterrupt !!!\n")
    assert cut["counts"] == {"passed": 10, "failed": 1, "errors": 1, "skipped": 1}
    assert cut["counts_from"].startswith("progress")
    verbose = testrun.parse("[gw1] [ 10%] PASSED tests/a.py::t1 \ntests/b.py::t2[x] FAILED\n!!! KeyboardInterrupt !!!\n")
    assert verbose["counts"] == {"passed": 1, "failed": 1} and verbose["counts_from"].startswith("-v")
    assert testrun.finished_ids("[gw0] [ 5%] SKIPPED tests/c.py::t3 \n") == {"tests/c.py::t3"}
    brief = testrun.brief({"status": "timeout", "counts": {"passed": 3}, "wall_s": 210.0, "rc": 2, "timeout_s": 210.0,
                           "unfinished": ["tests/d.py::slow"]})
    assert "still running at the cap: tests/d.py::slow" in brief
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    assert "-n" not in testrun.command(["tests"], 8)  # no xdist: serial
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: object())
    cmd = testrun.command(["tests"], 8)
    assert cmd[cmd.index("-n") + 1] == "8" and "--timeout=120" in cmd and "--durations=15" in cmd


def test_shell_wrapper_syntax():
    r = subprocess.run(["bash", "-n", str(ROOT / "bench" / "gpu_check.sh")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_shell_wrapper_dry_run(tmp_path):
    """The wrapper end to end without installing anything (GPU_CHECK_SKIP_INSTALL=1): results land in $OUT."""
    _cpp_or_skip()
    env = {**_env(), "OUT": str(tmp_path), "GPU_CHECK_SKIP_INSTALL": "1"}
    r = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), "--device", "cpu", "--quick", "--tests", "none",
                        "--roles", "ours_rlsd", "--sweep-shapes", "none", "--linear-shape", "none"],
                       cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "torch " in r.stdout and r.stdout.strip().splitlines()[-1].startswith("total wall")
    assert list(tmp_path.glob("gpu-check-cpu-*.json")) and (tmp_path / "gpu-check.log").exists()


def test_cli_past_deadline_skips_every_stage_and_still_writes(tmp_path):
    """Budget spent before the bench starts (reserve = budget): every stage is reported "skipped (time)", the files
    and the summary are still written, and the run ends cleanly."""
    cmd = [sys.executable, "-m", "bench.gpu_check", "--device", "cpu", "--quick", "--tests", "none",
           "--budget-s", "300", "--reserve-s", "300", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=str(ROOT), env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (path,) = tmp_path.glob("gpu-check-cpu-*.json")
    res = json.loads(path.read_text())
    assert res["checks"] and all(c["status"] == "skipped" and c["reason"].startswith("time") for c in res["checks"])
    assert res["cases"] and all(gpu_report.status_cell(c) == "skipped (time)" for c in res["cases"])
    assert all(r["status"] == "skipped" for r in res["linear"])
    assert "skipped (time)" in proc.stdout and proc.stdout.strip().splitlines()[-1].startswith("total wall")


def test_exit_code_and_watchdog_summary(tmp_path, capsys):
    from bench import gpu_check

    args = gpu_check.parse_args(["--device", "cpu", "--quick", "--out", str(tmp_path)])
    run = gpu_check.Run(args, [], CPU, time.time())
    run.res["tests"] = {"status": "failed", "counts": {"passed": 1, "failed": 1}, "rc": 1, "wall_s": 1.0,
                        "timeout_s": 150.0, "failures": ["FAILED tests/x.py::y"]}
    run.add("cases", {"contender": "rlsd[x]", "role": "ours_rlsd", "N": 64, "V": 1000, "status": "wrong",
                      "reason": "check: differs", "modes": {}})
    assert run.exit_code() == 3
    assert run.finish(watchdog=True) == 7
    out = capsys.readouterr().out
    assert "WATCHDOG" in out and "FAILED tests/x.py::y" in out and "WRONG rlsd[x]" in out
    assert json.loads(run.json_path.read_text())["watchdog"] is True
    assert run.finish() == 7  # once finished, a second exit path changes nothing


def test_a_peer_library_error_does_not_fail_the_check_but_ours_does():
    from bench import gpu_check

    run = object.__new__(gpu_check.Run)
    ok = {"contender": "rlsd[triton]", "role": "ours_rlsd", "N": 1, "V": 2, "status": "ok"}
    peer = {"shape": "16x4x8", "row": "liger_grpo", "status": "error", "error": "InternalTorchDynamoError"}
    run.res = {"tests": {"status": "passed"}, "checks": [ok], "cases": [ok], "linear": [peer], "sweep": None}
    assert run.exit_code() == 0 and "InternalTorchDynamoError" in run.res["peer_errors"][0]
    run.res["linear"].append({"shape": "16x4x8", "row": "fused_linear", "status": "error", "error": "boom"})
    assert run.exit_code() == 2
