"""The teacher batch step: token layout of teacher-prompt + response, and teacher log-probs aligned to responses."""
import pytest

pytest.importorskip("verl")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from tensordict import TensorDict  # noqa: E402
from tokenizers import Tokenizer, models, pre_tokenizers  # noqa: E402
from transformers import PreTrainedTokenizerFast  # noqa: E402
from verl import DataProto  # noqa: E402

from rlsd_kernels.integrations.verl import TEACHER_KEY, add_teacher_log_probs, build_teacher_batch  # noqa: E402

WORDS = ["<pad>", "what", "is", "two", "plus", "three", "four", "five", "reference", "answer", ":", "the", "=", "so"]


def tiny_tokenizer():
    """A word-level tokenizer built in memory (no download)."""
    vocab = {w: i for i, w in enumerate(WORDS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>")


def ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def rollout_batch(tok, prompts, responses, answers, P=6, T=4):
    """A verl rollout batch: left-padded prompts, right-padded responses, answers as a non-tensor field."""
    B = len(prompts)
    p = torch.zeros(B, P, dtype=torch.long)
    r = torch.zeros(B, T, dtype=torch.long)
    attn = torch.zeros(B, P + T, dtype=torch.long)
    for i, (pt, rt) in enumerate(zip(prompts, responses)):
        pi, ri = ids(tok, pt), ids(tok, rt)
        p[i, P - len(pi):] = torch.tensor(pi)
        r[i, :len(ri)] = torch.tensor(ri)
        attn[i, P - len(pi):P] = 1
        attn[i, P:P + len(ri)] = 1
    return DataProto.from_dict(
        tensors={"prompts": p, "responses": r, "input_ids": torch.cat([p, r], 1), "attention_mask": attn,
                 "position_ids": (attn.cumsum(1) - 1).clamp(min=0), "response_mask": attn[:, P:].clone()},
        non_tensors={"answer": np.array(answers, dtype=object),
                     "reward_model": np.array([{"ground_truth": a} for a in answers], dtype=object)})


PROMPTS = ["what is two plus two", "what is three plus two"]
RESPONSES = ["four", "the answer is five"]
ANSWERS = ["four", "five"]
TEMPLATE = "{prompt} reference answer : {answer}"


def test_teacher_batch_layout():
    tok = tiny_tokenizer()
    batch = rollout_batch(tok, PROMPTS, RESPONSES, ANSWERS)
    teacher = build_teacher_batch(batch, tok, TEMPLATE)
    t = teacher.batch
    P_t = t["prompts"].shape[1]
    assert torch.equal(t["responses"], batch.batch["responses"])
    assert torch.equal(t["input_ids"][:, P_t:], batch.batch["responses"])
    assert torch.equal(t["response_mask"], batch.batch["response_mask"])
    for i in range(len(PROMPTS)):
        want = ids(tok, f"{PROMPTS[i]} reference answer : {ANSWERS[i]}") + ids(tok, RESPONSES[i])
        keep = t["attention_mask"][i].bool()
        assert t["input_ids"][i][keep].tolist() == want
        # left padding for the prompt, contiguous positions from 0 over the real tokens
        assert t["attention_mask"][i, :P_t].tolist() == sorted(t["attention_mask"][i, :P_t].tolist())
        assert t["position_ids"][i][keep].tolist() == list(range(len(want)))
    # verl's usual reference-answer field is reward_model["ground_truth"]: format indexing reaches it
    nested = build_teacher_batch(batch, tok, "{prompt} reference answer : {reward_model[ground_truth]}")
    assert torch.equal(nested.batch["input_ids"], t["input_ids"])


class ScoringWorkerGroup:
    """Stands in for actor_rollout_wg: per packed position t, the 'log-prob' of token t + 1 is -(id + 1) / 100,
    so each returned value names the token it scored."""

    def __init__(self):
        self.calls = []

    def compute_log_prob(self, td):
        self.calls.append(td)
        ids_nested = td["input_ids"]
        nxt = torch.roll(ids_nested.values(), -1).to(torch.float32)
        lp = torch.nested.nested_tensor_from_jagged(-(nxt + 1) / 100, ids_nested.offsets())
        return TensorDict({"log_probs": lp}, batch_size=[])


def test_teacher_log_probs_align_with_responses():
    tok = tiny_tokenizer()
    batch = rollout_batch(tok, PROMPTS, RESPONSES, ANSWERS)
    wg = ScoringWorkerGroup()
    add_teacher_log_probs(batch, wg, tok, TEMPLATE)
    got = batch.batch[TEACHER_KEY]
    responses, mask = batch.batch["responses"], batch.batch["response_mask"].bool()
    assert got.shape == responses.shape and got.dtype == torch.float32
    torch.testing.assert_close(got[mask], -(responses[mask].float() + 1) / 100)
    assert (got[~mask] == 0).all()
    assert len(wg.calls) == 1 and wg.calls[0]["compute_loss"] is False


def test_template_errors_name_the_field():
    tok = tiny_tokenizer()
    batch = rollout_batch(tok, PROMPTS, RESPONSES, ANSWERS)
    with pytest.raises(ValueError, match="ground_truth"):
        build_teacher_batch(batch, tok, "{prompt} {ground_truth}")
    with pytest.raises(ValueError, match="max_prompt_length"):
        build_teacher_batch(batch, tok, TEMPLATE, max_prompt_length=3)
