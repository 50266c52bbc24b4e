"""RLSDGRPOTrainer with the weight on: its loss is the eager reference's on the same teacher view, and a real
3-step ``trainer.train()`` logs the RLSD metrics with finite losses."""
import math

import pytest

pytest.importorskip("trl")

import torch  # noqa: E402

from rlsd_kernels.integrations.trl import RLSDGRPOConfig, RLSDGRPOTrainer  # noqa: E402
from rlsd_kernels.reference import rlsd_loss_eager  # noqa: E402
from tiny_trl import char_tokenizer, qa_dataset, tiny_qwen2, vowel_reward  # noqa: E402

TEMPLATE = "{prompt}\nReference answer: {answer}\n"


def _trainer(tmp_path, **kwargs):
    tok = char_tokenizer()
    base = dict(output_dir=str(tmp_path), use_cpu=True, bf16=False, report_to=[], seed=0,
                per_device_train_batch_size=8, num_generations=4, max_completion_length=8,
                teacher_prompt_template=TEMPLATE)
    args = RLSDGRPOConfig(**{**base, **kwargs})
    return RLSDGRPOTrainer(model=tiny_qwen2(tok), reward_funcs=vowel_reward, args=args, train_dataset=qa_dataset(),
                           processing_class=tok)


@pytest.mark.parametrize("route,sync", [("linear", 0), ("logits", 0), ("linear", 3), ("logits", 3)])
def test_weighted_loss_matches_eager_reference(tmp_path, route, sync):
    trainer = _trainer(tmp_path, loss_type="bnpo", rlsd_lam=0.5, rlsd_route=route, teacher_sync_steps=sync)
    trainer.current_gradient_accumulation_steps = 1
    trainer.model.train()
    rows = [qa_dataset()[0]] * 4 + [qa_dataset()[1]] * 4
    batch = trainer._generate_and_score_completions(rows)
    batch["advantages"] = torch.randn(8, generator=torch.Generator().manual_seed(2))
    # the teacher view is the template over the row's columns, tokenised; the completion is appended unchanged
    tok = trainer.processing_class
    first = tok.decode(batch["teacher_prompt_ids"][0][batch["teacher_prompt_mask"][0] == 1])
    assert first.endswith("\nReference answer: 5\n") or first.endswith("\nReference answer: 16\n")

    loss = trainer.compute_loss(trainer.model, batch)
    model, n = trainer.model, batch["completion_ids"].size(1)
    with torch.no_grad():
        s_logits = model(input_ids=torch.cat([batch["prompt_ids"], batch["completion_ids"]], 1),
                         attention_mask=torch.cat([batch["prompt_mask"], batch["completion_mask"]], 1)).logits
        t_logits = model(input_ids=torch.cat([batch["teacher_prompt_ids"], batch["completion_ids"]], 1),
                         attention_mask=torch.cat([batch["teacher_prompt_mask"], batch["completion_mask"]], 1)).logits
    ref = rlsd_loss_eager(s_logits[:, -n - 1:-1].double(), t_logits[:, -n - 1:-1].double(), batch["completion_ids"],
                          batch["advantages"].double(), None, batch["completion_mask"], lam=0.5, eps_w=0.2,
                          clip_low=0.2, clip_high=0.2, clip_dual=1e9)
    assert abs(float(loss.detach()) - float(ref.loss)) <= 1e-5 * abs(float(ref.loss))
    logged = {k: v[-1] for k, v in trainer._metrics["train"].items() if k.startswith("rlsd/")}
    assert logged["rlsd/lam"] == 0.5
    assert abs(logged["rlsd/weight_mean"] - ref.metrics["weight_mean"]) <= 1e-5
    assert abs(logged["rlsd/delta_mean"] - ref.metrics["delta_mean"]) <= 1e-5
    assert logged["rlsd/weight_mean"] != 1.0  # the privileged prompt moves the teacher away from the student


@pytest.mark.parametrize("route,sync,loss_type,accum,iterations", [
    ("linear", 0, "dapo", 1, 1), ("logits", 2, "grpo", 2, 2)])
def test_three_step_training_logs_weight_metrics(tmp_path, route, sync, loss_type, accum, iterations):
    # the second case runs TRL's real loop with gradient accumulation and num_iterations=2 (old log-probs)
    trainer = _trainer(tmp_path, loss_type=loss_type, rlsd_lam=0.5, rlsd_lam_decay_steps=2, rlsd_route=route,
                       teacher_sync_steps=sync, max_steps=3, logging_steps=1, learning_rate=1e-2,
                       gradient_accumulation_steps=accum, num_iterations=iterations,
                       per_device_train_batch_size=8 // accum)  # a generation batch: the dataset's 2 prompts x 4
    before = [p.detach().clone() for p in trainer.model.parameters()]
    trainer.train()
    steps = [h for h in trainer.state.log_history if "loss" in h]
    assert len(steps) == 3
    assert all(math.isfinite(h["loss"]) for h in steps)
    assert [h["rlsd/lam"] for h in steps] == [0.5, 0.25, 0.0]  # linear decay over rlsd_lam_decay_steps=2
    for h in steps:
        for name in ("rlsd/weight_mean", "rlsd/delta_mean", "rlsd/weight_clip_low_frac",
                     "rlsd/weight_clip_high_frac", "entropy"):
            assert math.isfinite(h[name]), name
    assert steps[0]["rlsd/weight_mean"] != 1.0 and steps[2]["rlsd/weight_mean"] == 1.0  # lam=0: g = 1
    assert any(not torch.equal(a, p) for a, p in zip(before, trainer.model.parameters()))


def test_conversational_prompt_gets_the_template_in_its_last_message(tmp_path):
    from datasets import Dataset
    tok = char_tokenizer()
    tok.chat_template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}|{% endfor %}"
                         "{% if add_generation_prompt %}assistant: {% endif %}")
    data = Dataset.from_dict({"prompt": [[{"role": "user", "content": "What is 2+3?"}]], "answer": ["5"]})
    args = RLSDGRPOConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, report_to=[],
                          per_device_train_batch_size=4, num_generations=4, max_completion_length=4,
                          teacher_prompt_template="{prompt} Reference answer: {answer}")
    trainer = RLSDGRPOTrainer(model=tiny_qwen2(tok), reward_funcs=vowel_reward, args=args, train_dataset=data,
                              processing_class=tok)
    batch = trainer._generate_and_score_completions([data[0]] * 4)
    ids = batch["teacher_prompt_ids"][0][batch["teacher_prompt_mask"][0] == 1]
    assert tok.decode(ids) == "user: What is 2+3? Reference answer: 5|assistant: "
    student = batch["prompt_ids"][0][batch["prompt_mask"][0] == 1]
    assert tok.decode(student) == "user: What is 2+3?|assistant: "
