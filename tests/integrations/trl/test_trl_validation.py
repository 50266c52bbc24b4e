"""RLSDGRPOConfig / RLSDGRPOTrainer refuse bad values and the TRL options they cannot honour, naming the field."""
import pytest

pytest.importorskip("trl")

import torch  # noqa: E402

from rlsd_kernels.integrations.trl import RLSDGRPOConfig, RLSDGRPOTrainer, rlsd_lam_at  # noqa: E402
from tiny_trl import char_tokenizer, qa_dataset, tiny_qwen2, vowel_reward  # noqa: E402

TEMPLATE = "{prompt}\nReference answer: {answer}\n"


def _config(tmp_path, **kwargs):
    base = dict(output_dir=str(tmp_path), use_cpu=True, bf16=False, report_to=[], per_device_train_batch_size=4,
                num_generations=4, max_completion_length=4, teacher_prompt_template=TEMPLATE)
    return RLSDGRPOConfig(**{**base, **kwargs})


def _trainer(args):
    tok = char_tokenizer()
    return RLSDGRPOTrainer(model=tiny_qwen2(tok), reward_funcs=vowel_reward, args=args, train_dataset=qa_dataset(),
                           processing_class=tok)


@pytest.mark.parametrize("field,value", [
    ("rlsd_lam", 1.5), ("rlsd_lam", -0.1), ("rlsd_eps_w", 1.0), ("rlsd_lam_decay_steps", -1),
    ("rlsd_lam_decay_steps", 2.5), ("teacher_sync_steps", -3), ("rlsd_route", "dense"),
    ("teacher_prompt_template", ""),
])
def test_config_rejects_bad_values(tmp_path, field, value):
    with pytest.raises(ValueError, match=field):
        _config(tmp_path, **{field: value})


def test_config_requires_a_template_when_the_weight_is_on(tmp_path):
    with pytest.raises(ValueError, match="teacher_prompt_template"):
        _config(tmp_path, teacher_prompt_template=None, rlsd_lam=0.5)
    assert _config(tmp_path, teacher_prompt_template=None, rlsd_lam=0.0).rlsd_lam == 0.0


def test_lam_schedule():
    args = RLSDGRPOConfig.__new__(RLSDGRPOConfig)  # only the two schedule fields are read
    args.rlsd_lam, args.rlsd_lam_decay_steps = 0.5, 50
    assert [rlsd_lam_at(args, s) for s in (0, 25, 50, 80)] == [0.5, 0.25, 0.0, 0.0]
    args.rlsd_lam_decay_steps = 0
    assert rlsd_lam_at(args, 1000) == 0.5


@pytest.mark.parametrize("field,kwargs", [
    ("loss_type", dict(loss_type="cispo")),
    ("importance_sampling_level", dict(importance_sampling_level="sequence")),
    ("use_bias_correction_kl", dict(beta=0.01)),  # TRL's default use_bias_correction_kl=True
    ("beta", dict(beta=-0.01, use_bias_correction_kl=False)),
    ("top_entropy_quantile", dict(top_entropy_quantile=0.5)),
    ("off_policy_mask_threshold", dict(off_policy_mask_threshold=0.5)),
    ("entropy_coef", dict(entropy_coef=0.01, loss_type="grpo")),
    ("entropy_coef", dict(entropy_coef=-0.01, loss_type="dapo")),
    ("use_adaptive_entropy", dict(use_adaptive_entropy=True, loss_type="dapo")),
    ("delta", dict(delta=1.1)),
    # TRL's default mode is sequence_mask
    ("vllm_importance_sampling_mode", dict(use_vllm=True, vllm_importance_sampling_correction=True)),
    ("vllm_importance_sampling_mode", dict(use_vllm=True, vllm_importance_sampling_mode="token_mask")),
    ("vllm_importance_sampling_clip_min", dict(use_vllm=True, vllm_importance_sampling_mode="token_truncate",
                                               vllm_importance_sampling_clip_min=0.5)),
    ("vllm_importance_sampling_clip_max", dict(use_vllm=True, vllm_importance_sampling_mode="sequence_truncate",
                                               vllm_importance_sampling_clip_max=1.0)),
])
def test_trainer_refuses_what_the_fused_op_cannot_honour(tmp_path, field, kwargs):
    with pytest.raises(ValueError, match=field):
        _trainer(_config(tmp_path, **kwargs))


def test_trainer_requires_an_rlsd_config(tmp_path):
    from trl import GRPOConfig
    with pytest.raises(ValueError, match="RLSDGRPOConfig"):
        _trainer(GRPOConfig(output_dir=str(tmp_path), use_cpu=True, report_to=[]))


def test_missing_template_column_is_named(tmp_path):
    trainer = _trainer(_config(tmp_path, teacher_prompt_template="{prompt} hint: {solution}"))
    with pytest.raises(ValueError, match="solution"):
        trainer._teacher_prompts([qa_dataset()[0]])


def test_frozen_teacher_resyncs_every_k_steps(tmp_path):
    trainer = _trainer(_config(tmp_path, teacher_sync_steps=2))
    live = trainer.model
    copy = trainer._teacher_model()
    assert copy is not live and all(torch.equal(a, b) for a, b in zip(copy.parameters(), live.parameters()))
    with torch.no_grad():
        next(live.parameters()).add_(1.0)
    trainer.state.global_step = 1
    assert not torch.equal(next(trainer._teacher_model().parameters()), next(live.parameters()))  # still frozen
    trainer.state.global_step = 2
    assert torch.equal(next(trainer._teacher_model().parameters()), next(live.parameters()))  # re-synced
    assert not any(p.requires_grad for p in trainer._teacher_model().parameters())


@pytest.mark.parametrize("kwargs", [
    dict(beta=0.04, use_bias_correction_kl=False),
    dict(entropy_coef=0.01, loss_type="bnpo"),
    dict(entropy_coef=0.01, loss_type="dapo", beta=0.04, use_bias_correction_kl=False),
])
def test_trainer_accepts_the_terms_with_an_exact_equivalent(tmp_path, kwargs):
    # beta > 0 builds TRL's reference model from the policy's path
    tok = char_tokenizer()
    tiny_qwen2(tok).save_pretrained(tmp_path / "tiny")
    args = _config(tmp_path, **kwargs)
    trainer = RLSDGRPOTrainer(model=str(tmp_path / "tiny"), reward_funcs=vowel_reward, args=args,
                              train_dataset=qa_dataset(), processing_class=tok)
    assert trainer.beta == kwargs.get("beta", 0.0)
    assert trainer.entropy_coef == kwargs.get("entropy_coef", 0.0)


@pytest.mark.parametrize("mode", ["token_truncate", "sequence_truncate"])
def test_truncated_vllm_importance_sampling_passes_the_checks(tmp_path, mode):
    # the whole trainer would start vLLM: run the option checks alone (they run before TRL's own init), on the
    # config the user would pass
    from rlsd_kernels.integrations.trl import _refuse_unsupported
    args = _config(tmp_path, use_vllm=True, vllm_importance_sampling_mode=mode, loss_type="dapo",
                   beta=0.04, use_bias_correction_kl=False, entropy_coef=0.01)
    assert args.vllm_importance_sampling_correction and args.vllm_importance_sampling_clip_max == 3.0
    assert _refuse_unsupported(args) is None
