"""``rlsd-train compare``: methods x seeds from one shared warm start per seed; mean/spread chart + markdown table."""
from __future__ import annotations

import json
import os
import time
from concurrent.futures import ProcessPoolExecutor
from typing import Dict, List

import numpy as np

from .config import METHODS, TrainConfig

__all__ = ["compare", "parse_methods", "summarize"]


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
    t0 = time.time()
    tag = f"[{cfg.method} seed {cfg.seed}]"
    res = train(cfg, log=lambda msg: print(f"{tag} {msg}", flush=True))
    return {"out": cfg.out, "wall_s": time.time() - t0, "final_acc": res["final_acc"]}


def _map(fn, jobs_list: List[Dict], jobs: int):
    if jobs <= 1 or len(jobs_list) <= 1:
        return [fn(j) for j in jobs_list]
    import multiprocessing as mp

    with ProcessPoolExecutor(max_workers=jobs, mp_context=mp.get_context("spawn")) as ex:
        return list(ex.map(fn, jobs_list))


def compare(methods: List[str], seeds: int, out: str, base: TrainConfig, jobs: int = 1) -> Dict:
    """Runs every method for seeds 0..seeds-1 (all methods of a seed start from the same warm-start weights and RNG
    state), reuses finished runs found in ``out``, then writes ``compare.png``, ``compare.md``, ``summary.json``."""
    os.makedirs(out, exist_ok=True)
    t0 = time.time()
    base_d = base.to_dict()
    base_d.update(resume=None, init_from=None)
    if jobs > 1:
        base_d.update(progress=False, threads=base.threads or 1)
    # 1. one warm start per seed (a run with 0 RL steps writes warmstart.pt)
    ws = []
    for s in range(seeds):
        d = dict(base_d, seed=s, steps=0, method=methods[0], out=os.path.join(out, f"seed{s}", "warmstart"),
                 plot=False, progress=False)
        if not os.path.exists(os.path.join(d["out"], "warmstart.pt")):
            ws.append(d)
    _map(_run, ws, jobs)
    # 2. every method from it
    runs = []
    for s in range(seeds):
        for m in methods:
            d = dict(base_d, seed=s, method=m, out=os.path.join(out, f"seed{s}", m),
                     init_from=os.path.join(out, f"seed{s}", "warmstart", "warmstart.pt"))
            if not _complete(d["out"], base.steps):
                runs.append(d)
    _map(_run, runs, jobs)
    hist = {m: [_read_history(os.path.join(out, f"seed{s}", m)) for s in range(seeds)] for m in methods}
    summary = summarize(hist, base)
    summary["wall_s"] = time.time() - t0
    summary["config"] = {k: v for k, v in base_d.items() if k not in ("method", "seed", "out")}
    from .plotting import plot_compare

    plot_compare(summary["curves"], os.path.join(out, "compare.png"),
                 title=f"{base.task} ({base.digits} digits): held-out accuracy over {seeds} seeds "
                       f"(mean, +-1 std, min-max)")
    md = markdown_table(summary, seeds)
    with open(os.path.join(out, "compare.md"), "w") as f:
        f.write(md)
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump({k: v for k, v in summary.items() if k != "curves"}, f, indent=1)
    print(md)
    print(f"compare: {time.time() - t0:.0f}s; chart {os.path.join(out, 'compare.png')}")
    return summary


def summarize(hist: Dict[str, List[List[Dict]]], base: TrainConfig) -> Dict:
    curves, rows = {}, {}
    for m, runs in hist.items():
        evals = [{h["step"]: h["eval_acc"] for h in r if "eval_acc" in h} for r in runs]
        steps = sorted(set.intersection(*[set(e) for e in evals]))
        acc = np.array([[e[s] for s in steps] for e in evals])  # [seeds, S]
        curves[m] = {"steps": steps, "acc": acc}
        hints = [{h["step"]: h["hint_eval_acc"] for h in r if "hint_eval_acc" in h} for r in runs]
        if all(set(steps) <= set(hd) for hd in hints):
            curves[m]["hint"] = np.array([[hd[s] for s in steps] for hd in hints])
        mean = acc.mean(0)
        early = [i for i, s in enumerate(steps) if 0 < s <= max(1, steps[-1] // 4)] or [min(1, len(steps) - 1)]
        rewards = np.array([[h["reward_mean"] for h in r if h["step"] > 0] for r in runs])
        rows[m] = {
            "start": float(acc[:, 0].mean()),
            "final_mean": float(acc[:, -1].mean()), "final_std": float(acc[:, -1].std()),
            "best_mean": float(acc.max(1).mean()),
            "early_mean": float(acc[:, early].mean()),  # first quarter of the run
            "auc": float(mean[1:].mean()) if len(mean) > 1 else float(mean[0]),
            "train_reward_last20": float(rewards[:, -20:].mean()) if rewards.size else float("nan"),
            "per_seed_final": [float(x) for x in acc[:, -1]],
            "final_step": int(steps[-1]),
            "hint_final_mean": float(curves[m]["hint"][:, -1].mean()) if "hint" in curves[m] else float("nan"),
        }
    return {"curves": curves, "rows": rows}


def markdown_table(summary: Dict, seeds: int) -> str:
    rows = summary["rows"]
    any_row = next(iter(rows.values()))
    lines = [
        f"Held-out accuracy (greedy, exact match), {seeds} seeds, mean +- std; every method of a seed starts from "
        f"the same warm-start weights. Early = mean over evals in the first quarter of the run (steps <= "
        f"{any_row['final_step'] // 4}); AUC = mean over all evals after step 0. "
        f"Hint-format = accuracy when the answer is in the prompt (the teacher's view), at the end of the run.",
        "",
        "| method | post-warm-start | early | AUC | best | final (step %d) | final per seed | train reward (last 20 steps) "
        "| hint-format (final) |"
        % any_row["final_step"],
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for m, r in rows.items():
        lines.append(f"| {m} | {r['start']:.3f} | {r['early_mean']:.3f} | {r['auc']:.3f} | {r['best_mean']:.3f} | "
                     f"{r['final_mean']:.3f} +- {r['final_std']:.3f} | "
                     f"{', '.join(f'{x:.3f}' for x in r['per_seed_final'])} | {r['train_reward_last20']:.3f} | "
                     f"{r['hint_final_mean']:.3f} |")
    return "\n".join(lines) + "\n"
