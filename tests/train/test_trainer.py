"""Smoke run, exact resume, bad flags. Every run is pinned to the CPU (pinned.py); the GPU run is in
test_train_gpu.py."""
import json
import os

import pytest
import torch

from rlsd_kernels.train import cli
from rlsd_kernels.train.trainer import TIMING_KEYS, TrainConfig, Trainer, lam_at, train

from pinned import TINY, tiny_cfg as _cfg, train_backend


def _read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def _strip(hist):
    return [{k: v for k, v in h.items() if k not in TIMING_KEYS} for h in hist]


@pytest.mark.parametrize("method", ["rlsd", "grpo", "opsd"])
def test_smoke_run(tmp_path, method):
    res = train(_cfg(tmp_path, method, method=method, plot=(method == "rlsd")), log=lambda *_: None)
    out = tmp_path / method
    hist = _read_jsonl(out / "metrics.jsonl")
    assert [h["step"] for h in hist] == list(range(TINY["steps"] + 1))
    assert "eval_acc" in hist[0] and "eval_acc" in hist[-1]
    for key in ("reward_mean", "lam", "loss", "entropy", "tokens_per_s"):
        assert key in hist[-1]
    if method != "opsd":
        for key in ("weight_mean", "pg_clipfrac", "weight_clip_high_frac"):
            assert key in hist[-1]
    assert sum(h["grad_norm"] for h in hist[1:]) > 0  # the updates were not all empty
    assert (out / "warmstart.pt").exists() and os.listdir(out / "ckpt")
    if method == "rlsd":
        assert (out / "curves.png").exists()
    assert 0.0 <= res["final_acc"] <= 1.0


def test_resume_continues_exactly(tmp_path):
    steps = TINY["steps"]
    straight = train(_cfg(tmp_path, "straight", teacher_sync=3), log=lambda *_: None)["history"]
    train(_cfg(tmp_path, "split", teacher_sync=3, steps=steps // 2), log=lambda *_: None)
    ck = tmp_path / "split" / "ckpt" / f"step_{steps // 2:06d}.pt"
    assert ck.exists()
    resumed = train(_cfg(tmp_path, "split", steps=steps, resume=str(ck)), log=lambda *_: None)["history"]
    assert _strip(resumed) == _strip(straight)
    on_disk = _read_jsonl(tmp_path / "split" / "metrics.jsonl")
    assert _strip(on_disk) == _strip(straight)


def test_tests_stay_on_cpu_on_a_gpu_machine(tmp_path, monkeypatch):
    # With CUDA present, --device auto would pick it; the tests' configs must not depend on that.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    tr = Trainer(_cfg(tmp_path, "pinned"))
    assert tr.device.type == "cpu" and tr.backend == train_backend()
    assert next(tr.model.parameters()).device.type == "cpu"


def test_lam_schedule():
    c = TrainConfig(lam=0.5, lam_warmup_steps=0, lam_decay_steps=50)
    assert lam_at(c, 1) == 0.5 and lam_at(c, 26) == pytest.approx(0.25) and lam_at(c, 51) == 0.0
    c = TrainConfig(lam=0.5, lam_warmup_steps=10, lam_decay_steps=10)
    assert lam_at(c, 1) == pytest.approx(0.05) and lam_at(c, 10) == 0.5 and lam_at(c, 21) == 0.0
    assert lam_at(TrainConfig(method="grpo"), 1) == 0.0 and lam_at(TrainConfig(method="opsd"), 1) == 0.0
    assert lam_at(TrainConfig(lam_decay_steps=0), 1000) == 0.5


@pytest.mark.parametrize("argv, flag", [
    (["--method", "ppo"], "--method"),
    (["--lam", "1.5"], "--lam"),
    (["--group-size", "1"], "--group-size"),
    (["--lr", "-1"], "--lr"),
    (["--steps", "abc"], "--steps"),
    (["--backend", "cuda"], "--backend"),
    (["--model", "/nonexistent/model"], "--model"),
    (["--resume", "/nonexistent/ckpt.pt"], "--resume"),
    (["compare", "--methods", "grpo,foo"], "--methods"),
    (["compare", "--seeds", "0"], "--seeds"),
])
def test_bad_flags_exit_with_flag_name(argv, flag, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 2
    assert flag in capsys.readouterr().err


def test_unreadable_checkpoint(tmp_path, capsys):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="--resume: cannot read checkpoint"):
        Trainer(_cfg(tmp_path, "x", resume=str(bad)))
    with pytest.raises(SystemExit):
        cli.main(["--resume", str(bad), "--out", str(tmp_path / "y")])
    assert "--resume" in capsys.readouterr().err
    with pytest.raises(ValueError, match="--init-from"):
        Trainer(_cfg(tmp_path, "z", init_from=str(bad))).run(log=lambda *_: None)


def test_left_padding_does_not_change_logits(tmp_path):
    import torch

    tr = Trainer(_cfg(tmp_path, "pad"))
    prompts = [tr.tok.encode("1+2="), tr.tok.encode("1|3+2=")]  # different lengths: row 0 is left-padded
    resp = torch.tensor([[tr.tok.encode("3")[0], tr.tok.eos_id]] * 2)
    valid = torch.ones_like(resp, dtype=torch.bool)
    both = tr._logits(tr.model, prompts, resp, valid)
    alone = tr._logits(tr.model, prompts[:1], resp[:1], valid[:1])
    assert torch.isfinite(both).all()
    torch.testing.assert_close(both[:1], alone, rtol=1e-5, atol=1e-5)


def test_model_flag_loads_a_saved_checkpoint(tmp_path):
    train(_cfg(tmp_path, "a", steps=1), log=lambda *_: None)
    res = train(_cfg(tmp_path, "b", steps=1, warm_steps=0, model=str(tmp_path / "a" / "model")),
                log=lambda *_: None)
    assert len(res["history"]) == 2


def test_compare_writes_chart_and_table(tmp_path):
    from rlsd_kernels.train.compare import compare

    s = compare(["grpo", "rlsd"], 1, str(tmp_path / "cmp"), _cfg(tmp_path, "unused", steps=2, eval_every=1))
    assert set(s["rows"]) == {"grpo", "rlsd"}
    assert (tmp_path / "cmp" / "compare.png").exists()
    assert "| rlsd |" in (tmp_path / "cmp" / "compare.md").read_text()


@pytest.mark.parametrize("teacher_sync, terms", [
    (0, {}), (3, {}),
    (0, dict(method="grpo+opsd", kl_coef=0.05, entropy_coef=0.01)),  # the section 2c terms on both paths
    (3, dict(kl_coef=0.05, kl_type="k2")),
], ids=["live", "synced", "grpo+opsd+kl+entropy", "rlsd+kl"])
def test_fused_linear_matches_logits_path(tmp_path, teacher_sync, terms):
    # --fused-linear computes the same loss from hidden states + LM head: the first RL steps agree to float precision
    # (later steps may diverge through sampling, which amplifies any rounding difference).
    kw = dict(dict(method="rlsd", steps=2, teacher_sync=teacher_sync, eval_every=100), **terms)
    a = train(_cfg(tmp_path, "logits", **kw), log=lambda *_: None)["history"]
    b = train(_cfg(tmp_path, "fused", fused_linear=True, **kw), log=lambda *_: None)["history"]
    for key in ("loss", "weight_mean", "delta_mean", "entropy", "reward_mean"):
        assert b[1][key] == pytest.approx(a[1][key], rel=1e-4, abs=1e-6), key


def test_fused_linear_refuses_opsd(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--method", "opsd", "--fused-linear"])
    assert "--fused-linear" in capsys.readouterr().err
