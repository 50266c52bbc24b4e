"""``rlsd-train``: the reference trainer's command line.

    rlsd-train [flags]                                 one run (no flags: the CPU demo, RLSD on 3-digit addition)
    rlsd-train compare --methods grpo,rlsd,opsd,grpo+opsd --seeds 5 [flags]   methods x seeds, one chart + table
    rlsd-train ablate --seeds 5 --out DIR [flags]      RLSD: lam decay over the run, eps_w 0.5, live teacher
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import typing
from typing import List, Optional

from ..hyper import LOSS_TYPES
from ..loss_terms import KL_TYPES
from ..reference import OPSD_DIVERGENCES
from .config import AGG_MODES, BACKEND_CHOICES, DEVICE_CHOICES, METHODS, TrainConfig, validate
from .tasks import TASKS

PRESETS = {
    "default": {},
    # a seconds-long run for smoke tests
    "tiny": dict(digits=1, eval_size=32, hidden=32, layers=1, heads=2, warm_steps=30, warm_batch=16, steps=4,
                 prompts_per_step=4, group_size=4, eval_every=2, ckpt_every=2),
}

HELP = {
    "method": "rlsd (GRPO direction, teacher-weighted magnitude), grpo (lam = 0, no teacher), opsd (per-token "
              "divergence to the teacher, no reward) or grpo+opsd (GRPO plus --distill-coef x that divergence)",
    "seed": "seed of model init, data and sampling",
    "out": "output directory (metrics.jsonl, curves.png, ckpt/)",
    "task": "built-in verifiable task: addition ('47+05=' -> '52') or chainsum (running partial sums, "
            "'3+7+2+9+4=' -> '10,12,21,25')",
    "digits": "operand digits (addition, chainsum)",
    "operands": "numbers per problem of the chainsum task",
    "eval_size": "held-out eval problems",
    "model": "local transformers causal-LM checkpoint directory",
    "hidden": "hidden size of the built-in model",
    "layers": "layers of the built-in model",
    "heads": "attention heads of the built-in model",
    "warm_steps": "supervised warm-start steps (0 = none)",
    "warm_batch": "warm-start batch size",
    "warm_lr": "warm-start peak learning rate",
    "warm_hint_frac": "fraction of warm-start examples shown in the privileged format (answer in the prompt)",
    "steps": "RL steps (one optimizer step per rollout batch)",
    "prompts_per_step": "prompts per RL step",
    "group_size": "sampled completions per prompt (G)",
    "temperature": "rollout sampling temperature",
    "eval_temperature": "eval sampling temperature (0 = greedy)",
    "lr": "RL learning rate (AdamW)",
    "weight_decay": "AdamW weight decay",
    "max_grad_norm": "gradient clipping norm",
    "lam": "RLSD lam (peak of the schedule)",
    "lam_warmup_steps": "linear warm-up steps of lam (0 = start at --lam)",
    "lam_decay_steps": "steps of the linear decay of lam to 0 (0 = constant lam)",
    "eps_w": "evidence-weight clip: w in [1 - eps_w, 1 + eps_w]",
    "clip_low": "PPO clip (lower)",
    "clip_high": "PPO clip (upper, DAPO clip-higher)",
    "clip_dual": "dual-clip constant",
    "loss_type": "policy loss",
    "loss_agg_mode": "loss aggregation over tokens",
    "teacher_sync": "teacher = copy of the student synced every N steps (0 = the live student)",
    "opsd_divergence": "OPSD divergence",
    "kl_coef": "KL penalty to the reference policy (the warm-start model, frozen); 0 = off",
    "kl_type": "KL estimator (verl's k1 / k2 / k3 = low_var_kl)",
    "entropy_coef": "entropy bonus coefficient; 0 = off",
    "distill_coef": "on-policy distillation term (divergence to the hinted teacher) added to grpo / rlsd; "
                    "grpo+opsd needs it > 0",
    "distill_divergence": "divergence of the distillation term",
    "fused_linear": "grpo/rlsd: compute the loss from hidden states + LM head (rlsd_linear_loss), no logits",
    "eval_every": "evaluate the held-out split every N steps",
    "ckpt_every": "checkpoint every N steps",
    "keep_checkpoints": "checkpoints kept in OUT/ckpt (only this run's own are ever deleted)",
    "resume": "continue a run exactly from a checkpoint file or run directory: it keeps the run's settings, "
              "folder and --steps unless flags say otherwise (only operational ones such as --steps, --out, "
              "--device may change; a different --out continues in a copy there)",
    "init_from": "start RL from this warm-start checkpoint (skip the warm start)",
    "backend": "loss backend; auto = triton on CUDA, else cpp if it builds, else reference (the Triton interpreter "
               "only when forced)",
    "device": "auto = cuda if available, else cpu",
    "threads": "torch CPU threads (0 = torch default, all cores)",
    "progress": "tqdm progress bar",
    "plot": "write OUT/curves.png",
    "save_model": "save the final policy + tokenizer to OUT/model (loadable with --model)",
}

# What "(default: ...)" shows where the field's value alone would not say it.
DEFAULT_SHOWN = {"distill_coef": "1.0 for grpo+opsd, else 0 (off)", "model": "a tiny Qwen2 built from a config, with a character tokenizer", "resume": "a new run",
                 "init_from": "warm start from scratch"}

CHOICES = {"method": METHODS, "backend": BACKEND_CHOICES, "device": DEVICE_CHOICES, "loss_type": LOSS_TYPES,
           "loss_agg_mode": AGG_MODES, "opsd_divergence": OPSD_DIVERGENCES,
           "kl_type": KL_TYPES, "distill_divergence": OPSD_DIVERGENCES, "task": tuple(TASKS)}


def _add_config_flags(p: argparse.ArgumentParser, skip=()) -> None:
    p.add_argument("--preset", choices=sorted(PRESETS), default="default",
                   help="named base settings that flags override (default: %(default)s)")
    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        if f.name in skip:
            continue
        flag = "--" + f.name.replace("_", "-")
        typ = hints[f.name]
        # default=SUPPRESS: a flag the operator did not give is absent from the namespace, so `_config` knows which
        # settings were given on purpose (what --resume needs); the help states the default itself, once.
        # argparse's %-formatting of help strings needs literal % doubled.
        shown = str(DEFAULT_SHOWN.get(f.name, f.default)).replace("%", "%%")
        kw = dict(dest=f.name, default=argparse.SUPPRESS, help=f"{HELP[f.name]} (default: {shown})")
        if typ is bool:
            p.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
            continue
        base = typ
        if typing.get_origin(typ) is typing.Union:
            base = [a for a in typing.get_args(typ) if a is not type(None)][0]
        choices = CHOICES.get(f.name)
        if choices:
            p.add_argument(flag, type=base, choices=choices, **kw)
        else:
            p.add_argument(flag, type=base, metavar=f.name.upper(), **kw)


def _config_values(args: argparse.Namespace, skip=()) -> dict:
    """The settings the operator gave: the preset's, overridden by the flags on the command line."""
    values = dict(PRESETS[args.preset])
    for f in dataclasses.fields(TrainConfig):
        if f.name not in skip and hasattr(args, f.name):
            values[f.name] = getattr(args, f.name)
    return values


