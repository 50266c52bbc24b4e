"""Hugging Face helper: the RLSD loss of a causal LM straight from its final hidden states (no logits).

:func:`rlsd_linear_loss_hf` runs the backbone (``model.get_decoder()``, i.e. ``model.model`` for Qwen2 / Llama /
Mistral style models) of the student batch and, without gradient, of the teacher batch, takes the final hidden
states (after the final norm), keeps only the positions that predict a response token, and calls
:func:`rlsd_kernels.rlsd_linear_loss` with the model's LM head (``nn.Linear``, tied to the input embedding or not).
It computes the same loss and gradients as the logits path::

    logits = model(input_ids, attention_mask).logits                 # [B, T, V]
    rlsd_loss(logits[:, :-1], teacher_logits_aligned, input_ids[:, 1:], advantages, old_logprobs,
              mask=(response_mask & attention_mask)[:, 1:], ...)

but the ``[B, T, V]`` logits (and their gradient) never exist, and prompt positions are never projected onto the
vocabulary at all.

Conventions (those of verl / TRL / OpenRLHF): ``input_ids`` ``[B, T]`` is prompt + response (+ padding),
``response_mask`` ``[B, T]`` marks the response tokens to train on; the hidden state at position ``j`` predicts
token ``j + 1``, so per-token tensors (``old_logprobs``, per-token ``advantages``, ``teacher_logprobs``) and the
returned per-token outputs have shape ``[B, T - 1]`` (outside the response: log-probs 0, weight 1, entropy 0).
The teacher batch holds the same responses after a different (privileged) prompt; its k-th response token in row b
is aligned with the student's k-th response token in row b (the counts and the tokens must agree).

Limitations: models that post-process logits (``final_logit_softcapping``, ``logit_scale``) are refused; the
backbone is called directly, so wrappers whose ``forward`` does work (FSDP / DDP hooks) must expose the inner model.
"""
from __future__ import annotations


import torch

from ._output import RLSDOutput
from .linear import rlsd_linear_loss, token_logprobs_linear

__all__ = ["rlsd_linear_loss_hf", "causal_lm_hidden", "lm_head_of"]


def lm_head_of(model):
    """``(weight [V, H], bias [V] | None)`` of a causal LM's output projection; refuses logit post-processing."""
    cfg = getattr(model, "config", None)
    if getattr(cfg, "final_logit_softcapping", None):
        raise ValueError("model applies final_logit_softcapping to its logits; the fused linear loss does not")
    scale = getattr(cfg, "logit_scale", None)
    if scale is not None and float(scale) != 1.0:
        raise ValueError(f"model scales its logits by logit_scale={scale}; the fused linear loss does not")
    head = model.get_output_embeddings()
    if not isinstance(head, torch.nn.Linear):
        raise ValueError(f"model's output embedding must be a torch.nn.Linear, got {type(head).__name__}")
    return head.weight, head.bias


def causal_lm_hidden(model, input_ids, attention_mask=None, **backbone_kwargs):
    """Final hidden states ``[B, T, H]`` of a causal LM (after its final norm), without the LM head."""
    backbone = model.get_decoder() if hasattr(model, "get_decoder") else model.model
    out = backbone(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **backbone_kwargs)
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


def _positions(name, response_mask, attention_mask, shape):
    if not isinstance(response_mask, torch.Tensor) or tuple(response_mask.shape) != tuple(shape):
        raise ValueError(f"{name} must be a tensor of shape {tuple(shape)} (that of its input_ids)")
    sel = response_mask[:, 1:] != 0
    if attention_mask is not None:
        sel = sel & (attention_mask[:, 1:] != 0)
    return sel


def _pos(position_ids):
    return {} if position_ids is None else {"position_ids": position_ids}


def _scatter(values, sel, fill):
    if values is None:
        return None
    out = torch.full(sel.shape, fill, dtype=values.dtype, device=values.device)
    out[sel] = values.reshape(-1)
    return out


