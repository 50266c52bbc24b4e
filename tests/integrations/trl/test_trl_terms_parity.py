"""TRL's extra loss terms through RLSDGRPOTrainer (rlsd_lam=0) equal TRL's own GRPOTrainer on the same batch:
the KL to the reference model (beta, use_bias_correction_kl=False), the vLLM importance-sampling correction
(truncate modes; the batch's sampler log-probs filled as TRL's vLLM path fills them) and the entropy bonus."""
import copy

import pytest

pytest.importorskip("trl")

import torch  # noqa: E402
from transformers import Qwen2ForCausalLM  # noqa: E402
from trl import GRPOConfig, GRPOTrainer  # noqa: E402

from rlsd_kernels.integrations.trl import K3_UNCLAMPED_BAND, RLSDGRPOConfig, RLSDGRPOTrainer  # noqa: E402
from test_trl_parity import TEMPLATE, _loss_and_grads, _trainer, assert_parity  # noqa: E402
from tiny_trl import char_tokenizer, qa_dataset, tiny_qwen2  # noqa: E402


def _pair(tmp_path, route, **common):
    tok = char_tokenizer()
    # TRL builds its reference model from the policy's path when beta > 0: give the tiny model one
    tiny_qwen2(tok).save_pretrained(tmp_path / "tiny")
    model = Qwen2ForCausalLM.from_pretrained(tmp_path / "tiny").float()
    ours = _trainer(RLSDGRPOTrainer, RLSDGRPOConfig, copy.deepcopy(model), tok, tmp_path / "ours",
                    teacher_prompt_template=TEMPLATE, rlsd_lam=0.0, rlsd_route=route, **common)
    theirs = _trainer(GRPOTrainer, GRPOConfig, model, tok, tmp_path / "trl", **common)
    return ours, theirs


def _batch(trainer, gen, offset=0.5):
    # as in test_trl_parity: advantages of both signs, offset so that the loss is not a near-cancelling sum whose
    # float32 rounding would dominate a relative comparison; a shortened row and an empty row
    rows = [qa_dataset()[0]] * 4 + [qa_dataset()[1]] * 4
    batch = trainer._generate_and_score_completions(rows)
    batch["advantages"] = torch.randn(8, generator=gen) + offset
    assert (batch["advantages"] < 0).any() and (batch["advantages"] > 0).any()
    batch["completion_mask"] = batch["completion_mask"].clone()
    batch["completion_mask"][0, 3:] = 0
    batch["completion_mask"][5] = 0
    return batch


def _current_logps(trainer, batch):
    ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], 1)
    mask = torch.cat([batch["prompt_mask"], batch["completion_mask"]], 1)
    with torch.no_grad():
        logps, _, _ = trainer._get_per_token_logps_and_entropies(trainer.model, ids, mask,
                                                                 batch["completion_ids"].size(1))
    return logps


@pytest.mark.parametrize("route", ["linear", "logits"])
@pytest.mark.parametrize("num_iterations", [1, 2])
@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "bnpo"])
def test_kl_to_reference_matches_trl(tmp_path, loss_type, num_iterations, route):
    ours, theirs = _pair(tmp_path, route, loss_type=loss_type, num_iterations=num_iterations, beta=0.1,
                         use_bias_correction_kl=False)
    gen = torch.Generator().manual_seed(3)
    batch = _batch(ours, gen)
    # TRL's own reference pass filled ref_per_token_logps (= the initial policy); move it away from the policy as
    # training would, by log-ratios well inside the band where the op's k3 clamp is inactive
    ref = batch["ref_per_token_logps"] + 0.5 * torch.randn(batch["ref_per_token_logps"].shape, generator=gen)
    batch["ref_per_token_logps"] = ref
    r = ref - _current_logps(ours, batch)
    assert float(r.min()) > K3_UNCLAMPED_BAND[0] and float(r.max()) < K3_UNCLAMPED_BAND[1]
    if num_iterations == 2:
        batch["old_per_token_logps"] = batch["old_per_token_logps"] + 0.3 * torch.randn(
            batch["old_per_token_logps"].shape, generator=gen)
    assert_parity(ours, theirs, batch)
    kl_ours, kl_trl = ours._metrics["train"]["kl"][-1], theirs._metrics["train"]["kl"][-1]
    assert kl_trl > 0 and abs(kl_ours - kl_trl) <= 1e-6 * kl_trl
    assert ours._metrics["train"]["rlsd/kl_clamped_frac"][-1] == 0.0


