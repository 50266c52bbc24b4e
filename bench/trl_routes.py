"""Peak CPU memory of one RLSDGRPOTrainer loss + backward, logits route vs logit-free route (needs the [trl] extra).

    python -m bench.trl_routes [--vocab 32000] [--batch 8] [--completion 512]

Each route runs in a fresh subprocess: a tiny-backbone Qwen2 with a large vocabulary (so the [B, C, V] logits
dominate), a synthetic TRL batch (prompt + completion ids, masks, advantages, teacher prompt), one
``compute_loss`` + ``backward`` with rlsd_lam=0.5 (teacher scored). Prints the peak resident memory above the
process's resident memory just before the step (``ru_maxrss``; includes the parameter gradients).
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def _one(route: str, vocab: int, batch: int, completion: int) -> dict:
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM, PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models
    from datasets import Dataset
    from rlsd_kernels.integrations.trl import RLSDGRPOConfig, RLSDGRPOTrainer

    torch.manual_seed(0)
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"<pad>": 0, "<eos>": 1, "<unk>": 2},
                                                                               unk_token="<unk>")),
                                  pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")
    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=2, pad_token_id=0,
                                         eos_token_id=1))
    args = RLSDGRPOConfig(output_dir=tempfile.mkdtemp(), use_cpu=True, report_to=[], per_device_train_batch_size=batch,
                          num_generations=batch, max_completion_length=completion, loss_type="dapo",
                          teacher_prompt_template="{prompt} {answer}", rlsd_lam=0.5, rlsd_route=route)
    trainer = RLSDGRPOTrainer(model=model, reward_funcs=lambda completions, **kw: [0.0] * len(completions),
                              args=args, train_dataset=Dataset.from_dict({"prompt": ["p"], "answer": ["a"]}),
                              processing_class=tok)
    trainer.current_gradient_accumulation_steps = 1
    trainer.model.train()
    ids = lambda n: torch.randint(3, vocab, (batch, n))  # noqa: E731
    inputs = {"prompt_ids": ids(16), "prompt_mask": torch.ones(batch, 16, dtype=torch.long),
              "completion_ids": ids(completion), "completion_mask": torch.ones(batch, completion, dtype=torch.long),
              "teacher_prompt_ids": ids(24), "teacher_prompt_mask": torch.ones(batch, 24, dtype=torch.long),
              "advantages": torch.randn(batch), "num_items_in_batch": torch.tensor(float(batch * completion))}
    before = _rss_mib()
    trainer.compute_loss(trainer.model, inputs).backward()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"route": route, "vocab": vocab, "batch": batch, "completion": completion,
            "logits_mib": batch * (completion + 1) * vocab * 4 / 2**20, "peak_extra_mib": round(peak - before, 1)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--completion", type=int, default=512)
    p.add_argument("--route", choices=("linear", "logits"), help=argparse.SUPPRESS)  # the subprocess's job
    a = p.parse_args(argv)
    if a.route:
        print(json.dumps(_one(a.route, a.vocab, a.batch, a.completion)))
        return
    for route in ("logits", "linear"):
        out = subprocess.run([sys.executable, "-m", "bench.trl_routes", "--route", route, "--vocab", str(a.vocab),
                              "--batch", str(a.batch), "--completion", str(a.completion)],
                             check=True, capture_output=True, text=True).stdout
        print(out.strip().splitlines()[-1])


if __name__ == "__main__":
    main()