def rlsd_linear_loss_hf(model, input_ids, attention_mask, response_mask, advantages, old_logprobs=None, *,
                        teacher_input_ids=None, teacher_attention_mask=None, teacher_response_mask=None,
                        teacher_model=None, teacher_logprobs=None, position_ids=None, teacher_position_ids=None,
                        **loss_kwargs) -> RLSDOutput:
    """RLSD loss of ``model`` on a rollout batch via the fused linear op (hidden states + LM head, no logits).

    model: a ``transformers`` causal LM (``get_decoder()`` backbone + ``nn.Linear`` LM head, tied or not).
    input_ids, attention_mask, response_mask: student batch ``[B, T]``. advantages: ``[B]`` (per sequence) or
    ``[B, T - 1]``; old_logprobs: ``[B, T - 1]`` or None (on-policy).
    Teacher: ``teacher_input_ids`` / ``teacher_attention_mask`` / ``teacher_response_mask`` ``[B, Tt]`` (privileged
    prompt + the same responses), scored without gradient by ``teacher_model`` (default: ``model`` itself, the
    live student); when the teacher shares the student's LM-head weight its hidden states go through the same
    fused tile pass as the student's, otherwise it is scored with its own head into per-token log-probs. Or pass
    precomputed ``teacher_logprobs`` ``[B, T - 1]``; or nothing for plain GRPO.
    loss_kwargs: the hyper-parameters of :func:`rlsd_kernels.rlsd_loss` (lam, eps_w, clip_*, loss_type,
    loss_agg_mode, norm, temperature, return_entropy). Per-token outputs come back as ``[B, T - 1]``.
    position_ids / teacher_position_ids: passed to the backbones (left-padded batches, as ``model(...)`` would get).
    """
    for bad in ("mask", "cu_seqlens", "teacher_hidden", "labels"):
        if bad in loss_kwargs:
            raise ValueError(f"{bad} is derived from the batch by rlsd_linear_loss_hf; do not pass it")
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        raise ValueError("input_ids must be a [B, T] tensor")
    B, T = input_ids.shape
    if T < 2:
        raise ValueError(f"input_ids must hold at least 2 positions, got T={T}")
    sel = _positions("response_mask", response_mask, attention_mask, (B, T))
    labels = input_ids[:, 1:][sel]
    counts = sel.sum(1)
    cu = torch.zeros(B + 1, dtype=torch.int64, device=input_ids.device)
    cu[1:] = torch.cumsum(counts, 0)
    weight, bias = lm_head_of(model)

    def per_token(name, x):
        if x is None:
            return None
        if not isinstance(x, torch.Tensor) or tuple(x.shape) != (B, T - 1):
            raise ValueError(f"{name} must have shape {(B, T - 1)} (one value per predicted token), got "
                             f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
        return x[sel][None]

    if isinstance(advantages, torch.Tensor) and tuple(advantages.shape) == (B, T - 1):
        adv = per_token("advantages", advantages)
    elif isinstance(advantages, torch.Tensor) and tuple(advantages.shape) == (B,):
        adv = advantages  # one per sequence: broadcast over its tokens through cu_seqlens
    else:
        raise ValueError(f"advantages must have shape ({B},) or {(B, T - 1)}, got "
                         f"{tuple(advantages.shape) if isinstance(advantages, torch.Tensor) else advantages}")
    old = per_token("old_logprobs", old_logprobs)
    t_logp = per_token("teacher_logprobs", teacher_logprobs)

    teacher_hidden = None
    if teacher_input_ids is not None:
        if t_logp is not None:
            raise ValueError("pass the teacher batch or teacher_logprobs, not both")
        if teacher_response_mask is None:
            raise ValueError("teacher_response_mask is required with teacher_input_ids")
        if teacher_input_ids.dim() != 2 or teacher_input_ids.shape[0] != B:
            raise ValueError(f"teacher_input_ids must have shape ({B}, Tt), got {tuple(teacher_input_ids.shape)}")
        t_sel = _positions("teacher_response_mask", teacher_response_mask, teacher_attention_mask,
                           teacher_input_ids.shape)
        if not torch.equal(t_sel.sum(1), counts) or not torch.equal(teacher_input_ids[:, 1:][t_sel], labels):
            raise ValueError("the teacher batch must hold the same response tokens as the student batch, row by row")
        teacher = model if teacher_model is None else teacher_model
        with torch.no_grad():
            th = causal_lm_hidden(teacher, teacher_input_ids, teacher_attention_mask,
                                  **_pos(teacher_position_ids))[:, :-1][t_sel]
            t_weight, t_bias = lm_head_of(teacher)
            same_head = t_weight is weight and t_bias is bias
            if not same_head:  # a synced copy with its own weights: score it with its own head
                t_logp = token_logprobs_linear(th.to(t_weight.dtype), t_weight, labels, t_bias,
                                               loss_kwargs.get("temperature", 1.0))[None]
            else:
                teacher_hidden = th[None]

    hidden = causal_lm_hidden(model, input_ids, attention_mask, **_pos(position_ids))[:, :-1][sel][None]  # [1, nnz, H]
    if hidden.dtype != weight.dtype:  # e.g. autocast: project in the activations' dtype, as F.linear would
        weight = weight.to(hidden.dtype)
        bias = None if bias is None else bias.to(hidden.dtype)
    if teacher_hidden is not None:
        teacher_hidden = teacher_hidden.to(hidden.dtype)
    out = rlsd_linear_loss(hidden, weight, labels[None], adv, old, None, teacher_hidden=teacher_hidden,
                           teacher_logprobs=t_logp, lm_head_bias=bias, cu_seqlens=cu, **loss_kwargs)
    return RLSDOutput(
        loss=out.loss,
        logprobs=_scatter(out.logprobs, sel, 0.0),
        teacher_logprobs=_scatter(out.teacher_logprobs, sel, 0.0),
        weights=_scatter(out.weights, sel, 1.0),
        entropy=_scatter(out.entropy, sel, 0.0),
        metric_values=out.metric_values,
    )
