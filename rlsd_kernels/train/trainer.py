"""The reference RLSD / GRPO / OPSD trainer: one optimizer step per rollout batch (docs/math.md sections 2 and 2b).

Settings and their validation live in ``config.py``, checkpoint files in ``checkpoint.py``; this module is the
loop: warm start, rollouts, the loss, evaluation, checkpoints and outputs.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import os
import random
import time
from typing import Any, Dict, Iterable, List, Optional

import numpy as np
import torch

from .. import opsd_loss, rlsd_linear_loss, token_logprobs, token_logprobs_linear
from ..dispatch import force_backend
from ..hf import causal_lm_hidden, lm_head_of
from .checkpoint import (WARMSTART, Rotation, atomic_save, load_checkpoint, rng_state, run_dir_of, same_folder,
                         set_rng_state)
from .config import (BACKEND_CHOICES, METHODS, RESUME_OVERRIDABLE, TIMING_KEYS, TrainConfig, choose_backend,
                     choose_device, lam_at, resumed_config, validate)
from .distributed import from_launcher
from .losses import policy_loss
from .model import Forward, TokenizerAdapter, build_char_tokenizer, build_tiny_model, load_pretrained
from .rollout import generate, pack
from .tasks import Task, make_task

# Re-exported: these names were importable from this module before config.py / checkpoint.py existed.
__all__ = ["Trainer", "train", "TrainConfig", "validate", "lam_at", "load_checkpoint", "METHODS", "BACKEND_CHOICES",
           "TIMING_KEYS", "RESUME_OVERRIDABLE"]


class Trainer:
    """One run. ``cfg.resume`` continues a run exactly: its settings, folder and ``--steps`` are the checkpoint's,
    except the fields named in ``given`` (the flags the operator set; None = the fields of ``cfg`` that differ
    from TrainConfig's defaults), see :func:`config.resumed_config`. Every bad setting is a ValueError naming its
    flag, raised here before a model is built."""

    def __init__(self, cfg: TrainConfig, given: Optional[Iterable[str]] = None):
        self.resume_ck = None
        inherited_ckpts = None
        if cfg.resume is not None:
            self.resume_ck = load_checkpoint(cfg.resume, "resume")
            run_dir = run_dir_of(self.resume_ck["path"])
            cfg = resumed_config(self.resume_ck["config"], int(self.resume_ck["step"]), run_dir, cfg, given)
            if same_folder(cfg.out, run_dir):  # the same run: it keeps rotating the checkpoints it wrote
                inherited_ckpts = self.resume_ck.get("checkpoints_written")
        validate(cfg)
        self.cfg = cfg
        self.device = choose_device(cfg)
        self.dp = from_launcher(self.device)  # torchrun: data parallel over the ranks (train/distributed.py)
        if self.dp is not None:
            self.dp.check(cfg.prompts_per_step)
            self.device = self.dp.device
            self.cfg = cfg = dataclasses.replace(cfg, out=self.dp.out_dir(cfg.out))
        self.backend = choose_backend(cfg, self.device)
        self.hyper = cfg.loss_hyper()  # the op's hyper-parameters; lam is replaced by its schedule every step
        self.rotation = Rotation(cfg.out, cfg.keep_checkpoints, inherited_ckpts)
        if cfg.threads > 0:
            torch.set_num_threads(cfg.threads)
        self.task: Task = make_task(cfg.task, digits=cfg.digits, operands=cfg.operands,
                                         eval_size=cfg.eval_size)
        self._seed(cfg.seed)
        if cfg.model is not None:
            self.model, self.tok = load_pretrained(cfg.model)
        else:
            hf_tok = build_char_tokenizer(self.task.alphabet)
            self.tok = TokenizerAdapter(hf_tok)
            max_pos = 4 * (len(self.task.privileged_prompt(self.task.eval_problems()[0])) + self.max_new) + 16
            self.model = build_tiny_model(len(hf_tok), cfg.hidden, cfg.layers, cfg.heads, max_pos, self.tok.pad_id,
                                          self.tok.eos_id, hf_tok.bos_token_id)
        self.model.to(self.device).train()
        self.fwd = Forward(self.model)
        self.teacher = None
        self.reference = None  # the frozen warm-start model of --kl-coef
        self.opt = None
        self.step = 0
        self.history: List[Dict[str, Any]] = []
        self.data_rng = random.Random(cfg.seed + 1)

    # -------------------------------------------------------------------------------------------- utilities
    @staticmethod
    def _seed(seed: int) -> None:
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)

    @property
    def max_new(self) -> int:
        return self.task.max_answer_chars + 1

    def _logits(self, model, prompts, responses, valid):
        ids, attn, pos, P = pack(prompts, responses, valid, self.tok.pad_id)
        logits, _ = self.fwd(model, ids, attn, pos)
        R = responses.shape[1]
        return logits[:, P - 1:P - 1 + R]  # strided view: position t predicts token t + 1

    def _hidden(self, model, prompts, responses, valid):
        """Final hidden states at the positions that predict the response (the --fused-linear path)."""
        ids, attn, pos, P = pack(prompts, responses, valid, self.tok.pad_id)
        R = responses.shape[1]
        return causal_lm_hidden(model, ids, attn, position_ids=pos)[:, P - 1:P - 1 + R]

    def _loss_kwargs(self, lam: float) -> Dict[str, Any]:
        """The op's keyword arguments for one step: the run's Hyper with this step's scheduled lam."""
        return dataclasses.asdict(dataclasses.replace(self.hyper, lam=lam))

    def _logits_loss(self, teacher, prompts, priv, resp, valid, labels, adv, lam):
        """GRPO/RLSD/GRPO+OPSD (rlsd_loss) or OPSD (opsd_loss) on the strided logits of the response positions."""
        cfg = self.cfg
        t_logits = None
        if teacher is not None:
            with torch.no_grad():
                t_logits = self._logits(teacher, priv, resp, valid)
        s_logits = self._logits(self.model, prompts, resp, valid)
        if cfg.method == "opsd":
            out = opsd_loss(s_logits, t_logits, labels, valid, divergence=cfg.opsd_divergence,
                            loss_agg_mode=self.hyper.loss_agg_mode, return_entropy=True)
            return out.loss, out.entropy, {"opsd_div": out.metrics["distill_mean"]}
        ref_logp = None
        if self.reference is not None:
            with torch.no_grad():
                ref_logp = token_logprobs(self._logits(self.reference, prompts, resp, valid), labels)
        out = policy_loss(s_logits, t_logits, labels, adv, valid, self._loss_kwargs(lam), cfg.extra_terms(), ref_logp)
        return out.loss, out.entropy, dict(out.metrics)

    def _fused_linear_loss(self, teacher, prompts, priv, resp, valid, labels, adv, lam):
        """GRPO/RLSD from hidden states and the LM-head weight: the logits are never materialised."""
        t_hidden = t_logp = None
        if teacher is not None:
            with torch.no_grad():
                th = self._hidden(teacher, priv, resp, valid)
                if teacher is self.model:  # the live student: one weight read serves both in the fused pass
                    t_hidden = th
                else:  # a synced copy has its own LM head
                    tw, tb = lm_head_of(teacher)
                    t_logp = token_logprobs_linear(th, tw, labels, tb)
        terms = self.cfg.extra_terms()
        ref_logp = None
        if "kl_coef" in terms:  # the frozen warm-start model, scored through its own LM head
            with torch.no_grad():
                rw, rb = lm_head_of(self.reference)
                ref_logp = token_logprobs_linear(self._hidden(self.reference, prompts, resp, valid), rw, labels, rb)
        weight, bias = lm_head_of(self.model)
        hidden = self._hidden(self.model, prompts, resp, valid)
        return rlsd_linear_loss(hidden, weight, labels, adv, mask=valid, teacher_hidden=t_hidden,
                                teacher_logprobs=t_logp, lm_head_bias=bias, return_entropy=True,
                                ref_logprobs=ref_logp, **self._loss_kwargs(lam), **terms)

    def _make_optimizer(self):
        return torch.optim.AdamW(self.model.parameters(), lr=self.cfg.lr, weight_decay=self.cfg.weight_decay)

    def _responses(self, texts: List[str]):
        """Tokenised targets + EOS, right-padded, with their validity mask."""
        seqs = [self.tok.encode(t) + [self.tok.eos_id] for t in texts]
        R = max(len(s) for s in seqs)
        resp = torch.full((len(seqs), R), self.tok.pad_id, dtype=torch.long)
        valid = torch.zeros((len(seqs), R), dtype=torch.bool)
        for i, s in enumerate(seqs):
            resp[i, :len(s)] = torch.as_tensor(s)
            valid[i, :len(s)] = True
        return resp.to(self.device), valid.to(self.device)

    # ------------------------------------------------------------------------------------------- warm start
    def warm_start(self, log=print) -> None:
        cfg = self.cfg
        if cfg.warm_steps == 0:
            return
        opt = torch.optim.AdamW(self.model.parameters(), lr=cfg.warm_lr, weight_decay=0.0)
        rng = random.Random(cfg.seed + 2)
        t0 = time.time()
        for s in range(cfg.warm_steps):
            probs = [self.task.sample_train(rng) for _ in range(cfg.warm_batch)]
            prompts = [self.tok.encode(self.task.privileged_prompt(p) if rng.random() < cfg.warm_hint_frac
                                       else self.task.prompt(p)) for p in probs]
            resp, valid = self._responses([self.task.target(p) for p in probs])
            lr = cfg.warm_lr * min(1.0, (s + 1) / 20)  # short linear warm-up, then constant
            for gr in opt.param_groups:
                gr["lr"] = lr
            logits = self._logits(self.model, prompts, resp, valid)
            labels = torch.where(valid, resp, -100)
            opt.zero_grad(set_to_none=True)
            with force_backend(self.backend):  # spans the backward, which dispatches again (see rl_step)
                logp = token_logprobs(logits, labels)
                loss = -(logp * valid).sum() / valid.sum()
                loss.backward()
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.max_grad_norm)
            opt.step()
        log(f"warm start: {cfg.warm_steps} supervised steps ({cfg.warm_hint_frac:.0%} with the answer in the prompt)"
            f" in {time.time() - t0:.1f}s, final loss {loss.item():.3f}")

    # ------------------------------------------------------------------------------------------------ eval
    @torch.no_grad()
    def evaluate(self, hinted: bool = False, batch: int = 512) -> float:
        probs = self.task.eval_problems()
        correct = 0.0
        for i in range(0, len(probs), batch):
            chunk = probs[i:i + batch]
            prompts = [self.tok.encode(self.task.privileged_prompt(p) if hinted else self.task.prompt(p))
                       for p in chunk]
            # greedy eval does not touch the RNG; sampled eval would, so fork it to keep runs resumable
            with torch.random.fork_rng(devices=[] if self.device.type == "cpu" else [self.device]):
                resp, _ = generate(self.model, self.fwd, prompts, self.max_new, self.tok.eos_id, self.tok.pad_id,
                                   self.cfg.eval_temperature, self.device)
            for p, r in zip(chunk, resp.tolist()):
                correct += self.task.verify(p, self.tok.decode(r))
        return correct / len(probs)

    # -------------------------------------------------------------------------------------------- RL step
    def rl_step(self) -> Dict[str, Any]:
        cfg = self.cfg
        t0 = time.time()
        step = self.step + 1
        lam = lam_at(cfg, step)
        G = cfg.group_size
        probs = [self.task.sample_train(self.data_rng) for _ in range(cfg.prompts_per_step)]
        prompts = [self.tok.encode(self.task.prompt(p)) for p in probs for _ in range(G)]
        resp, valid = generate(self.model, self.fwd, prompts, self.max_new, self.tok.eos_id, self.tok.pad_id,
                               cfg.temperature, self.device)
        texts = [self.tok.decode(r) for r in resp.tolist()]
        rewards = torch.tensor([self.task.verify(probs[i // G], t) for i, t in enumerate(texts)],
                               dtype=torch.float32, device=self.device)
        r = rewards.view(-1, G)
        adv = ((r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True, unbiased=False) + 1e-6)).view(-1)
        labels = torch.where(valid, resp, -100)
        n_tok = int(valid.sum())
        valid_all = valid
        if self.dp is not None:  # this rank scores its own prompts (whole groups); the rollouts are the global batch's
            mine = self.dp.share(len(probs))
            rows = slice(mine.start * G, mine.stop * G)
            probs, prompts, resp, valid, labels, adv = (probs[mine], prompts[rows], resp[rows], valid[rows],
                                                        labels[rows], adv[rows])

        use_teacher = cfg.method == "opsd" or (cfg.method == "rlsd" and lam > 0) or cfg.distill > 0
        teacher = priv = None
        if use_teacher:
            priv = [self.tok.encode(self.task.privileged_prompt(p)) for p in probs for _ in range(G)]
            teacher = self.teacher if self.teacher is not None else self.model
        self.opt.zero_grad(set_to_none=True)
        # The op's backward picks its backend again when autograd runs it: the block must span backward() too,
        # or the gradient would come from the automatic choice (e.g. the Triton interpreter under
        # TRITON_INTERPRET=1) instead of the trainer's backend.
        with force_backend(self.backend):
            if cfg.fused_linear:
                out = self._fused_linear_loss(teacher, prompts, priv, resp, valid, labels, adv, lam)
                loss, ent, rec = out.loss, out.entropy, dict(out.metrics)
            else:
                loss, ent, rec = self._logits_loss(teacher, prompts, priv, resp, valid, labels, adv, lam)
            if self.dp is None:
                loss.backward()
            else:  # scaled so that the ranks' averaged gradients are the single-process loss's gradient
                share = self.dp.loss_share(valid, self.hyper.loss_agg_mode)
                (loss * (share * self.dp.world)).backward()
        if self.dp is not None:
            self.dp.average_gradients(self.model)
            local_tok = float(valid.sum())
            rec = self.dp.weighted_means({**rec, "entropy": float((ent * valid).sum() / valid.sum().clamp(min=1))},
                                         local_tok)
            loss = torch.tensor(self.dp.sum(float(loss.detach()) * float(share)))
        gnorm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.max_grad_norm)
        self.opt.step()
        self.step = step
        if self.teacher is not None and step % cfg.teacher_sync == 0:
            self.teacher.load_state_dict(self.model.state_dict())
        dt = time.time() - t0
        solved = (r.max(1).values > 0).float().mean()
        rec = {"step": step, "reward_mean": float(rewards.mean()), "solve_frac": float(solved), "lam": lam,
               "loss": float(loss.detach()), "entropy": float((ent * valid).sum() / valid.sum()),
               "grad_norm": float(gnorm), "resp_len": n_tok / valid_all.shape[0], **rec,
               "tokens_per_s": n_tok / dt, "step_time_s": dt}
        return rec

    # -------------------------------------------------------------------------------------------- checkpoints
    def state(self) -> Dict[str, Any]:
        return {"model": self.model.state_dict(), "optimizer": None if self.opt is None else self.opt.state_dict(),
                "teacher": None if self.teacher is None else self.teacher.state_dict(),
                "reference": None if self.reference is None else self.reference.state_dict(),
                "rng": rng_state(self.device), "data_rng": self.data_rng.getstate(), "step": self.step,
                "config": self.cfg.to_dict(), "history": list(self.history),
                "checkpoints_written": list(self.rotation.written)}

    def save_checkpoint(self, path: Optional[str] = None) -> str:
        """``path``, or ``OUT/ckpt/step_*.pt`` with rotation of this run's own checkpoints (see checkpoint.py)."""
        if path is not None:
            atomic_save(self.state(), path)
            return path
        path, stale = self.rotation.add(self.step)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        atomic_save(self.state(), path)
        Rotation.delete(stale)  # only once the new checkpoint is safely on disk
        return path

    def _restore(self, ck: Dict[str, Any], full: bool) -> None:
        try:
            self.model.load_state_dict(ck["model"])
        except Exception as e:  # noqa: BLE001
            raise ValueError(f"--{'resume' if full else 'init-from'}: checkpoint {ck.get('path')!r} does not match "
                             f"the model: {e}") from e
        set_rng_state(ck["rng"], self.device)
        self.data_rng.setstate(ck["data_rng"])
        self.step = int(ck["step"]) if full else 0
        self.history = [h for h in ck.get("history", []) if h["step"] <= self.step]
        if full:
            if ck.get("optimizer") is not None:
                self.opt.load_state_dict(ck["optimizer"])
            if self.teacher is not None and ck.get("teacher") is not None:
                self.teacher.load_state_dict(ck["teacher"])
            if self.reference is not None and ck.get("reference") is not None:
                self.reference.load_state_dict(ck["reference"])

    # ------------------------------------------------------------------------------------------------ run
    def _setup_rl(self) -> None:
        self.opt = self._make_optimizer()
        if (self.cfg.method != "grpo" or self.cfg.distill > 0) and self.cfg.teacher_sync > 0:
            self.teacher = self._frozen_copy()
        if self.cfg.kl_coef > 0:  # called right after the warm start / --init-from: the reference policy
            self.reference = self._frozen_copy()

    def _frozen_copy(self):
        copy_ = copy.deepcopy(self.model).eval()
        for p in copy_.parameters():
            p.requires_grad_(False)
        return copy_

    def run(self, log=print) -> Dict[str, Any]:
        cfg = self.cfg
        os.makedirs(cfg.out, exist_ok=True)
        t_start = time.time()
        if self.resume_ck is not None:
            self._setup_rl()
            self._restore(self.resume_ck, full=True)
            log(f"resumed from {self.resume_ck['path']} at step {self.step} of {cfg.steps}; outputs in {cfg.out}")
            if self.step == cfg.steps:
                log("the run already reached its --steps: nothing to train (pass --steps to extend it)")
        else:
            if cfg.init_from is not None:
                ck = load_checkpoint(cfg.init_from, "init_from")
                self._restore(ck, full=False)
                log(f"initialised from {ck['path']} (warm start skipped)")
                if self.history:
                    self.history[0] = {**self.history[0], "lam": lam_at(cfg, 1)}
            else:
                self.warm_start(log)
            self._setup_rl()
            if not self.history:
                acc0 = self.evaluate()
                hint0 = self.evaluate(hinted=True)
                self.history = [{"step": 0, "eval_acc": acc0, "hint_eval_acc": hint0, "lam": lam_at(cfg, 1)}]
                # the warm-start state (reused by `compare` for every method of a seed)
                if cfg.init_from is None:
                    self.save_checkpoint(os.path.join(cfg.out, WARMSTART))
        acc0 = self.history[0]["eval_acc"]
        log(f"post-warm-start held-out accuracy: {acc0:.3f} (with the answer in the prompt: "
            f"{self.history[0].get('hint_eval_acc', float('nan')):.3f}); method={cfg.method} backend={self.backend} "
            f"threads={torch.get_num_threads()}")
        self._write_metrics()
        bar = None
        if cfg.progress and self.step < cfg.steps:
            from tqdm.auto import tqdm

            bar = tqdm(total=cfg.steps, initial=self.step, desc=f"{cfg.method}", dynamic_ncols=True)
        last_acc = [h["eval_acc"] for h in self.history if "eval_acc" in h][-1]
        with open(os.path.join(cfg.out, "metrics.jsonl"), "a") as f:
            while self.step < cfg.steps:
                rec = self.rl_step()
                if self.step % cfg.eval_every == 0 or self.step == cfg.steps:
                    last_acc = rec["eval_acc"] = self.evaluate()
                    rec["hint_eval_acc"] = self.evaluate(hinted=True)  # can the policy still read the hint?
                rec["elapsed_s"] = time.time() - t_start
                self.history.append(rec)
                f.write(json.dumps(rec) + "\n")
                f.flush()
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(reward=f"{rec['reward_mean']:.3f}", acc=f"{last_acc:.3f}", lam=f"{rec['lam']:.2f}",
                                    tok_s=f"{rec['tokens_per_s']:.0f}")
                if self.step % cfg.ckpt_every == 0 or self.step == cfg.steps:
                    self.save_checkpoint()
        if bar is not None:
            bar.close()
        final = [h["eval_acc"] for h in self.history if "eval_acc" in h][-1]
        if cfg.save_model:  # a plain transformers checkpoint: `--model OUT/model` starts from it
            self.model.save_pretrained(os.path.join(cfg.out, "model"))
            self.tok.hf.save_pretrained(os.path.join(cfg.out, "model"))
        if cfg.plot:
            from .plotting import plot_run

            plot_run(self.history, os.path.join(cfg.out, "curves.png"), title=f"{cfg.method} seed {cfg.seed}")
        log(f"held-out accuracy: post-warm-start {acc0:.3f} -> final {final:.3f} after {self.step} RL steps "
            f"({final - acc0:+.3f}); {time.time() - t_start:.0f}s; outputs in {cfg.out}")
        return {"post_warmstart_acc": acc0, "final_acc": final, "history": self.history, "out": cfg.out}

    def _write_metrics(self) -> None:
        with open(os.path.join(self.cfg.out, "metrics.jsonl"), "w") as f:
            for h in self.history:
                f.write(json.dumps(h) + "\n")


def train(cfg: TrainConfig, log=print) -> Dict[str, Any]:
    return Trainer(cfg).run(log)
