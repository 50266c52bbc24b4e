"""A short RLSD training on CUDA with --device auto / --backend auto: it must pick CUDA and Triton and train with
finite metrics (a few seconds on an H100, most of it Triton compilation). Skipped without a GPU."""
import math

import pytest
import torch

from rlsd_kernels import dispatch
from rlsd_kernels.train.trainer import TrainConfig, Trainer

from pinned import TINY


@pytest.mark.gpu
@pytest.mark.parametrize("fused_linear", [False, True], ids=["logits", "fused_linear"])
def test_rlsd_trains_on_cuda_with_triton(tmp_path, monkeypatch, fused_linear):
    chosen = []
    real = dispatch.select_backend

    def spy(device, **kw):  # every backend decision the op makes during the run
        name = real(device, **kw)
        chosen.append((torch.device(device).type, name))
        return name

    monkeypatch.setattr(dispatch, "select_backend", spy)
    cfg = TrainConfig(**{**TINY, "out": str(tmp_path / "run"), "warm_steps": 10, "steps": 3, "eval_every": 3,
                         "teacher_sync": 2, "save_model": False, "fused_linear": fused_linear})
    assert (cfg.device, cfg.backend) == ("auto", "auto")
    tr = Trainer(cfg)
    assert tr.device.type == "cuda" and tr.backend == "triton"
    res = tr.run(log=lambda *_: None)
    assert next(tr.model.parameters()).is_cuda
    # every decision, the fused linear op's chunks included, is Triton on CUDA
    assert set(chosen) == {("cuda", "triton")}, set(chosen)
    hist = res["history"]
    assert [h["step"] for h in hist] == [0, 1, 2, 3]
    for h in hist[1:]:
        for key in ("loss", "entropy", "grad_norm", "weight_mean", "delta_mean", "reward_mean"):
            assert math.isfinite(h[key]), (key, h)
    assert h["lam"] > 0 and 0.0 <= res["final_acc"] <= 1.0
