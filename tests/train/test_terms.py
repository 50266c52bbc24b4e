"""The trainer's SPEC 2c flags (--kl-coef/--kl-type, --entropy-coef, --distill-coef/--distill-divergence), the
grpo+opsd method, the bootstrap statistics of `compare` and the `ablate` subcommand. Runs are tiny and on the CPU."""
import json

import pytest
import torch

from rlsd_kernels import rlsd_loss
from rlsd_kernels.reference import rlsd_loss_eager
from rlsd_kernels.train import cli
from rlsd_kernels.train.config import TrainConfig, validate
from rlsd_kernels.train.losses import policy_loss
from rlsd_kernels.train.stats import bootstrap_ci, per_seed_stats
from rlsd_kernels.train.trainer import TIMING_KEYS, train

from pinned import TINY, TINY_FLAGS, tiny_cfg as _cfg


def _strip(hist):
    return [{k: v for k, v in h.items() if k not in TIMING_KEYS} for h in hist]


def _batch(seed=0, B=4, T=5, V=7):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(B, T, V, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randn(B, T, V, generator=g, dtype=torch.float64)
    labels = torch.randint(0, V, (B, T), generator=g)
    mask = torch.rand(B, T, generator=g) > 0.2
    adv = torch.randn(B, generator=g, dtype=torch.float64)[:, None].expand(B, T).contiguous()
    ref = torch.log_softmax(torch.randn(B, T, V, generator=g, dtype=torch.float64), -1).gather(
        -1, labels[..., None])[..., 0]
    return s, t, labels, adv, mask, ref


def test_policy_loss_without_terms_is_the_fused_op():
    s, t, labels, adv, mask, _ = _batch()
    hyper = TrainConfig().loss_hyper(lam=0.5).__dict__
    got = policy_loss(s, t, labels, adv, mask, hyper, {})
    want = rlsd_loss(s, t, labels, adv, mask=mask, return_entropy=True, **hyper)
    assert torch.equal(got.loss, want.loss)


@pytest.mark.parametrize("terms", [dict(kl_coef=0.1, kl_type="k3"), dict(entropy_coef=0.01),
                                   dict(distill_coef=0.5, distill_divergence="jsd")])
def test_policy_loss_with_terms_is_the_fused_op_with_them(terms):
    s, t, labels, adv, mask, ref = _batch(1)
    hyper = TrainConfig().loss_hyper(lam=0.0).__dict__
    got = policy_loss(s, t, labels, adv, mask, hyper, terms, ref)
    want = rlsd_loss_eager(s, t, labels, adv, mask=mask, ref_logprobs=ref, **hyper, **terms)
    plain = rlsd_loss_eager(s, t, labels, adv, mask=mask, **hyper)
    torch.testing.assert_close(got.loss.double(), want.loss, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(got.loss.double(), plain.loss)
    (g,) = torch.autograd.grad(got.loss, s)
    (g_ref,) = torch.autograd.grad(want.loss, s)
    torch.testing.assert_close(g, g_ref, rtol=1e-5, atol=1e-6)


def test_extra_terms_resolve_against_the_method():
    assert TrainConfig().extra_terms() == {}
    assert TrainConfig(method="grpo+opsd").extra_terms() == {"distill_coef": 1.0, "distill_divergence": "forward_kl"}
    assert TrainConfig(method="grpo+opsd", distill_coef=0.3).distill == 0.3
    assert TrainConfig(kl_coef=0.1, kl_type="k1", entropy_coef=0.01).extra_terms() == {
        "kl_coef": 0.1, "kl_type": "k1", "entropy_coef": 0.01}


def test_grpo_opsd_run_has_lam_zero_and_the_distillation_term(tmp_path):
    hist = train(_cfg(tmp_path, "go", method="grpo+opsd", teacher_sync=2), log=lambda *_: None)["history"]
    rl = hist[1:]
    assert all(h["lam"] == 0.0 for h in rl)
    assert all(h["distill_mean"] > 0 for h in rl) and "weight_mean" in rl[-1]


def test_kl_and_entropy_terms_train_and_resume_exactly(tmp_path):
    kw = dict(method="rlsd", kl_coef=0.2, kl_type="k2", entropy_coef=0.01, distill_coef=0.1,
              distill_divergence="reverse_kl", teacher_sync=3)
    steps = TINY["steps"]
    straight = train(_cfg(tmp_path, "straight", **kw), log=lambda *_: None)["history"]
    assert {"kl_mean", "entropy_mean", "distill_mean"} <= set(straight[-1])
    assert straight[1]["kl_mean"] == pytest.approx(0.0, abs=1e-6)  # step 1: the policy is still the reference
    assert straight[-1]["kl_mean"] > 0
    train(_cfg(tmp_path, "split", **kw, steps=steps // 2), log=lambda *_: None)
    ck = tmp_path / "split" / "ckpt" / f"step_{steps // 2:06d}.pt"
    saved = torch.load(ck, weights_only=False)
    assert saved["reference"] is not None
    assert {k: saved["config"][k] for k in kw} == kw  # the new fields round-trip through the checkpoint
    resumed = train(_cfg(tmp_path, "split", steps=steps, resume=str(ck)), log=lambda *_: None)["history"]
    assert _strip(resumed) == _strip(straight)


def test_resume_refuses_a_different_kl_coef(tmp_path, capsys):
    out = tmp_path / "r"
    assert cli.main([*TINY_FLAGS, "--no-save-model", "--out", str(out), "--kl-coef", "0.1"]) == 0
    with pytest.raises(SystemExit):
        cli.main([*TINY_FLAGS, "--resume", str(out), "--kl-coef", "0.2"])
    assert "--kl-coef: " in capsys.readouterr().err


@pytest.mark.parametrize("argv, flag", [
    (["--method", "grpo+opsd", "--distill-coef", "0"], "--distill-coef"),
    (["--kl-coef", "-0.1"], "--kl-coef"),
    (["--entropy-coef", "nan"], "--entropy-coef"),
    (["--kl-type", "k4"], "--kl-type"),
    (["--distill-divergence", "tv"], "--distill-divergence"),
    (["--method", "opsd", "--entropy-coef", "0.1"], "--entropy-coef"),
    (["--fused-linear", "--method", "grpo+opsd", "--teacher-sync", "5"], "--fused-linear"),
    (["--task", "chainsum", "--operands", "2"], "--operands"),
    (["compare", "--methods", "grpo,grpo+opsd", "--distill-coef", "0"], "--distill-coef"),
    (["ablate", "--seeds", "0"], "--seeds"),
])
def test_bad_term_flags_exit_with_flag_name(argv, flag, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 2
    assert flag in capsys.readouterr().err


def test_validate_names_the_flag():
    with pytest.raises(ValueError, match="--distill-coef"):
        validate(TrainConfig(method="grpo+opsd", distill_coef=0.0, device="cpu"))
    validate(TrainConfig(method="grpo+opsd", device="cpu"))  # the default coefficient is on


def test_bootstrap_interval_is_seeded_and_brackets_the_mean():
    x = [0.1, 0.4, 0.35, 0.2, 0.5]
    mean, lo, hi = bootstrap_ci(x)
    assert bootstrap_ci(x) == (mean, lo, hi)
    assert mean == pytest.approx(0.31) and min(x) <= lo < mean < hi <= max(x)
    assert bootstrap_ci([0.3, 0.3]) == pytest.approx((0.3, 0.3, 0.3))
    with pytest.raises(ValueError, match="values"):
        bootstrap_ci([])


def test_per_seed_stats():
    import numpy as np

    curves = {"steps": [0, 1, 2, 3, 4, 8], "acc": np.array([[0.0, 0.2, 0.4, 0.1, 0.3, 0.5]]),
              "hint": np.array([[0.9, 0.8, 0.7, 0.9, 0.9, 0.6]])}
    s = per_seed_stats(curves)
    assert s["early"] == [pytest.approx(0.3)]  # steps 1 and 2 (<= 8 // 4)
    assert s["auc"] == [pytest.approx(0.3)] and s["best"] == [0.5] and s["final"] == [0.5]
    assert s["hint_min"] == [0.6] and s["hint_final"] == [0.6]


def test_compare_with_grpo_opsd_and_ablate_share_warm_starts(tmp_path, capsys):
    out = tmp_path / "cmp"
    flags = [*TINY_FLAGS, "--no-save-model", "--task", "chainsum", "--digits", "1", "--operands", "3",
             "--seeds", "2", "--out", str(out)]
    assert cli.main(["compare", "--methods", "rlsd,grpo+opsd", *flags]) == 0
    summary = json.loads((out / "compare.json").read_text())
    row = summary["rows"]["grpo+opsd"]
    assert len(row["per_seed"]["final"]) == 2 and set(row["ci"]) >= {"early", "auc", "best", "final", "hint_min"}
    assert "| grpo+opsd |" in (out / "compare.md").read_text() and (out / "compare.png").exists()
    rlsd_before = (out / "seed0" / "rlsd" / "metrics.jsonl").read_text()
    capsys.readouterr()
    assert cli.main(["ablate", *flags]) == 0
    log = capsys.readouterr().out
    assert "supervised steps" not in log  # the compare's warm starts were reused
    ab = json.loads((out / "ablate.json").read_text())
    assert list(ab["rows"]) == ["rlsd", f"rlsd-lam-decay-{TINY['steps']}", "rlsd-eps_w-0.5", "rlsd-live-teacher"]
    assert ab["variants"]["rlsd-live-teacher"] == {"method": "rlsd", "teacher_sync": 0}
    assert (out / "seed0" / "rlsd" / "metrics.jsonl").read_text() == rlsd_before  # reused, not rerun
