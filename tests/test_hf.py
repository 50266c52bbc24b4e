"""HF helper: loss and gradients of the fused linear path equal those of model(...).logits -> rlsd_loss."""
import pytest
import torch

from rlsd_kernels import reference
from rlsd_kernels.hf import rlsd_linear_loss_hf

transformers = pytest.importorskip("transformers")

V, HID = 211, 32


def _model(kind, device):
    """A tiny random model, built directly on ``device``."""
    torch.manual_seed(0)
    common = dict(vocab_size=V, hidden_size=HID, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64)
    with torch.device("cpu"):  # initialised on the CPU: the same weights on every machine
        if kind == "qwen2-tied":
            cfg = transformers.Qwen2Config(tie_word_embeddings=True, **common)
            model = transformers.Qwen2ForCausalLM(cfg)
            assert model.lm_head.weight is model.model.embed_tokens.weight
        else:
            cfg = transformers.LlamaConfig(tie_word_embeddings=False, **common)
            model = transformers.LlamaForCausalLM(cfg)
    return model.to(device).float().eval()  # eval: no dropout, so both paths see the same network


def _batch(seed, device):
    """Right-padded rollouts: student = short prompt + response, teacher = longer (privileged) prompt + response."""
    g = torch.Generator().manual_seed(seed)
    cpu = torch.device("cpu")
    rows = [(3, 6, 2, 7), (4, 3, 5, 5), (2, 5, 3, 0)]  # (student prompt, response, extra teacher prompt, ...) lens
    T = max(p + r for p, r, _, _ in rows) + 1
    Tt = max(p + e + r for p, r, e, _ in rows) + 1
    B = len(rows)
    ids, am, rm = (torch.zeros(B, T, dtype=torch.long, device=cpu) for _ in range(3))
    tids, tam, trm = (torch.zeros(B, Tt, dtype=torch.long, device=cpu) for _ in range(3))
    for b, (p, r, e, _) in enumerate(rows):
        prompt, priv, resp = (torch.randint(1, V, (n,), generator=g, device=cpu) for n in (p, e, r))
        ids[b, :p + r] = torch.cat([prompt, resp])
        am[b, :p + r] = 1
        rm[b, p:p + r] = 1
        tids[b, :p + e + r] = torch.cat([prompt, priv, resp])
        tam[b, :p + e + r] = 1
        trm[b, p + e:p + e + r] = 1
    adv = torch.randn(B, generator=g, device=cpu)
    bt = dict(input_ids=ids, attention_mask=am, response_mask=rm, teacher_input_ids=tids,
              teacher_attention_mask=tam, teacher_response_mask=trm, advantages=adv)
    return {k: v.to(device) for k, v in bt.items()}


def _logits_path(model, bt, **kw):
    """What a trainer does today: full logits for both batches, teacher logits aligned to the student's positions."""
    logits = model(input_ids=bt["input_ids"], attention_mask=bt["attention_mask"]).logits
    sel = (bt["response_mask"][:, 1:] != 0) & (bt["attention_mask"][:, 1:] != 0)
    with torch.no_grad():
        tl = model(input_ids=bt["teacher_input_ids"], attention_mask=bt["teacher_attention_mask"]).logits
        tsel = (bt["teacher_response_mask"][:, 1:] != 0) & (bt["teacher_attention_mask"][:, 1:] != 0)
        aligned = torch.zeros_like(logits[:, :-1])
        aligned[sel] = tl[:, :-1][tsel]
    return reference.rlsd_loss_eager(logits[:, :-1].double(), aligned.double(), bt["input_ids"][:, 1:],
                                     bt["advantages"], None, sel, **kw), sel


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("kind", ["qwen2-tied", "llama"])
@pytest.mark.parametrize("agg", ["token", "seq"])
def test_hf_helper_matches_logits_path(kind, linear_path, agg):
    model = _model(kind, linear_path.device)
    bt = _batch(0, linear_path.device)
    kw = dict(lam=0.5, loss_agg_mode=agg, return_entropy=True)
    ref, sel = _logits_path(model, bt, **kw)
    ref.loss.backward()
    want = _grads(model)
    model.zero_grad(set_to_none=True)
    out = rlsd_linear_loss_hf(model, bt["input_ids"], bt["attention_mask"], bt["response_mask"], bt["advantages"],
                              teacher_input_ids=bt["teacher_input_ids"],
                              teacher_attention_mask=bt["teacher_attention_mask"],
                              teacher_response_mask=bt["teacher_response_mask"], **kw)
    out.loss.backward()
    got = _grads(model)
    torch.testing.assert_close(out.loss.double(), ref.loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.logprobs[sel].double(), ref.logprobs[sel], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.teacher_logprobs[sel].double(), ref.teacher_logprobs[sel], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.entropy[sel].double(), ref.entropy[sel], rtol=1e-5, atol=1e-5)
    assert out.logprobs.shape == bt["input_ids"][:, 1:].shape
    assert set(got) == set(want)
    for name in want:
        torch.testing.assert_close(got[name].double(), want[name].double(), rtol=1e-4, atol=1e-6, msg=name)


