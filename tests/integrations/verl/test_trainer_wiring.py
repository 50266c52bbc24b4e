"""How the plugin reaches verl's trainer: the mixin's hooks, the trainer / task-runner classes, the entry point."""
import subprocess
import sys

import pytest

pytest.importorskip("verl")

from omegaconf import OmegaConf  # noqa: E402
from test_teacher_batch import ANSWERS, PROMPTS, RESPONSES, TEMPLATE, ScoringWorkerGroup, rollout_batch, \
    tiny_tokenizer  # noqa: E402

from rlsd_kernels.integrations import verl as rlsd_verl  # noqa: E402


class FakeTrainer:
    """The two RayPPOTrainer methods the mixin wraps, recording what reaches them."""

    def __init__(self, config, tokenizer):
        self.config, self.tokenizer = config, tokenizer
        self.updated = []

    def init_workers(self):
        self.actor_rollout_wg = ScoringWorkerGroup()
        self.actor_rollout_wg.set_loss_fn = lambda fn: setattr(self.actor_rollout_wg, "loss_fn", fn)

    def _update_actor(self, batch):
        self.updated.append(batch)
        return batch


class RLSDFake(rlsd_verl.RLSDTrainerMixin, FakeTrainer):
    pass


def config(**rlsd):
    actor = {"loss_agg_mode": "seq-mean-token-mean", "clip_ratio": 0.2, "clip_ratio_high": 0.28,
             "policy_loss": {"loss_mode": "vanilla"}}
    return OmegaConf.create({"actor_rollout_ref": {"actor": actor}, "rlsd": rlsd})


def test_mixin_installs_loss_fn_and_adds_teacher_log_probs():
    tok = tiny_tokenizer()
    trainer = RLSDFake(config(teacher_prompt_template=TEMPLATE, lam=0.7, eps_w=0.1), tok)
    trainer.init_workers()
    fn = trainer.actor_rollout_wg.loss_fn
    assert isinstance(fn, rlsd_verl.RLSDLossFn)
    assert (fn.lam, fn.hyper.eps_w, fn.hyper.clip_low, fn.hyper.clip_high) == (0.7, 0.1, 0.2, 0.28)
    assert fn.loss_agg_mode == "seq-mean-token-mean"
    batch = rollout_batch(tok, PROMPTS, RESPONSES, ANSWERS)
    trainer._update_actor(batch)
    assert trainer.updated == [batch] and rlsd_verl.TEACHER_KEY in batch.batch.keys()
    assert len(trainer.actor_rollout_wg.calls) == 1


def test_mixin_needs_a_template():
    with pytest.raises(ValueError, match="teacher_prompt_template"):
        RLSDFake(config(lam=0.5), tiny_tokenizer()).init_workers()


def test_trainer_and_task_runner_classes():
    from verl.trainer import main_ppo_v0
    from verl.trainer.ppo.ray_trainer import RayPPOTrainer

    cls = rlsd_verl.rlsd_trainer_class()
    assert issubclass(cls, RayPPOTrainer) and cls.__mro__[1] is rlsd_verl.RLSDTrainerMixin
    runner = rlsd_verl._rlsd_task_runner()
    assert issubclass(runner.__ray_actor_class__, main_ppo_v0.TaskRunner.__ray_actor_class__)


def test_main_refuses_the_v1_trainer(monkeypatch):
    from verl.trainer import main_ppo

    cfg = OmegaConf.create({"trainer": {"use_v1": True}, "rlsd": {"teacher_prompt_template": TEMPLATE}})
    monkeypatch.setattr(main_ppo, "main", lambda: main_ppo.run_ppo(cfg, None))
    monkeypatch.setattr(main_ppo, "run_ppo", main_ppo.run_ppo)   # restored after the test
    with pytest.raises(ValueError, match="trainer.use_v1"):
        rlsd_verl.main()


def test_verl_plugins_entry_point_loads_the_module():
    code = "import sys, verl; print('rlsd_kernels.integrations.verl' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "True", out.stderr[-2000:]
