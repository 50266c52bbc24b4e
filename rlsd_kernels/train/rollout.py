"""Batching and sampling: left-padded prompts, one KV-cached sampling loop for all G x prompts sequences."""
from __future__ import annotations

from typing import List, Sequence, Tuple

import torch

from .model import Forward


def pack(prompts: Sequence[Sequence[int]], responses: torch.Tensor, valid: torch.Tensor, pad_id: int):
    """``[left pad][prompt][response][right pad]`` rows. Returns ids, attention mask, position ids and the padded
    prompt length ``P``: logits ``[:, P - 1 : P - 1 + R]`` predict the response tokens ``ids[:, P : P + R]``."""
    B = len(prompts)
    P = max(len(p) for p in prompts)
    R = responses.shape[1]
    dev = responses.device
    ids = torch.full((B, P + R), pad_id, dtype=torch.long, device=dev)
    attn = torch.zeros((B, P + R), dtype=torch.long, device=dev)
    for i, p in enumerate(prompts):
        ids[i, P - len(p):P] = torch.as_tensor(list(p), dtype=torch.long, device=dev)
        attn[i, P - len(p):P] = 1
    ids[:, P:] = torch.where(valid, responses, pad_id)
    attn[:, P:] = valid.long()
    pos = (attn.cumsum(-1) - 1).clamp(min=0)
    return ids, attn, pos, P


@torch.no_grad()
def generate(model, fwd: Forward, prompts: Sequence[Sequence[int]], max_new: int, eos_id: int, pad_id: int,
             temperature: float, device) -> Tuple[torch.Tensor, torch.Tensor]:
    """Samples (``temperature > 0``, torch's global RNG) or greedily decodes up to ``max_new`` tokens for every
    prompt at once with the KV cache. Returns ``responses [B, R]`` (pad after EOS) and ``valid [B, R]`` (the tokens
    generated, EOS included)."""
    B = len(prompts)
    empty = torch.zeros((B, 0), dtype=torch.long, device=device)
    ids, attn, pos, _ = pack(prompts, empty, empty.bool(), pad_id)
    was_training = model.training
    model.eval()
    logits, cache = fwd(model, ids, attn, pos, use_cache=True)
    nxt = logits[:, -1].float()
    cur_pos = pos[:, -1]
    done = torch.zeros(B, dtype=torch.bool, device=device)
    toks: List[torch.Tensor] = []
    valids: List[torch.Tensor] = []
    for t in range(max_new):
        if temperature > 0:
            tok = torch.multinomial(torch.softmax(nxt / temperature, -1), 1).squeeze(1)
        else:
            tok = nxt.argmax(-1)
        valids.append(~done)
        tok = torch.where(done, pad_id, tok)
        toks.append(tok)
        done = done | (tok == eos_id)
        if bool(done.all()) or t == max_new - 1:
            break
        attn = torch.cat([attn, torch.ones((B, 1), dtype=attn.dtype, device=device)], 1)
        cur_pos = cur_pos + 1
        logits, cache = fwd(model, tok[:, None], attn, cur_pos[:, None], cache=cache, use_cache=True)
        nxt = logits[:, -1].float()
    model.train(was_training)
    return torch.stack(toks, 1), torch.stack(valids, 1)
