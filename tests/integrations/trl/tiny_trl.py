"""A tiny random Qwen2 causal LM, a char-level tokenizer and a two-row dataset, all built locally (no downloads),
for the TRL integration tests."""
import string

import torch
from datasets import Dataset
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

SPECIAL = ["<pad>", "<eos>", "<unk>"]


def char_tokenizer():
    """One token per printable character (newline included), plus pad / eos / unk."""
    vocab = {tok: i for i, tok in enumerate(SPECIAL + list(dict.fromkeys(string.printable)))}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    core.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def tiny_qwen2(tokenizer, seed=0, tie=True):
    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=tie, pad_token_id=tokenizer.pad_token_id,
                      eos_token_id=tokenizer.eos_token_id, bos_token_id=None)
    return Qwen2ForCausalLM(cfg).float()


def qa_dataset():
    return Dataset.from_dict({"prompt": ["What is 2+3? ", "What is 4*4? "], "answer": ["5", "16"]})


def vowel_reward(completions, **kwargs):
    """A reward that varies between completions of a random model: its number of vowels."""
    texts = [c if isinstance(c, str) else c[-1]["content"] for c in completions]  # conversational: messages
    return [float(sum(ch in "aeiou" for ch in text)) for text in texts]