def test_hf_helper_teacher_copy_and_errors():
    """A separately synced teacher (own weights) is scored with its own head; misaligned batches are refused."""
    model = _model("llama", "cpu")  # no backend forced: CPU tensors take the chunked route on every machine
    teacher = _model("llama", "cpu")
    with torch.no_grad():
        for p in teacher.parameters():
            p.add_(0.01 * torch.randn_like(p))
    bt = _batch(1, "cpu")
    args = (bt["input_ids"], bt["attention_mask"], bt["response_mask"], bt["advantages"])
    tkw = dict(teacher_input_ids=bt["teacher_input_ids"], teacher_attention_mask=bt["teacher_attention_mask"],
               teacher_response_mask=bt["teacher_response_mask"])
    out = rlsd_linear_loss_hf(model, *args, teacher_model=teacher, lam=1.0, **tkw)
    # the same teacher log-probs passed precomputed give the same loss
    out2 = rlsd_linear_loss_hf(model, *args, teacher_logprobs=out.teacher_logprobs, lam=1.0)
    torch.testing.assert_close(out.loss, out2.loss)
    with torch.no_grad():
        tl = teacher(input_ids=bt["teacher_input_ids"], attention_mask=bt["teacher_attention_mask"]).logits
    tsel = (bt["teacher_response_mask"][:, 1:] != 0) & (bt["teacher_attention_mask"][:, 1:] != 0)
    want = reference.token_logprobs_eager(tl[:, :-1], bt["teacher_input_ids"][:, 1:])[tsel]
    sel = (bt["response_mask"][:, 1:] != 0) & (bt["attention_mask"][:, 1:] != 0)
    torch.testing.assert_close(out.teacher_logprobs[sel], want, rtol=1e-5, atol=1e-5)
    bad = dict(tkw, teacher_response_mask=torch.roll(bt["teacher_response_mask"], 1, 1))
    with pytest.raises(ValueError, match="same response tokens"):
        rlsd_linear_loss_hf(model, *args, **bad)
    with pytest.raises(ValueError, match="advantages must have shape"):
        rlsd_linear_loss_hf(model, bt["input_ids"], bt["attention_mask"], bt["response_mask"], torch.zeros(7))
    with pytest.raises(ValueError, match="cu_seqlens"):
        rlsd_linear_loss_hf(model, *args, cu_seqlens=None)


def test_hf_helper_left_padded_with_position_ids():
    """Left-padded prompts with explicit position ids (the layout of rlsd_kernels.train.rollout.pack)."""
    model = _model("qwen2-tied", "cpu")
    bt = _batch(2, "cpu")
    # turn the right-padded batch into a left-padded one: roll each row so that its padding comes first
    for k, mk in (("input_ids", "attention_mask"), ("teacher_input_ids", "teacher_attention_mask")):
        rm = "response_mask" if k == "input_ids" else "teacher_response_mask"
        pad = (bt[mk] == 0).sum(1)
        for b in range(len(pad)):
            for key in (k, mk, rm):
                bt[key][b] = torch.roll(bt[key][b], int(pad[b]))
    pos = (bt["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    tpos = (bt["teacher_attention_mask"].cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=bt["input_ids"], attention_mask=bt["attention_mask"], position_ids=pos).logits
    sel = (bt["response_mask"][:, 1:] != 0) & (bt["attention_mask"][:, 1:] != 0)
    with torch.no_grad():
        tl = model(input_ids=bt["teacher_input_ids"], attention_mask=bt["teacher_attention_mask"],
                   position_ids=tpos).logits
        tsel = (bt["teacher_response_mask"][:, 1:] != 0) & (bt["teacher_attention_mask"][:, 1:] != 0)
        aligned = torch.zeros_like(logits[:, :-1])
        aligned[sel] = tl[:, :-1][tsel]
    ref = reference.rlsd_loss_eager(logits[:, :-1].double(), aligned.double(), bt["input_ids"][:, 1:],
                                    bt["advantages"], None, sel, lam=0.5)
    out = rlsd_linear_loss_hf(model, bt["input_ids"], bt["attention_mask"], bt["response_mask"], bt["advantages"],
                              teacher_input_ids=bt["teacher_input_ids"],
                              teacher_attention_mask=bt["teacher_attention_mask"],
                              teacher_response_mask=bt["teacher_response_mask"], position_ids=pos,
                              teacher_position_ids=tpos, lam=0.5)
    torch.testing.assert_close(out.loss.double(), ref.loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.teacher_logprobs[sel].double(), ref.teacher_logprobs[sel], rtol=1e-5, atol=1e-5)
