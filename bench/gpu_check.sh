#!/usr/bin/env bash
# The one command for a lent GPU (bench/README.md, "GPU check"): at most 8 minutes on one H100/H200, nothing to
# download. From the repository root:
#
#   bash bench/gpu_check.sh [options of python -m bench.gpu_check]
#
# 1. installs the package without dependencies (pip install -e .) and, if ./.whl/ holds wheels (e.g. liger-kernel),
#    installs them into /tmp/site and puts that on PYTHONPATH;
# 2. prints the GPU (nvidia-smi) and the torch / triton versions;
# 3. runs python -m bench.gpu_check: the test suite on the GPU (capped), the correctness gate, the docs/math.md
#    section 8 grid with every contender, launch/sync counts, the launch-parameter sweep and the fused-linear rows,
#    within the budget counted from this script's start (--budget-s, default 480 s).
#
# Results go to $OUT (the device tool's output folder) or else bench/out/ (git-ignored): gpu-check-<device>.json
# and .md, tests.log, install.log, gpu-check.log. The summary table is printed last. Exit status: 0 clean, +1 tests
# did not pass, +2 a contender was wrong or errored, +4 the watchdog cut the run short.
# GPU_CHECK_SKIP_INSTALL=1 skips step 1 (a dry run on a machine whose environment must not change).
set -u
START=$(date +%s)
cd "$(dirname "$0")/.."
OUT_DIR="${OUT:-$PWD/bench/out}"
SITE="${GPU_CHECK_SITE:-/tmp/site}"
PY="${PYTHON:-python3}"
mkdir -p "$OUT_DIR"
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET  # real kernels only: the interpreter is for CPU tests

if [ "${GPU_CHECK_SKIP_INSTALL:-0}" != 1 ]; then
  if "$PY" -m pip install -q --no-deps --no-build-isolation -e . >"$OUT_DIR/install.log" 2>&1; then
    echo "installed rlsd-kernels (editable, no deps)"
  else
    echo "pip install -e . failed (see install.log); running from the checkout"
  fi
  shopt -s nullglob
  whls=(.whl/*.whl)
  if [ ${#whls[@]} -gt 0 ]; then
    if "$PY" -m pip install -q --no-index --no-deps --upgrade --target "$SITE" "${whls[@]}" >>"$OUT_DIR/install.log" 2>&1; then
      echo "installed ${whls[*]} into $SITE"
    else
      echo "installing ${whls[*]} failed (see install.log)"
    fi
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
  else
    echo "no wheels in ./.whl/ (Liger-Kernel contenders will be skipped unless it is installed)"
  fi
fi

nvidia-smi --query-gpu=name,memory.total --format=csv 2>/dev/null || echo "nvidia-smi: not available"
"$PY" - <<'EOF'
import torch
try:
    import triton
    tv = triton.__version__
except Exception as e:
    tv = f"not importable ({e})"
print(f"torch {torch.__version__} (cuda {torch.version.cuda}, available {torch.cuda.is_available()}), triton {tv}")
EOF

# Build the C++ CPU backend now, in the background, so that the CPU tests do not wait for it at the end of the
# test run (on a fresh machine the build takes about a minute).
"$PY" -m rlsd_kernels.backends.logits.cpp --build >"$OUT_DIR/cpp-build.log" 2>&1 &

MARK="$OUT_DIR/.gpu-check-started"
touch "$MARK"
"$PY" -m bench.gpu_check --out "$OUT_DIR" --started-at "$START" "$@" 2>&1 | tee "$OUT_DIR/gpu-check.log"
rc=${PIPESTATUS[0]}
if [ -z "$(find "$OUT_DIR" -maxdepth 1 -name 'gpu-check-*.json' -newer "$MARK" 2>/dev/null)" ]; then
  # the harness itself could not start: still run the tests, which is what it would have done first
  echo "bench.gpu_check wrote no results (exit $rc); running the test suite alone"
  n=""
  "$PY" -c "import xdist" 2>/dev/null && n="-n 8"
  timeout -s INT -k 20 150 "$PY" -m pytest -q tests $n -p no:cacheprovider >"$OUT_DIR/tests.log" 2>&1
  echo "tests: exit $? ($(tail -n 1 "$OUT_DIR/tests.log"))"
  [ "$rc" -eq 0 ] && rc=2
fi
exit "$rc"
