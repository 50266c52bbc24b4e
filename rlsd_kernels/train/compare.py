"""``rlsd-train compare`` (methods x seeds) and ``rlsd-train ablate`` (RLSD variants x the same seeds).

Every run of a seed starts from that seed's one warm start (``OUT/seed<s>/warmstart``), so methods and variants
differ only in the RL phase. Finished runs found in ``OUT`` are reused: ``ablate`` on a compare's ``OUT`` reuses its
warm starts and its ``rlsd`` runs (the baseline variant). Outputs: a chart, a markdown table, a JSON summary.
"""
from __future__ import annotations

import json
import os
import time
from concurrent.futures import ProcessPoolExecutor
from typing import Dict, List, Tuple

from .config import METHODS, TrainConfig
from .stats import json_ready, markdown_table, summarize_runs

__all__ = ["compare", "ablate", "ablation_variants", "parse_methods", "summarize_runs"]


def parse_methods(text: str) -> List[str]:
    methods = [m.strip() for m in text.split(",") if m.strip()]
    bad = [m for m in methods if m not in METHODS]
    if not methods or bad:
        raise ValueError(f"--methods must be a comma-separated subset of {','.join(METHODS)}, got {text!r}")
    return list(dict.fromkeys(methods))


def _read_history(out: str) -> List[Dict]:
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def _complete(out: str, steps: int) -> bool:
    try:
        h = _read_history(out)
    except OSError:
        return False
    return bool(h) and h[-1]["step"] >= steps and "eval_acc" in h[-1]


def _run(cfg_dict: Dict) -> Dict:
    from .trainer import train

    cfg = TrainConfig(**cfg_dict)
    if cfg.steps > 0 and _complete(cfg.out, cfg.steps):  # finished meanwhile (e.g. by a compare on the same OUT)
        return {"out": cfg.out, "wall_s": 0.0, "final_acc": _read_history(cfg.out)[-1]["eval_acc"]}
    t0 = time.time()
    tag = f"[{os.path.basename(cfg.out)} seed {cfg.seed}]"
    res = train(cfg, log=lambda msg: print(f"{tag} {msg}", flush=True))
    return {"out": cfg.out, "wall_s": time.time() - t0, "final_acc": res["final_acc"]}


def _map(fn, jobs_list: List[Dict], jobs: int):
    if jobs <= 1 or len(jobs_list) <= 1:
        return [fn(j) for j in jobs_list]
    import multiprocessing as mp

    with ProcessPoolExecutor(max_workers=jobs, mp_context=mp.get_context("spawn")) as ex:
        return list(ex.map(fn, jobs_list))


def _run_grid(variants: List[Tuple[str, Dict]], seeds: int, out: str, base: TrainConfig, jobs: int,
              last: Tuple[str, ...] = ()) -> Dict:
    """Runs ``OUT/seed<s>/<label>`` for every (label, overrides of ``base``) and seed from the seed's warm start;
    returns the metric histories by label. Labels in ``last`` run after all the others (and a run found finished
    by then is not repeated)."""
    os.makedirs(out, exist_ok=True)
    base_d = base.to_dict()
    base_d.update(resume=None, init_from=None)
    if jobs > 1:
        base_d.update(progress=False, threads=base.threads or 1)
    ws = []  # 1. one warm start per seed (a run with 0 RL steps writes warmstart.pt)
    for s in range(seeds):
        d = dict(base_d, **variants[0][1], seed=s, steps=0, out=os.path.join(out, f"seed{s}", "warmstart"),
                 plot=False, progress=False)
        if not os.path.exists(os.path.join(d["out"], "warmstart.pt")):
            ws.append(d)
    _map(_run, ws, jobs)
    runs = []  # 2. every variant from it
    for s in range(seeds):
        for label, overrides in variants:
            d = dict(base_d, **overrides, seed=s, out=os.path.join(out, f"seed{s}", label),
                     init_from=os.path.join(out, f"seed{s}", "warmstart", "warmstart.pt"))
            if not _complete(d["out"], base.steps):
                runs.append(d)
    runs.sort(key=lambda d: os.path.basename(d["out"]) in last)  # stable: otherwise seed-major order
    _map(_run, runs, jobs)
    return {label: [_read_history(os.path.join(out, f"seed{s}", label)) for s in range(seeds)]
            for label, _ in variants}


