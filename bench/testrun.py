"""The test-suite stage of the GPU check: ``python -m pytest -q <targets> -n <workers> -p no:cacheprovider`` with a
wall-clock cap, its output in a log file, its outcome parsed from pytest's last line.

``-n`` needs pytest-xdist; without it the run is serial. At the cap the process group gets SIGINT (pytest then
prints its summary of what ran), then SIGKILL 20 s later. Status: ``passed`` (exit 0), ``failed`` (exit 1),
``timeout`` (the cap was hit), ``error`` (any other exit: interrupted, internal error, usage, nothing collected).
"""
from __future__ import annotations

import importlib.util
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import List, Optional

COUNT = re.compile(r"(\d+) (passed|failed|errors?|skipped|xfailed|xpassed|deselected)\b")
# a finished test in -v output, with or without xdist's "[gw3] [ 45%] " prefix
OUTCOME = re.compile(r"\b(PASSED|FAILED|SKIPPED|ERROR|XFAIL|XPASS) (\S+::\S+)|(\S+::\S+) (PASSED|FAILED|SKIPPED|ERROR|XFAIL|XPASS)\b")
PROGRESS = re.compile(r"^([.FEsxX]+)(\s+\[\s*\d+%\])?$")


def command(targets: List[str], workers: int) -> List[str]:
    cmd = [sys.executable, "-m", "pytest", "-q", *targets, "-p", "no:cacheprovider"]
    if workers > 1 and importlib.util.find_spec("xdist") is not None:
        cmd += ["-n", str(workers)]
    # Name the slow tests, and make a hanging one fail with its traceback instead of eating the stage's cap (on the
    # 2026-11-26 H200 runs ~10 tests were still running at the cap and the log could not say which).
    cmd += ["--durations=15", "-rfE", "-v"]
    if importlib.util.find_spec("pytest_timeout") is not None:
        cmd += ["--timeout=120"]
    return cmd


def parse(text: str) -> dict:
    """Counts from pytest's final summary line, and the ``FAILED``/``ERROR`` lines of its short summary."""
    counts = {}
    for line in reversed(text.strip().splitlines()[-40:]):
        found = COUNT.findall(line)
        if found and (" in " in line or line.startswith("=")):
            for n, k in found:
                counts["errors" if k.startswith("error") else k] = int(n)
            break
    source = "summary line"
    if not counts:  # killed before pytest's summary: count its progress characters instead
        marks = "".join(m.group(1) for ln in text.splitlines() if (m := PROGRESS.match(ln.strip())))
        names = {".": "passed", "F": "failed", "E": "errors", "s": "skipped", "x": "xfailed", "X": "xpassed"}
        for ch, k in names.items():
            if marks.count(ch):
                counts[k] = marks.count(ch)
        source = "progress characters (no summary line)" if counts else "none"
    if not counts:  # -v output killed before the summary: count the reported outcomes
        names = {"PASSED": "passed", "FAILED": "failed", "ERROR": "errors", "SKIPPED": "skipped", "XFAIL": "xfailed",
                 "XPASS": "xpassed"}
        for m in OUTCOME.finditer(text):
            k = names[m.group(1) or m.group(4)]
            counts[k] = counts.get(k, 0) + 1
        source = "-v outcome lines (no summary line)" if counts else "none"
    failures = [ln.strip() for ln in text.splitlines() if ln.startswith(("FAILED ", "ERROR "))]
    return {"counts": counts, "counts_from": source, "failures": failures[:30], "n_failure_lines": len(failures)}


def finished_ids(text: str) -> set:
    """Node ids that -v output reports with an outcome."""
    return {m.group(2) or m.group(3) for m in OUTCOME.finditer(text)}


def collect_ids(targets: List[str], cwd: Optional[Path], env: Optional[dict], timeout_s: float = 60.0) -> List[str]:
    """Node ids pytest collects (``--collect-only -q``), or [] if that fails: what 'unfinished' is measured against."""
    try:
        r = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", *targets, "-p", "no:cacheprovider"],
                           cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout_s)
    except (subprocess.TimeoutExpired, OSError):
        return []
    return [ln.strip() for ln in r.stdout.splitlines() if "::" in ln and not ln.startswith(" ")]


def _killpg(proc: subprocess.Popen, sig) -> None:
    try:
        os.killpg(proc.pid, sig)  # the group of the pytest process this function started (its xdist workers)
    except (ProcessLookupError, PermissionError):
        pass


def run(targets, timeout_s: float, log_path: Path, workers: int = 8, cwd: Optional[Path] = None,
        env: Optional[dict] = None) -> dict:
    targets = shlex.split(targets) if isinstance(targets, str) else list(targets)
    cmd = command(targets, workers)
    env = dict(os.environ if env is None else env)
    if "-n" in cmd:
        # one BLAS / OpenMP thread per core share: 12 workers x 16 threads each on 16 cores slowed the CPU tests so
        # much that the suite ran past its 210 s cap on the 2026-11-27 H200 run
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // workers)))
    t0 = time.perf_counter()
    timed_out = False
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as log:
        log.write("$ " + " ".join(shlex.quote(c) for c in cmd) + "\n")
        log.flush()
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = proc.wait(timeout=max(1.0, timeout_s))
        except subprocess.TimeoutExpired:
            timed_out = True
            _killpg(proc, signal.SIGINT)
            try:
                rc = proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                _killpg(proc, signal.SIGKILL)
                rc = proc.wait()
    text = log_path.read_text(errors="replace")
    res = {"command": " ".join(shlex.quote(c) for c in cmd), "rc": rc, "wall_s": round(time.perf_counter() - t0, 1),
           "timeout_s": timeout_s, "xdist": "-n" in cmd, "log": str(log_path), **parse(text)}
    res["status"] = "timeout" if timed_out else {0: "passed", 1: "failed"}.get(rc, "error")
    if timed_out:  # name what was still running when the cap hit (collected minus reported)
        done = finished_ids(text)
        res["unfinished"] = [t for t in collect_ids(targets, cwd, env) if t not in done][:40]
    res["tail"] = text.strip().splitlines()[-5:]
    return res


def brief(t: dict) -> str:
    if t.get("status") == "skipped":
        return f"tests: skipped ({t.get('reason')})"
    c = t.get("counts", {})
    parts = [f"{c[k]} {k}" for k in ("passed", "failed", "errors", "skipped", "xfailed", "xpassed") if c.get(k)]
    what = ", ".join(parts) or "no counts"
    line = f"tests: {t['status'].upper()}: {what} in {t['wall_s']:.0f} s (exit {t['rc']}, cap {t['timeout_s']:.0f} s)"
    if t.get("unfinished"):
        line += f"; still running at the cap: {', '.join(t['unfinished'][:8])}" + (" ..." if len(t["unfinished"]) > 8
                                                                                  else "")
    return line
