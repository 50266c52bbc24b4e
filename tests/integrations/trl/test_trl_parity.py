"""With rlsd_lam=0 RLSDGRPOTrainer's loss and gradients are TRL's own GRPOTrainer's, on the same prepared batch."""
import copy

import pytest

pytest.importorskip("trl")

import torch  # noqa: E402
from trl import GRPOConfig, GRPOTrainer  # noqa: E402

from rlsd_kernels.integrations.trl import RLSDGRPOConfig, RLSDGRPOTrainer  # noqa: E402
from tiny_trl import char_tokenizer, qa_dataset, tiny_qwen2, vowel_reward  # noqa: E402

TEMPLATE = "{prompt}\nReference answer: {answer}\n"
ACCUM = 2  # TRL divides by the gradient-accumulation steps itself; both trainers are told the same


def _trainer(cls, config_cls, model, tok, tmp_path, **kwargs):
    args = config_cls(output_dir=str(tmp_path), use_cpu=True, bf16=False, report_to=[], seed=0,
                      per_device_train_batch_size=8, num_generations=4, max_completion_length=8,
                      epsilon_high=0.28, **kwargs)
    trainer = cls(model=model, reward_funcs=vowel_reward, args=args, train_dataset=qa_dataset(),
                  processing_class=tok)
    trainer.current_gradient_accumulation_steps = ACCUM
    trainer.model.train()
    return trainer


def _loss_and_grads(trainer, batch):
    trainer.model.zero_grad(set_to_none=True)
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    grads = torch.cat([p.grad.reshape(-1) for p in trainer.model.parameters() if p.grad is not None])
    return loss.detach(), grads


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-30))


def assert_parity(ours, theirs, batch):
    """Our trainer's loss and gradients equal TRL's on the same batch, within 1e-6 relative (and are not trivial)."""
    loss_ours, grads_ours = _loss_and_grads(ours, batch)
    loss_trl, grads_trl = _loss_and_grads(theirs, batch)
    assert torch.isfinite(loss_trl) and float(loss_trl) != 0.0
    assert _rel(loss_ours, loss_trl) <= 1e-6, (float(loss_ours), float(loss_trl))
    assert grads_ours.shape == grads_trl.shape and float(grads_trl.abs().max()) > 0
    assert _rel(grads_ours, grads_trl) <= 1e-6


@pytest.mark.parametrize("route", ["linear", "logits"])
@pytest.mark.parametrize("num_iterations", [1, 2])
@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "dr_grpo", "bnpo", "luspo"])
def test_lam0_matches_trl_loss_and_gradients(tmp_path, loss_type, num_iterations, route):
    _check_parity(tmp_path, route, loss_type=loss_type, num_iterations=num_iterations)


@pytest.mark.parametrize("route", ["linear", "logits"])
def test_lam0_matches_trl_with_two_sided_clip_delta(tmp_path, route):
    # TRL's `delta` caps the unclipped ratio: the op's dual clip for negative advantages
    _check_parity(tmp_path, route, loss_type="dapo", num_iterations=2, delta=1.05 + 0.28)


def _check_parity(tmp_path, route, **common):
    tok = char_tokenizer()
    model = tiny_qwen2(tok)
    num_iterations = common["num_iterations"]
    ours = _trainer(RLSDGRPOTrainer, RLSDGRPOConfig, copy.deepcopy(model), tok, tmp_path / "ours",
                    teacher_prompt_template=TEMPLATE, rlsd_lam=0.0, rlsd_route=route, **common)
    theirs = _trainer(GRPOTrainer, GRPOConfig, model, tok, tmp_path / "trl", **common)

    rows = [qa_dataset()[0]] * 4 + [qa_dataset()[1]] * 4
    batch = ours._generate_and_score_completions(rows)
    assert batch["teacher_prompt_ids"].shape[0] == 8
    # Make every branch count: advantages of both signs (offset so that the on-policy loss, -mean(A), is not a
    # near-cancelling sum whose float32 rounding would dominate a relative comparison), a shortened row and an empty row (TRL's grpo
    # counts an empty row as 0 in its mean), and with num_iterations=2 old log-probs away from the current ones so
    # that the ratio clip is active on some tokens.
    gen = torch.Generator().manual_seed(1)
    batch["advantages"] = torch.randn(8, generator=gen) + 0.5
    assert (batch["advantages"] < 0).any() and (batch["advantages"] > 0).any()
    batch["completion_mask"] = batch["completion_mask"].clone()
    batch["completion_mask"][0, 3:] = 0
    batch["completion_mask"][5] = 0
    if num_iterations == 2:
        assert "old_per_token_logps" in batch
        batch["old_per_token_logps"] = batch["old_per_token_logps"] + 0.3 * torch.randn(
            batch["old_per_token_logps"].shape, generator=gen)

    assert_parity(ours, theirs, batch)
    if num_iterations == 2:
        assert ours._metrics["train"]["rlsd/pg_clipfrac"][-1] > 0  # the clip branch was exercised
    if "delta" in common:
        assert ours._metrics["train"]["rlsd/pg_clipfrac_lower"][-1] > 0  # and the dual clip
