"""Checkpoint files of a run: RNG state, reading (with a ValueError naming the flag), atomic writing and rotation.

Layout of a run folder ``OUT``: ``OUT/warmstart.pt`` (the state after the warm start) and ``OUT/ckpt/step_*.pt``.
Rotation (``--keep-checkpoints``) only ever deletes checkpoints that the run itself wrote into its own
``OUT/ckpt``: the names are recorded in every checkpoint, so a run resumed in its folder keeps rotating its own
files, while a run copied to another ``--out`` or a new run in a used folder leaves the other files alone.
"""
from __future__ import annotations

import glob
import os
import random
import re
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch

WARMSTART = "warmstart.pt"
CKPT_DIR = "ckpt"


def rng_state(device: torch.device) -> Dict[str, Any]:
    st = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if device.type == "cuda":  # a CPU run never initialises CUDA, even on a GPU machine
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: Dict[str, Any], device: torch.device) -> None:
    random.setstate(st["python"])
    np.random.set_state(st["numpy"])
    torch.set_rng_state(st["torch"])
    if "cuda" in st and device.type == "cuda":
        torch.cuda.set_rng_state_all(st["cuda"])


def _step_of(path: str) -> int:
    m = re.search(r"step_(\d+)\.pt$", path)
    return int(m.group(1)) if m else -1


def step_name(step: int) -> str:
    return f"step_{step:06d}.pt"


def load_checkpoint(path: str, flag: str = "resume") -> Dict[str, Any]:
    """A checkpoint file, or the latest ``step_*.pt`` of a run directory (``warmstart.pt`` if it has none);
    ValueError naming the flag otherwise. ``ck["path"]`` is the file read."""
    name = "--" + flag.replace("_", "-")
    if os.path.isdir(path):
        files = glob.glob(os.path.join(path, "step_*.pt")) + glob.glob(os.path.join(path, CKPT_DIR, "step_*.pt"))
        files += glob.glob(os.path.join(path, WARMSTART))
        if not files:
            raise ValueError(f"{name}: no checkpoint (step_*.pt) in directory {path!r}")
        path = max(files, key=_step_of)
    try:
        ck = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001
        raise ValueError(f"{name}: cannot read checkpoint {path!r}: {e}") from e
    if not isinstance(ck, dict) or "model" not in ck or "config" not in ck:
        raise ValueError(f"{name}: {path!r} is not an rlsd-train checkpoint")
    ck["path"] = path
    return ck


def run_dir_of(checkpoint_path: str) -> str:
    """The run folder a checkpoint file belongs to: ``OUT`` for ``OUT/ckpt/step_*.pt``, else the file's folder
    (``OUT/warmstart.pt``). Taken from where the file is, not from the saved ``--out``, which may be relative to
    another working directory or point at a folder that was moved."""
    folder = os.path.dirname(os.path.abspath(checkpoint_path))
    return os.path.dirname(folder) if os.path.basename(folder) == CKPT_DIR else folder


def same_folder(a: str, b: str) -> bool:
    return os.path.realpath(a) == os.path.realpath(b)


def atomic_save(state: Dict[str, Any], path: str) -> None:
    """Write to a temporary file, then rename: a crash never leaves a truncated checkpoint under the real name."""
    tmp = path + ".tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)


class Rotation:
    """The ``step_*.pt`` names this run wrote into ``out/ckpt`` (oldest first), so that rotation deletes those
    and nothing else."""

    def __init__(self, out: str, keep: int, written: Optional[List[str]] = None):
        self.dir = os.path.join(out, CKPT_DIR)
        self.keep = keep
        # only plain step_*.pt names: a name read back from a checkpoint can never point outside out/ckpt
        self.written: List[str] = [n for n in written or [] if re.fullmatch(r"step_\d+\.pt", n)]

    def add(self, step: int) -> Tuple[str, List[str]]:
        """Record the checkpoint of ``step``; returns its path and the paths of this run's checkpoints that fall
        out of the ``keep`` newest (to delete once the new file is safely written)."""
        name = step_name(step)
        self.written = [n for n in self.written if n != name] + [name]
        stale, self.written = self.written[:-self.keep], self.written[-self.keep:]
        return os.path.join(self.dir, name), [os.path.join(self.dir, n) for n in stale]

    @staticmethod
    def delete(paths: List[str]) -> None:
        for p in paths:
            if os.path.exists(p):
                os.remove(p)
