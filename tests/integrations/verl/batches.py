"""Synthetic verl micro-batches, built with verl's own structures and padding utilities (as its engine sees them)."""
import torch
from verl import DataProto
from verl.utils import tensordict_utils as tu
from verl.workers.utils.padding import left_right_2_no_padding, no_padding_2_padding


def padded_batch(B=6, P=5, T=7, vocab=50, seed=0, advantage_scale=1.5, logp_noise=0.7):
    """A left/right padded rollout batch (DataProto) with old log-probs and GRPO-style per-sequence advantages.

    Some responses are short, one response has a masked token in the middle (a tool-output token), and the
    old log-probs differ from ``current_logp`` enough to reach both PPO clips and the dual clip."""
    g = torch.Generator().manual_seed(seed)
    prompt_lens = torch.randint(1, P + 1, (B,), generator=g)
    resp_lens = torch.randint(1, T + 1, (B,), generator=g)
    resp_lens[0] = T
    prompts = torch.zeros(B, P, dtype=torch.long)
    responses = torch.zeros(B, T, dtype=torch.long)
    attn = torch.zeros(B, P + T, dtype=torch.long)
    for i in range(B):
        prompts[i, P - prompt_lens[i]:] = torch.randint(1, vocab, (int(prompt_lens[i]),), generator=g)
        responses[i, :resp_lens[i]] = torch.randint(1, vocab, (int(resp_lens[i]),), generator=g)
        attn[i, P - prompt_lens[i]:P] = 1
        attn[i, P:P + resp_lens[i]] = 1
    response_mask = attn[:, P:].clone()
    response_mask[0, T // 2] = 0
    current = -torch.rand(B, T, generator=g) * 3 - 0.05
    old = current + logp_noise * torch.randn(B, T, generator=g)
    adv = (advantage_scale * torch.randn(B, 1, generator=g)).expand(B, T).clone()
    adv[1] = 0.0
    adv[2] = -1.0
    old[2, 0] = current[2, 0] - 2.0   # ratio e^2 > clip_ratio_c with a negative advantage: the dual clip
    teacher = current + torch.randn(B, T, generator=g)
    batch = DataProto.from_dict(tensors={
        "prompts": prompts, "responses": responses, "input_ids": torch.cat([prompts, responses], 1),
        "attention_mask": attn, "position_ids": (attn.cumsum(1) - 1).clamp(min=0), "response_mask": response_mask,
        "old_log_probs": old, "advantages": adv})
    return batch, current, teacher


def micro_batch(batch: DataProto, dp_size=1, batch_num_tokens=None, global_batch_size=None):
    """The TensorDict the engine hands to the loss: no-padding layout plus the global-batch normalisers."""
    td = left_right_2_no_padding(batch.to_tensordict())
    tu.assign_non_tensor(td, dp_size=dp_size, batch_num_tokens=batch_num_tokens,
                         global_batch_size=global_batch_size)
    return td


def packed_index(td):
    """``(B, T)`` index into the packed (nnz) token axis of the position whose output scores response token j."""
    nnz = td["input_ids"].values().numel()
    return no_padding_2_padding(torch.arange(nnz, dtype=torch.float64), td).round().long()


def packed_logprobs(td, response_logp, mask):
    """A leaf packed log-prob vector (nnz) whose response positions hold ``response_logp`` (B, T), and the nested
    model output built from it, as the engine returns ``log_probs``."""
    nnz = td["input_ids"].values().numel()
    values = torch.zeros(nnz, dtype=response_logp.dtype)
    idx = packed_index(td)
    values[idx[mask]] = response_logp[mask]
    values = values.detach().requires_grad_(True)
    nested = torch.nested.nested_tensor_from_jagged(values, td["input_ids"].offsets())
    return values, nested
