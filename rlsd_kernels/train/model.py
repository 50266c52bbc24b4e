"""Policy model and tokenizer: a tiny Qwen2 built from a config with a local character-level tokenizer (nothing is
downloaded), or any local transformers causal-LM checkpoint (``--model PATH``)."""
from __future__ import annotations

import inspect
import os
from typing import List, Optional

import torch

PAD, EOS, BOS = "<pad>", "<eos>", "<bos>"


def build_char_tokenizer(alphabet: str):
    """A ``PreTrainedTokenizerFast`` with one token per character (built with ``tokenizers``, saved like any other)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = sorted(set(alphabet))
    vocab = {PAD: 0, EOS: 1, BOS: 2}
    for c in chars:
        vocab[c] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token=PAD))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=PAD, eos_token=EOS, bos_token=BOS)


class TokenizerAdapter:
    """What the trainer needs from a tokenizer: ids of a string (no special tokens), text of ids, pad/eos ids."""

    def __init__(self, hf_tokenizer):
        self.hf = hf_tokenizer
        if hf_tokenizer.eos_token_id is None:
            raise ValueError("--model: the tokenizer has no eos token")
        self.eos_id = int(hf_tokenizer.eos_token_id)
        pad = hf_tokenizer.pad_token_id
        self.pad_id = int(pad if pad is not None else self.eos_id)

    def encode(self, text: str) -> List[int]:
        return list(self.hf(text, add_special_tokens=False)["input_ids"])

    def decode(self, ids) -> str:
        ids = [int(i) for i in ids]
        if self.eos_id in ids:
            ids = ids[: ids.index(self.eos_id)]
        ids = [i for i in ids if i != self.pad_id]
        return self.hf.decode(ids, skip_special_tokens=True)

    def __len__(self) -> int:
        return len(self.hf)


def build_tiny_model(vocab_size: int, hidden: int, layers: int, heads: int, max_positions: int, pad_id: int,
                     eos_id: int, bos_id: int):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                      max_position_embeddings=max_positions, tie_word_embeddings=True, pad_token_id=pad_id,
                      eos_token_id=eos_id, bos_token_id=bos_id, attention_dropout=0.0, use_cache=True)
    return Qwen2ForCausalLM(cfg)


def load_pretrained(path: str, dtype: Optional[torch.dtype] = None):
    """A local checkpoint directory (config + weights + tokenizer); raises ValueError naming ``--model``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not os.path.isdir(path):
        raise ValueError(f"--model: {path!r} is not a directory holding a transformers checkpoint")
    try:
        tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=dtype or torch.float32)
    except Exception as e:  # noqa: BLE001 - any load failure is a bad flag for the operator
        raise ValueError(f"--model: cannot load a causal LM from {path!r}: {e}") from e
    return model, TokenizerAdapter(tok)


class Forward:
    """Calls a causal LM with or without a KV cache across transformers versions (``cache=`` in 5.x, else
    ``past_key_values=``)."""

    def __init__(self, model):
        params = inspect.signature(model.forward).parameters
        self.cache_kw = "cache" if "cache" in params else "past_key_values"

    def __call__(self, model, ids, attn, pos, cache=None, use_cache=False):
        kw = {self.cache_kw: cache} if cache is not None else {}
        out = model(input_ids=ids, attention_mask=attn, position_ids=pos, use_cache=use_cache, **kw)
        if not use_cache:
            return out.logits, None
        if self.cache_kw == "cache":
            return out.logits, out.cache
        return out.logits, out.past_key_values