def _write(summary: Dict, out: str, name: str, md: str, title: str) -> None:
    from .plotting import plot_compare

    plot_compare(summary["curves"], os.path.join(out, f"{name}.png"), title=title)
    with open(os.path.join(out, f"{name}.md"), "w") as f:
        f.write(md)
    with open(os.path.join(out, f"{name}.json"), "w") as f:
        json.dump(json_ready(summary), f, indent=1)
    print(md)
    print(f"{name}: {summary['wall_s']:.0f}s; chart {os.path.join(out, name + '.png')}")


def _task_label(base: TrainConfig) -> str:
    extra = f", {base.operands} operands" if base.task == "chainsum" else ""
    return f"{base.task} ({base.digits} digit(s){extra})"


def compare(methods: List[str], seeds: int, out: str, base: TrainConfig, jobs: int = 1) -> Dict:
    """Every method for seeds 0..seeds-1 from the seed's shared warm start; writes ``compare.png``, ``compare.md``
    and ``compare.json`` (per-seed statistics, bootstrap intervals, curves) into ``out``."""
    t0 = time.time()
    hist = _run_grid([(m, {"method": m}) for m in methods], seeds, out, base, jobs)
    summary = summarize_runs(hist)
    summary["wall_s"] = time.time() - t0
    summary["config"] = {k: v for k, v in base.to_dict().items() if k not in ("method", "seed", "out")}
    _write(summary, out, "compare", markdown_table(summary, "method"),
           f"{_task_label(base)}: {seeds} seeds (mean, +-1 std, min-max)")
    return summary


def ablation_variants(base: TrainConfig) -> List[Tuple[str, Dict]]:
    """RLSD with ``base``'s settings (label ``rlsd``, the compare's own run) and one change each: lam decaying over
    the whole run instead of ``--lam-decay-steps``, eps_w 0.5, and the live policy as the teacher (no synced copy).
    A variant equal to the baseline under ``base`` (e.g. ``--teacher-sync 0`` already) is dropped."""
    candidates = [
        ("rlsd", {}),
        (f"rlsd-lam-decay-{base.steps}", {"lam_decay_steps": base.steps}),
        ("rlsd-eps_w-0.5", {"eps_w": 0.5}),
        ("rlsd-live-teacher", {"teacher_sync": 0}),
    ]
    out = []
    for label, overrides in candidates:
        if label == "rlsd" or any(getattr(base, k) != v for k, v in overrides.items()):
            out.append((label, {"method": "rlsd", **overrides}))
    return out


def ablate(seeds: int, out: str, base: TrainConfig, jobs: int = 1) -> Dict:
    """The RLSD ablations of :func:`ablation_variants` over seeds 0..seeds-1; writes ``ablate.png``, ``ablate.md``
    and ``ablate.json`` into ``out`` (use a compare's ``out`` with the same flags to reuse its warm starts and its
    rlsd runs)."""
    t0 = time.time()
    variants = ablation_variants(base)
    # the baseline last: a compare still running on the same OUT may finish those runs first
    hist = _run_grid(variants, seeds, out, base, jobs, last=("rlsd",))
    summary = summarize_runs(hist)
    summary["wall_s"] = time.time() - t0
    summary["variants"] = {label: overrides for label, overrides in variants}
    summary["config"] = {k: v for k, v in base.to_dict().items() if k not in ("method", "seed", "out")}
    _write(summary, out, "ablate", markdown_table(summary, "RLSD variant"),
           f"RLSD ablations, {_task_label(base)}: {seeds} seeds (mean, +-1 std, min-max)")
    return summary