def _config(args: argparse.Namespace, skip=()) -> TrainConfig:
    return TrainConfig(**_config_values(args, skip))


def train_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rlsd-train", description="Reference RLSD / GRPO / OPSD trainer. "
                                "`rlsd-train compare -h` for the multi-method comparison.")
    _add_config_flags(p)
    return p


def compare_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rlsd-train compare", description="Run several methods x seeds from a shared "
                                "warm start per seed; plot mean and spread of held-out accuracy; write a table.")
    p.add_argument("--methods", default="grpo,rlsd,opsd",
                   help="comma-separated subset of " + ",".join(METHODS) + " (default: %(default)s)")
    p.add_argument("--seeds", type=int, default=3, help="number of seeds (0..N-1) (default: %(default)s)")
    p.add_argument("--jobs", type=int, default=1, help="runs in parallel (processes) (default: %(default)s)")
    p.add_argument("--out", default="runs/compare", help="output directory (default: %(default)s)")
    _add_config_flags(p, skip=("method", "seed", "out", "resume", "init_from"))
    return p


def ablate_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rlsd-train ablate", description="RLSD with the given settings and one change "
                                "each: lam decaying over the whole run (--lam-decay-steps = --steps), --eps-w 0.5, "
                                "the live policy as the teacher (--teacher-sync 0); same seeds, same warm starts. "
                                "Point --out at a `compare` folder made with the same flags to reuse its warm "
                                "starts and rlsd runs.")
    p.add_argument("--seeds", type=int, default=3, help="number of seeds (0..N-1) (default: %(default)s)")
    p.add_argument("--jobs", type=int, default=1, help="runs in parallel (processes) (default: %(default)s)")
    p.add_argument("--out", default="runs/compare", help="output directory (default: %(default)s)")
    _add_config_flags(p, skip=("method", "seed", "out", "resume", "init_from"))
    return p


def _grid_args(parser, argv):
    args = parser.parse_args(argv)
    if args.seeds < 1:
        parser.error(f"--seeds must be >= 1, got {args.seeds}")
    if args.jobs < 1:
        parser.error(f"--jobs must be >= 1, got {args.jobs}")
    return args


def _parse_or_exit(parser, fn):
    try:
        return fn()
    except ValueError as e:
        parser.error(str(e))


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] == "compare":
        parser = compare_parser()
        args = _grid_args(parser, argv[1:])
        from .compare import compare, parse_methods

        methods = _parse_or_exit(parser, lambda: parse_methods(args.methods))
        base = _parse_or_exit(parser, lambda: _checked(_config(args, skip=("method", "seed", "out")), compare=True))
        for m in methods:  # every method's own checks (e.g. grpo+opsd needs a distillation coefficient > 0)
            _parse_or_exit(parser, lambda: validate(dataclasses.replace(base, method=m)))
        _parse_or_exit(parser, lambda: compare(methods, args.seeds, args.out, base, jobs=args.jobs))
        return 0
    if argv and argv[0] == "ablate":
        parser = ablate_parser()
        args = _grid_args(parser, argv[1:])
        from .compare import ablate

        base = _parse_or_exit(parser, lambda: _checked(dataclasses.replace(
            _config(args, skip=("method", "seed", "out")), method="rlsd")))
        _parse_or_exit(parser, lambda: ablate(args.seeds, args.out, base, jobs=args.jobs))
        return 0
    if argv and argv[0] == "train":
        argv = argv[1:]
    parser = train_parser()
    args = parser.parse_args(argv)
    from .trainer import Trainer

    values = _config_values(args)
    # `given`: with --resume only these settings differ from the resumed run's own (its folder and --steps included)
    trainer = _parse_or_exit(parser, lambda: Trainer(TrainConfig(**values), given=set(values)))
    _parse_or_exit(parser, lambda: trainer.run())
    return 0


def _checked(cfg: TrainConfig, compare: bool = False) -> TrainConfig:
    validate(cfg)
    return cfg


if __name__ == "__main__":
    sys.exit(main())
