"""PNG curves of one run and of a multi-seed method comparison (matplotlib, Agg backend)."""
from __future__ import annotations

from typing import Dict, List, Sequence

import numpy as np


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _smooth(y: Sequence[float], k: int = 10) -> np.ndarray:
    y = np.asarray(y, dtype=float)
    if len(y) < k:
        return y
    c = np.cumsum(np.insert(y, 0, 0.0))
    out = np.empty_like(y)
    for i in range(len(y)):
        lo = max(0, i - k + 1)
        out[i] = (c[i + 1] - c[lo]) / (i + 1 - lo)
    return out


def plot_run(history: List[Dict], path: str, title: str = "") -> None:
    plt = _plt()
    rl = [h for h in history if h["step"] > 0]
    ev = [h for h in history if "eval_acc" in h]
    panels = [("reward_mean", "train reward (smoothed)"), ("eval_acc", "held-out accuracy"), ("lam", "lam"),
              ("entropy", "entropy"), ("loss", "loss"), ("weight_mean", "mean token weight g")]
    fig, axes = plt.subplots(2, 3, figsize=(13, 6.5))
    for ax, (key, name) in zip(axes.flat, panels):
        src = ev if key == "eval_acc" else rl
        pts = [(h["step"], h[key]) for h in src if key in h and h[key] is not None]
        if pts:
            x, y = zip(*pts)
            ax.plot(x, _smooth(y) if key == "reward_mean" else y, marker="o" if key == "eval_acc" else None, ms=3,
                    label="no hint (student)" if key == "eval_acc" else None)
        if key == "eval_acc":
            pts = [(h["step"], h["hint_eval_acc"]) for h in ev if "hint_eval_acc" in h]
            if pts:
                x, y = zip(*pts)
                ax.plot(x, y, marker="x", ms=3, ls="--", label="answer in prompt (teacher format)")
                ax.legend(fontsize=7)
        ax.set_title(name)
        ax.set_xlabel("RL step")
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_compare(curves: Dict[str, Dict[str, np.ndarray]], path: str, title: str = "") -> None:
    """``curves[method] = {"steps": [S], "acc": [seeds, S], optional "hint": [seeds, S]}``: mean line, +-1 std band
    and min-max band over seeds; a second panel for the accuracy with the answer in the prompt when logged."""
    plt = _plt()
    has_hint = all("hint" in c for c in curves.values())
    fig, axes = plt.subplots(1, 2 if has_hint else 1, figsize=(14 if has_hint else 8, 5), squeeze=False)
    panels = [("acc", "held-out accuracy (student prompt, greedy)")]
    if has_hint:
        panels.append(("hint", "held-out accuracy with the answer in the prompt (teacher view)"))
    for ax, (key, name) in zip(axes[0], panels):
        for method, c in curves.items():
            x, acc = np.asarray(c["steps"]), np.asarray(c[key])
            mean, std = acc.mean(0), acc.std(0)
            line, = ax.plot(x, mean, marker="o", ms=3, label=f"{method} (n={acc.shape[0]})")
            ax.fill_between(x, acc.min(0), acc.max(0), color=line.get_color(), alpha=0.10)
            ax.fill_between(x, mean - std, mean + std, color=line.get_color(), alpha=0.20)
        ax.set_xlabel("RL step")
        ax.set_ylabel("accuracy")
        ax.set_title(name, fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title or "mean over seeds, +-1 std (dark band) and min-max (light band)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
