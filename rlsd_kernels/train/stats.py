"""Per-seed summaries of a comparison and their 95% bootstrap intervals (numpy, fixed RNG: reruns print the same).

Each run contributes one number per statistic (its early accuracy, AUC, best, final, teacher-view accuracy); the
interval is the 2.5-97.5 percentile range of the mean over seeds resampled with replacement. With 5 seeds the
interval is coarse (at most 126 distinct resamples), which is the honest width at this sample size.
"""
from __future__ import annotations

from typing import Dict, List

import numpy as np

BOOTSTRAP_RESAMPLES = 10000
BOOTSTRAP_SEED = 0
# statistic -> what it is, for the tables
STATS = {
    "early": "mean held-out accuracy over the evals in the first quarter of the RL steps",
    "auc": "mean held-out accuracy over every eval after step 0 (area under the curve / steps)",
    "best": "best held-out accuracy of the run",
    "final": "held-out accuracy at the last step",
    "hint_min": "lowest teacher-view accuracy (answer in the prompt) over training",
    "hint_final": "teacher-view accuracy at the last step",
}


def bootstrap_ci(values, resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED):
    """(mean, low, high): the mean of ``values`` and the 95% percentile bootstrap interval of that mean."""
    x = np.asarray(values, dtype=float)
    if x.ndim != 1 or x.size == 0:
        raise ValueError(f"values must be a non-empty 1-D sequence, got shape {x.shape}")
    idx = np.random.default_rng(seed).integers(0, x.size, size=(resamples, x.size))
    means = x[idx].mean(1)
    return float(x.mean()), float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def eval_curves(runs: List[List[Dict]]) -> Dict[str, np.ndarray]:
    """The eval steps common to every run and the ``[seeds, steps]`` arrays of held-out accuracy and (when logged)
    teacher-view accuracy."""
    evals = [{h["step"]: h for h in r if "eval_acc" in h} for r in runs]
    steps = sorted(set.intersection(*[set(e) for e in evals]))
    out = {"steps": steps, "acc": np.array([[e[s]["eval_acc"] for s in steps] for e in evals])}
    if all("hint_eval_acc" in e[s] for e in evals for s in steps):
        out["hint"] = np.array([[e[s]["hint_eval_acc"] for s in steps] for e in evals])
    return out


def per_seed_stats(curves: Dict[str, np.ndarray]) -> Dict[str, List[float]]:
    """One value per seed for every statistic of ``STATS``."""
    steps, acc = curves["steps"], curves["acc"]
    last = steps[-1]
    early = [i for i, s in enumerate(steps) if 0 < s <= max(1, last // 4)] or [min(1, len(steps) - 1)]
    after0 = [i for i, s in enumerate(steps) if s > 0] or [0]
    out = {"early": acc[:, early].mean(1), "auc": acc[:, after0].mean(1), "best": acc.max(1), "final": acc[:, -1]}
    if "hint" in curves:
        out["hint_min"] = curves["hint"].min(1)
        out["hint_final"] = curves["hint"][:, -1]
    return {k: [float(v) for v in vals] for k, vals in out.items()}


def summarize_runs(hist: Dict[str, List[List[Dict]]]) -> Dict:
    """``hist[label]`` = the metric histories of one label's seeds -> curves, and per label the per-seed values and
    (mean, low, high) of every statistic, the post-warm-start accuracy and the training reward of the last 20
    steps."""
    curves, rows = {}, {}
    for label, runs in hist.items():
        c = eval_curves(runs)
        curves[label] = c
        per_seed = per_seed_stats(c)
        rewards = np.array([[h["reward_mean"] for h in r if h["step"] > 0] for r in runs])
        rows[label] = {
            "seeds": len(runs), "final_step": int(c["steps"][-1]), "start": float(c["acc"][:, 0].mean()),
            "hint_start": float(c["hint"][:, 0].mean()) if "hint" in c else float("nan"),
            "train_reward_last20": float(rewards[:, -20:].mean()) if rewards.size else float("nan"),
            "per_seed": per_seed, "ci": {k: bootstrap_ci(v) for k, v in per_seed.items()},
        }
    return {"curves": curves, "rows": rows}


def fmt_ci(ci) -> str:
    mean, lo, hi = ci
    return f"{mean:.3f} [{lo:.3f}, {hi:.3f}]"


def markdown_table(summary: Dict, label_name: str = "method") -> str:
    rows = summary["rows"]
    any_row = next(iter(rows.values()))
    stats = [k for k in STATS if all(k in r["ci"] for r in rows.values())]
    lines = [
        f"Held-out accuracy (greedy, exact match), {any_row['seeds']} seeds, mean [95% bootstrap interval over "
        f"seeds]. " + "; ".join(f"{k} = {STATS[k]}" for k in stats) + f". Early covers steps <= "
        f"{max(1, any_row['final_step'] // 4)}, final is step {any_row['final_step']}.",
        "",
        f"| {label_name} | post-warm-start | " + " | ".join(stats) + " | final per seed | train reward (last 20) |",
        "|---|---|" + "---|" * len(stats) + "---|---|",
    ]
    for label, r in rows.items():
        lines.append(f"| {label} | {r['start']:.3f} | " + " | ".join(fmt_ci(r["ci"][k]) for k in stats) + " | "
                     + ", ".join(f"{x:.3f}" for x in r["per_seed"]["final"]) + f" | {r['train_reward_last20']:.3f} |")
    return "\n".join(lines) + "\n"


def json_ready(summary: Dict) -> Dict:
    """The summary with its curves as plain lists (mean over seeds and per seed)."""
    curves = {label: {k: (v.tolist() if isinstance(v, np.ndarray) else list(v)) for k, v in c.items()}
              for label, c in summary["curves"].items()}
    return {**{k: v for k, v in summary.items() if k != "curves"}, "curves": curves}
