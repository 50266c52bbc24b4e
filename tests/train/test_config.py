"""Settings of the trainer: device and backend decision (through dispatch.select_backend), loss hyper-parameter
bounds shared with the API, and the -h text. Nothing here trains."""
import math
import re

import pytest
import torch

from rlsd_kernels import dispatch, rlsd_loss
from rlsd_kernels.dispatch import force_backend
from rlsd_kernels.train import cli
from rlsd_kernels.train import trainer as trainer_module
from rlsd_kernels.train.config import TrainConfig, choose_backend, choose_device, validate


@pytest.fixture
def fake_cuda(monkeypatch):
    """A machine that reports a CUDA device (the decision code only asks torch.cuda.is_available)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)


def test_auto_device_is_cuda_when_available(fake_cuda):
    assert choose_device(TrainConfig()).type == "cuda"
    assert choose_device(TrainConfig(device="cpu")).type == "cpu"


def test_auto_device_is_cpu_without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert choose_device(TrainConfig()).type == "cpu"
    with pytest.raises(ValueError, match="^--device: cuda requested"):
        choose_device(TrainConfig(device="cuda"))


def test_auto_backend_is_triton_on_cuda():
    assert choose_backend(TrainConfig(), torch.device("cuda")) == "triton"


def test_auto_backend_on_cpu_never_the_interpreter():
    # tests/conftest.py sets TRITON_INTERPRET=1 here; training must still not run on the interpreter
    assert choose_backend(TrainConfig(), torch.device("cpu")) in ("cpp", "reference")


def test_forced_cpp_cannot_serve_cuda():
    with pytest.raises(ValueError, match="^--backend: backend 'cpp' cannot serve cuda"):
        choose_backend(TrainConfig(backend="cpp"), torch.device("cuda"))


def test_forced_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.setattr(dispatch, "interpreter_on", lambda: False)
    with pytest.raises(ValueError, match="^--backend: backend 'triton' cannot serve cpu"):
        choose_backend(TrainConfig(backend="triton"), torch.device("cpu"))


def test_forced_reference_serves_any_device():
    assert choose_backend(TrainConfig(backend="reference"), torch.device("cuda")) == "reference"


def test_bad_backend_raises_before_the_model_is_built(tmp_path, fake_cuda, monkeypatch):
    def must_not_build(*a, **k):
        raise AssertionError("the model was built before the flags were validated")

    monkeypatch.setattr(trainer_module, "build_tiny_model", must_not_build)
    with pytest.raises(ValueError, match="^--backend:"):
        trainer_module.Trainer(TrainConfig(backend="cpp", out=str(tmp_path / "x")))  # --device auto -> cuda


def test_cli_bad_backend_for_device(fake_cuda, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--backend", "cpp", "--device", "cuda"])
    assert e.value.code == 2
    assert "--backend: backend 'cpp' cannot serve cuda" in capsys.readouterr().err


# --------------------------------------------------------------------------------- loss hyper-parameter bounds
HYPER_CASES = [("eps_w", 0.0), ("eps_w", 0.5), ("eps_w", 1.0), ("eps_w", -0.1), ("eps_w", math.nan),
               ("clip_low", 0.0), ("clip_low", 1.0), ("clip_high", 0.0), ("clip_high", -0.1),
               ("clip_dual", 1.0), ("clip_dual", 1.5), ("lam", 0.0), ("lam", 1.0), ("lam", 1.01), ("lam", math.inf),
               ("loss_type", "cispo"), ("loss_type", "dpo")]


def _api_accepts(name, value):
    logits = torch.zeros(2, 3)
    try:
        with force_backend("reference"):
            rlsd_loss(logits, logits, torch.tensor([0, 1]), torch.ones(2), **{name: value})
    except ValueError:
        return False
    return True


@pytest.mark.parametrize("name, value", HYPER_CASES)
def test_trainer_and_api_agree_on_loss_hyper_parameters(name, value):
    flag = "--" + name.replace("_", "-")
    try:
        validate(TrainConfig(**{name: value}, device="cpu"))
        trainer_accepts = True
    except ValueError as e:
        trainer_accepts = False
        assert str(e).startswith(f"{flag}: {name}"), str(e)  # the API's message, prefixed with the flag
    assert trainer_accepts == _api_accepts(name, value)


def test_eps_w_zero_is_accepted_and_one_names_the_flag(capsys):
    validate(TrainConfig(eps_w=0.0, device="cpu"))  # w clipped to exactly 1: the evidence weight switched off
    with pytest.raises(SystemExit):
        cli.main(["--eps-w", "1"])
    assert "--eps-w: eps_w must be < 1.0, got 1.0" in capsys.readouterr().err


def test_loss_hyper_bundles_the_op_settings():
    h = TrainConfig(eps_w=0.1, clip_high=0.3, loss_type="cispo", lam=0.7).loss_hyper()
    assert (h.lam, h.eps_w, h.clip_high, h.loss_type) == (0.7, 0.1, 0.3, "cispo")
    assert TrainConfig().loss_hyper(lam=0.0).lam == 0.0


# ------------------------------------------------------------------------------------------------------- help
def _option_blocks(help_text):
    """{first flag: its whole help text} from argparse's options section."""
    blocks, current = {}, None
    for line in help_text.split("options:", 1)[1].splitlines():
        m = re.match(r"^  (-\S+)", line)
        if m:
            current = m.group(1).rstrip(",")
            blocks[current] = line
        elif current is not None:
            blocks[current] += " " + line.strip()
    return {k: " ".join(v.split()) for k, v in blocks.items()}


@pytest.mark.parametrize("parser", [cli.train_parser, cli.compare_parser, cli.ablate_parser])
def test_help_shows_each_default_once(parser):
    blocks = _option_blocks(parser().format_help())
    assert len(blocks) > 10
    for opt, text in blocks.items():
        if opt != "-h":
            assert text.count("(default:") == 1, text


def test_help_lists_every_setting_with_its_default():
    blocks = _option_blocks(cli.train_parser().format_help())
    for name, default in TrainConfig().to_dict().items():
        text = blocks["--" + name.replace("_", "-")]
        if default is not None:
            assert f"(default: {default})" in text, text