def test_kl_differs_from_trl_only_where_the_clamp_is_active(tmp_path):
    # the documented limit: one token whose reference log-prob is 4 nats above the policy's (outside the band)
    ours, theirs = _pair(tmp_path, "logits", loss_type="bnpo", beta=0.1, use_bias_correction_kl=False)
    batch = _batch(ours, torch.Generator().manual_seed(4))
    batch["ref_per_token_logps"] = _current_logps(ours, batch).clone()
    batch["ref_per_token_logps"][1, 1] += 4.0
    loss_ours, _ = _loss_and_grads(ours, batch)
    loss_trl, _ = _loss_and_grads(theirs, batch)
    tokens = float(batch["completion_mask"].sum())
    k3 = torch.tensor(4.0).exp() - 4.0 - 1.0  # TRL's unclamped value on that token; the op's is 10
    assert abs(float(loss_trl - loss_ours) - 0.1 * float(k3 - 10.0) / tokens / 2) <= 1e-5  # /2: ACCUM
    assert ours._metrics["train"]["rlsd/kl_clamped_frac"][-1] == pytest.approx(1.0 / tokens)


def _vllm_is(trainer, mode, cap):
    # what GRPOTrainer(use_vllm=True, vllm_importance_sampling_correction=True) sets from its config
    trainer.use_vllm, trainer.vllm_importance_sampling_correction = True, True
    trainer.vllm_importance_sampling_mode = mode
    trainer.vllm_importance_sampling_clip_max, trainer.vllm_importance_sampling_clip_min = cap, None


@pytest.mark.parametrize("route", ["linear", "logits"])
@pytest.mark.parametrize("mode,cap", [("token_truncate", 1.2), ("sequence_truncate", 1.5)])
@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "dr_grpo"])
def test_vllm_importance_sampling_matches_trl(tmp_path, loss_type, mode, cap, route):
    ours, theirs = _pair(tmp_path, route, loss_type=loss_type, num_iterations=1, beta=0.05,
                         use_bias_correction_kl=False)
    gen = torch.Generator().manual_seed(5)
    # generated by the model itself, only the loss sees the vLLM settings; the IS weights (most below 1 with a
    # token cap of 1.2) shrink the loss, hence a larger advantage offset than elsewhere
    batch = _batch(ours, gen, offset=1.0)
    for trainer in (ours, theirs):
        _vllm_is(trainer, mode, cap)
    # TRL's vLLM path: old log-probs from the trainer's model (here drifted a little, as after an optimizer step of
    # the same generation batch), the sampler's own log-probs (one unavailable: NaN) and the ratio computed from them
    mask = batch["completion_mask"]
    old = _current_logps(ours, batch) + 0.05 * torch.randn(mask.shape, generator=gen)
    sampled = old + 0.3 * torch.randn(mask.shape, generator=gen)
    sampled[2, 1] = float("nan")
    diff = torch.nan_to_num((old - sampled) * mask, nan=0.0)  # trl grpo_trainer.py, _generate_and_score_completions
    if mode.startswith("sequence"):
        diff = diff.sum(-1, keepdim=True)
    # a reference away from the policy, so that a KL term the IS weight must NOT multiply is on too
    batch["ref_per_token_logps"] = old + 0.3 * torch.randn(mask.shape, generator=gen)
    batch.update(old_per_token_logps=old, sampling_per_token_logps=sampled,
                 importance_sampling_ratio=torch.clamp(torch.exp(diff), max=cap))
    assert (torch.exp(diff) > cap).any() and (torch.exp(diff) < cap).any()  # the truncation acts on some tokens
    assert_parity(ours, theirs, batch)
    assert ours._metrics["train"]["rlsd/rollout_is_clipfrac"][-1] > 0 and ours._metrics["train"]["kl"][-1] > 0


@pytest.mark.parametrize("route", ["linear", "logits"])
@pytest.mark.parametrize("loss_type", ["dapo", "bnpo", "dr_grpo", "luspo"])
def test_entropy_bonus_matches_trl(tmp_path, loss_type, route):
    ours, theirs = _pair(tmp_path, route, loss_type=loss_type, num_iterations=2, entropy_coef=0.05)
    gen = torch.Generator().manual_seed(6)
    batch = _batch(ours, gen)
    batch["old_per_token_logps"] = batch["old_per_token_logps"] + 0.3 * torch.randn(
        batch["old_per_token_logps"].shape, generator=gen)
    assert_parity(ours, theirs, batch)
    for name in ("policy_loss", "entropy_coef", "entropy"):
        a, b = ours._metrics["train"][name][-1], theirs._metrics["train"][name][-1]
        assert abs(a - b) <= 1e-6 * abs(b), name
