"""The trainer's settings: :class:`TrainConfig`, their validation, the device / backend decision and the settings
of a resumed run. Everything here runs before a model is built, so a bad flag costs nothing."""
from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from typing import Any, Dict, Iterable, Mapping, Optional

import torch

from ..dispatch import select_backend
from ..hyper import Hyper
from ..loss_terms import KL_TYPES
from ..reference import OPSD_DIVERGENCES

# grpo+opsd: GRPO (lam = 0) plus the distillation term of docs/math.md section 2c (distill_coef > 0).
METHODS = ("grpo", "rlsd", "opsd", "grpo+opsd")
# grpo+opsd's distillation coefficient when --distill-coef is not given (docs/math.md section 2c: OPSD is distill_coef = 1).
GRPO_OPSD_DEFAULT_DISTILL_COEF = 1.0
BACKEND_CHOICES = ("auto", "cpp", "reference", "triton")
DEVICE_CHOICES = ("auto", "cpu", "cuda")
# "sum" needs a constant normaliser (Dr. GRPO) that the trainer does not expose.
AGG_MODES = ("token", "seq")
# Fields that depend on the machine or the operator, not on the math: excluded from resume-equality checks.
TIMING_KEYS = ("tokens_per_s", "step_time_s", "elapsed_s")
# The loss hyper-parameters the trainer passes to the op; their defaults and bounds are Hyper's.
LOSS_FIELDS = ("eps_w", "clip_low", "clip_high", "clip_dual", "loss_type", "loss_agg_mode")


@dataclass
class TrainConfig:
    method: str = "rlsd"
    seed: int = 0
    out: str = "runs/train"
    # task
    task: str = "addition"
    digits: int = 2
    operands: int = 5  # chainsum task: numbers per problem
    eval_size: int = 256
    # model
    model: Optional[str] = None  # local transformers checkpoint; None = tiny Qwen2 built from a config
    hidden: int = 128
    layers: int = 3
    heads: int = 4
    # warm start (supervised, part of the data in the privileged teacher format)
    warm_steps: int = 220
    warm_batch: int = 64
    warm_lr: float = 1e-3
    warm_hint_frac: float = 0.5
    # RL
    steps: int = 400
    prompts_per_step: int = 16
    group_size: int = 8
    temperature: float = 1.0
    eval_temperature: float = 0.0
    lr: float = 1e-4
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    # RLSD (docs/math.md section 2): lam schedule = warm-up 0 -> lam, then linear decay to 0 over lam_decay_steps
    lam: float = 0.5
    lam_warmup_steps: int = 0
    lam_decay_steps: int = 50
    # The op's hyper-parameters stay flat fields (one flag each, plain checkpoint dicts); loss_hyper() bundles them.
    eps_w: float = Hyper.eps_w
    clip_low: float = Hyper.clip_low
    clip_high: float = Hyper.clip_high
    clip_dual: float = Hyper.clip_dual
    loss_type: str = Hyper.loss_type
    loss_agg_mode: str = Hyper.loss_agg_mode
    teacher_sync: int = 10  # 0 = the live student is the teacher
    opsd_divergence: str = "forward_kl"
    # docs/math.md section 2c terms (all off by default). Reference policy of the KL = the warm-start model, frozen.
    kl_coef: float = 0.0
    kl_type: str = "k3"
    entropy_coef: float = 0.0
    distill_coef: Optional[float] = None  # None = GRPO_OPSD_DEFAULT_DISTILL_COEF for grpo+opsd, else 0 (off)
    distill_divergence: str = "forward_kl"
    fused_linear: bool = False  # grpo/rlsd loss from hidden states + LM head (rlsd_linear_loss), no logits
    # operations
    eval_every: int = 20
    ckpt_every: int = 50
    keep_checkpoints: int = 2
    resume: Optional[str] = None
    init_from: Optional[str] = None  # start RL from a warm-start checkpoint (skips the warm start)
    backend: str = "auto"
    device: str = "auto"
    threads: int = 0  # 0 = torch default (all cores)
    progress: bool = True
    plot: bool = True
    save_model: bool = True  # OUT/model: the final policy as a transformers checkpoint (for --model)

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def distill(self) -> float:
        """The distillation coefficient this run uses (``distill_coef`` resolved against the method)."""
        if self.distill_coef is not None:
            return float(self.distill_coef)
        return GRPO_OPSD_DEFAULT_DISTILL_COEF if self.method == "grpo+opsd" else 0.0

    def extra_terms(self) -> Dict[str, Any]:
        """The docs/math.md section 2c keyword arguments of the loss op that are on for this run (empty = plain section 2 loss)."""
        terms: Dict[str, Any] = {}
        if self.kl_coef > 0:
            terms.update(kl_coef=self.kl_coef, kl_type=self.kl_type)
        if self.entropy_coef > 0:
            terms["entropy_coef"] = self.entropy_coef
        if self.distill > 0:
            terms.update(distill_coef=self.distill, distill_divergence=self.distill_divergence)
        return terms

    def loss_hyper(self, lam: Optional[float] = None) -> Hyper:
        """The op's hyper-parameters for this run; ``lam`` is the scheduled value of one step (default: the peak)."""
        return Hyper(lam=self.lam if lam is None else lam, **{name: getattr(self, name) for name in LOSS_FIELDS})


