"""Benchmark suite of the fused RLSD loss (docs/math.md section 8).

``python -m bench`` (or ``rlsd-bench``) times the fused op against the eager reference, ``torch.compile`` of the
eager reference and, on CUDA, Liger-Kernel's Triton GRPO loss, after checking that every contender gives the
reference's loss and gradient on the benchmark inputs. See ``bench/README.md`` for the method.

Modules: ``workload`` (inputs, byte model), ``contenders`` (who is timed and how), ``worker`` (one case, one
process), ``devices`` (device names, peak bandwidths), ``report`` (table, markdown, plot), ``__main__`` (CLI).

``bash bench/gpu_check.sh`` / ``python -m bench.gpu_check`` is the one-process, time-budgeted check for a lent GPU:
``gpu_check`` (stages, deadline, files), ``testrun`` (the test suite), ``grid`` (contenders, gate, one shape),
``timing`` (timed calls, peak memory, copy bandwidth), ``probes`` (launch/sync counts, launch sweep), ``gpu_report``
(summary and markdown), ``linear.run_in_process`` (the fused-linear rows).
"""