FIELD_NAMES = tuple(f.name for f in dataclasses.fields(TrainConfig))
# Flags that may change when resuming: they do not change the math of the run, so the resume stays exact.
RESUME_OVERRIDABLE = ("steps", "out", "ckpt_every", "keep_checkpoints", "resume", "backend", "device", "threads",
                      "progress", "plot", "save_model")


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _need(cond: bool, name: str, msg: str) -> None:
    if not cond:
        raise ValueError(f"{flag(name)}: {msg}")


def validate(cfg: TrainConfig) -> None:
    """ValueError naming the flag for every bad setting, the device and the backend included, before anything is
    built."""
    _need(cfg.method in METHODS, "method", f"must be one of {METHODS}, got {cfg.method!r}")
    _need(cfg.backend in BACKEND_CHOICES, "backend", f"must be one of {BACKEND_CHOICES}, got {cfg.backend!r}")
    _need(cfg.device in DEVICE_CHOICES, "device", f"must be one of {DEVICE_CHOICES}, got {cfg.device!r}")
    _need(cfg.opsd_divergence in OPSD_DIVERGENCES, "opsd_divergence", f"must be one of {OPSD_DIVERGENCES}")
    _need(cfg.loss_agg_mode in AGG_MODES, "loss_agg_mode", f"must be one of {AGG_MODES}, got {cfg.loss_agg_mode!r}")
    # The op's own validation, one field at a time so that an error names its flag (bounds live in Hyper only).
    for name in ("lam",) + LOSS_FIELDS:
        try:
            Hyper(**{name: getattr(cfg, name)}).validate()
        except ValueError as e:
            raise ValueError(f"{flag(name)}: {e}") from e
    _need(not (cfg.fused_linear and cfg.method == "opsd"), "fused_linear",
          "OPSD needs the full distributions (logits); use --fused-linear with grpo or rlsd")
    _validate_terms(cfg)
    for name in ("steps", "warm_steps", "lam_warmup_steps", "lam_decay_steps", "teacher_sync", "threads"):
        _need(getattr(cfg, name) >= 0, name, f"must be >= 0, got {getattr(cfg, name)}")
    for name in ("prompts_per_step", "warm_batch", "eval_size", "hidden", "layers", "heads", "eval_every",
                 "ckpt_every", "keep_checkpoints"):
        _need(getattr(cfg, name) >= 1, name, f"must be >= 1, got {getattr(cfg, name)}")
    _need(cfg.group_size >= 2, "group_size", f"GRPO needs at least 2 samples per prompt, got {cfg.group_size}")
    _need(cfg.hidden % cfg.heads == 0, "hidden", f"must be divisible by --heads ({cfg.heads})")
    for name in ("lr", "warm_lr", "temperature", "max_grad_norm"):
        v = getattr(cfg, name)
        _need(math.isfinite(v) and v > 0, name, f"must be a positive finite number, got {v}")
    _need(math.isfinite(cfg.eval_temperature) and cfg.eval_temperature >= 0, "eval_temperature", "must be >= 0")
    _need(math.isfinite(cfg.weight_decay) and cfg.weight_decay >= 0, "weight_decay", "must be >= 0")
    _need(0.0 <= cfg.warm_hint_frac <= 1.0, "warm_hint_frac", f"must be in [0, 1], got {cfg.warm_hint_frac}")
    if cfg.model is not None:
        _need(os.path.isdir(cfg.model), "model", f"{cfg.model!r} is not a local checkpoint directory")
    if cfg.resume is not None:
        _need(os.path.exists(cfg.resume), "resume", f"{cfg.resume!r} does not exist")
    elif cfg.init_from is not None:  # a resumed run may keep the init_from of its start: it is not read again
        _need(os.path.exists(cfg.init_from), "init_from", f"{cfg.init_from!r} does not exist")
    choose_backend(cfg, choose_device(cfg))


def _validate_terms(cfg: TrainConfig) -> None:
    """The docs/math.md section 2c flags: bounds, names, and the methods / paths that can carry them."""
    _need(cfg.kl_type in KL_TYPES, "kl_type", f"must be one of {KL_TYPES}, got {cfg.kl_type!r}")
    _need(cfg.distill_divergence in OPSD_DIVERGENCES, "distill_divergence",
          f"must be one of {OPSD_DIVERGENCES}, got {cfg.distill_divergence!r}")
    for name in ("kl_coef", "entropy_coef", "distill_coef"):
        v = getattr(cfg, name)
        _need(v is None or (math.isfinite(v) and v >= 0), name, f"must be a finite number >= 0, got {v}")
    _need(cfg.method != "grpo+opsd" or cfg.distill > 0, "distill_coef",
          "grpo+opsd is GRPO plus the distillation term: it needs --distill-coef > 0")
    for name in ("kl_coef", "entropy_coef", "distill_coef"):
        _need(cfg.method != "opsd" or not getattr(cfg, name), name,
              "--method opsd is the plain distillation loss (opsd_loss); add terms to grpo, rlsd or grpo+opsd")
    _need(not (cfg.fused_linear and cfg.distill > 0 and cfg.teacher_sync > 0), "fused_linear",
          "the distillation term on the fused-linear path reads the teacher's distribution through the student's "
          "LM head: it needs the live student as teacher (--teacher-sync 0)")


def choose_device(cfg: TrainConfig) -> torch.device:
    """``--device auto`` is CUDA when there is one; ``--device cuda`` without one is a ValueError."""
    if cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    _need(cfg.device != "cuda" or torch.cuda.is_available(), "device", "cuda requested but no CUDA device is available")
    return torch.device(cfg.device)


def choose_backend(cfg: TrainConfig, device: torch.device) -> str:
    """The loss backend, from the package's one dispatch point. A forced ``--backend`` that cannot serve ``device``
    is a ValueError naming ``--backend``. Automatic choice never picks the Triton interpreter on CPU (far too slow
    for training), even under TRITON_INTERPRET=1."""
    forced = None if cfg.backend == "auto" else cfg.backend
    return select_backend(device, forced=forced, source="--backend", interpreter_ok=False)


def lam_at(cfg: TrainConfig, step: int) -> float:
    """lam for RL step ``step`` (1-based): linear warm-up to ``lam``, then linear decay to 0 (paper schedule)."""
    if cfg.method != "rlsd":  # GRPO and GRPO+OPSD are lam = 0; OPSD has no lam
        return 0.0
    i = step - 1
    if cfg.lam_warmup_steps > 0 and i < cfg.lam_warmup_steps:
        return cfg.lam * (i + 1) / cfg.lam_warmup_steps
    if cfg.lam_decay_steps == 0:
        return cfg.lam
    i -= cfg.lam_warmup_steps
    return max(0.0, cfg.lam * (1.0 - i / cfg.lam_decay_steps))


def given_fields(cfg: TrainConfig) -> set:
    """The fields of ``cfg`` that differ from TrainConfig's defaults: what an API caller evidently set."""
    default = TrainConfig()
    return {name for name in FIELD_NAMES if getattr(cfg, name) != getattr(default, name)}


def resumed_config(saved: Mapping[str, Any], saved_step: int, run_dir: str, cfg: TrainConfig,
                   given: Optional[Iterable[str]] = None) -> TrainConfig:
    """The settings of a run resumed from a checkpoint with config ``saved`` at step ``saved_step``: the
    checkpoint's own (its ``--steps`` included), writing into ``run_dir`` (the run's own folder), except the fields
    named in ``given`` (what the operator set on purpose; None = the fields of ``cfg`` that differ from the
    defaults), whose values come from ``cfg``. Only operational settings may change (the resume stays exact); a
    given setting that shapes the math and differs from the checkpoint's is a ValueError naming its flag, never
    silently ignored."""
    base = TrainConfig(**{k: v for k, v in saved.items() if k in FIELD_NAMES})
    changes: Dict[str, Any] = {"out": run_dir, "resume": cfg.resume}
    for name in sorted(given_fields(cfg) if given is None else set(given)):
        value = getattr(cfg, name)
        if name == "init_from":
            _need(value is None, name, "starts a new run from a warm start; it cannot be combined with --resume")
        elif name in RESUME_OVERRIDABLE:
            changes[name] = value
        elif value != getattr(base, name):
            raise ValueError(f"{flag(name)}: the resumed run has {getattr(base, name)!r}, got {value!r}; a resumed "
                             f"run keeps the settings that shape its math (start a new run to change them)")
    resumed = dataclasses.replace(base, **changes)
    _need(resumed.steps >= saved_step, "steps",
          f"the checkpoint is at step {saved_step}; a resumed run cannot end before it, got {resumed.steps}")
    return resumed
