"""--resume never touches another run: it continues in the resumed run's own folder to its own --steps unless
flags say otherwise, a different --out continues in a copy, and rotation only deletes the run's own checkpoints.
Runs go through the command line (which knows the flags actually given), pinned to the CPU."""
import hashlib
import json
import os

import pytest

from rlsd_kernels.train import cli
from rlsd_kernels.train.checkpoint import Rotation, run_dir_of
from rlsd_kernels.train.trainer import TIMING_KEYS, TrainConfig, Trainer

from pinned import TINY_FLAGS


def _run(*argv):
    assert cli.main([*TINY_FLAGS, "--no-save-model", *argv]) == 0


def _history(folder):
    with open(os.path.join(folder, "metrics.jsonl")) as f:
        return [{k: v for k, v in json.loads(line).items() if k not in TIMING_KEYS} for line in f]


def _ckpts(folder):
    return sorted(os.listdir(os.path.join(folder, "ckpt")))


def _snapshot(folder):
    """Every file under ``folder`` with a hash of its bytes."""
    out = {}
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, folder)] = hashlib.sha256(f.read()).hexdigest()
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A finished 4-step run ``a`` (checkpoints at steps 2 and 4) and a straight 6-step run of the same settings."""
    base = tmp_path_factory.mktemp("runs")
    _run("--out", str(base / "a"))
    _run("--out", str(base / "straight6"), "--steps", "6")
    return base


@pytest.fixture
def run_a(runs, tmp_path):
    """A private copy of run ``a`` (tests may change it)."""
    import shutil

    shutil.copytree(runs / "a", tmp_path / "a")
    return tmp_path / "a"


def test_resume_continues_in_its_own_folder_to_its_own_steps(run_a, tmp_path, monkeypatch):
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # the default --out (runs/train) would land here
    full = _history(run_a)
    assert [h["step"] for h in full] == [0, 1, 2, 3, 4]
    # from the middle of the run: trains steps 3-4 again, in run a's folder, exactly as the first time
    _run("--resume", str(run_a / "ckpt" / "step_000002.pt"))
    assert _history(run_a) == full
    assert _ckpts(run_a) == ["step_000002.pt", "step_000004.pt"]
    # a finished run: nothing to train, it stays at its own 4 steps
    _run("--resume", str(run_a))
    assert _history(run_a) == full
    assert os.listdir(elsewhere) == []  # no runs/train: nothing was written outside the resumed run


def test_resume_with_steps_extends_the_run(runs, run_a):
    _run("--resume", str(run_a), "--steps", "6")
    assert _history(run_a) == _history(runs / "straight6")  # as if it had been a 6-step run from the start
    # the run's own step_2 was rotated out (keep 2): a run resumed in its folder keeps rotating its checkpoints
    assert _ckpts(run_a) == ["step_000004.pt", "step_000006.pt"]


def test_resume_into_another_out_copies_and_leaves_the_original_alone(run_a, tmp_path):
    before = _snapshot(run_a)
    copy = tmp_path / "copy"
    # every step checkpointed with keep 1: rotation runs, and must only touch the copy's own files
    _run("--resume", str(run_a / "ckpt" / "step_000002.pt"), "--out", str(copy), "--ckpt-every", "1",
         "--keep-checkpoints", "1")
    assert _snapshot(run_a) == before
    assert _history(copy) == _history(run_a)
    assert _ckpts(copy) == ["step_000004.pt"]


def test_resume_refuses_math_flags_that_differ(run_a, capsys):
    for argv, flag in ((["--lr", "0.5"], "--lr"), (["--steps", "1"], "--steps"),
                       (["--init-from", str(run_a / "warmstart.pt")], "--init-from")):
        with pytest.raises(SystemExit) as e:
            cli.main([*TINY_FLAGS, "--resume", str(run_a), *argv])
        assert e.value.code == 2
        assert f"{flag}: " in capsys.readouterr().err
    # the same value as the run's own is not a change
    cfg = Trainer(TrainConfig(resume=str(run_a), lr=1e-4, device="cpu"), given={"resume", "lr", "device"}).cfg
    assert cfg.lr == 1e-4


def test_api_resume_takes_the_run_settings(run_a):
    # Through the API, the fields that differ from the defaults count as given.
    cfg = Trainer(TrainConfig(resume=str(run_a), device="cpu")).cfg
    assert os.path.samefile(cfg.out, run_a) and cfg.steps == 4 and cfg.digits == 1 and cfg.ckpt_every == 2


def test_rotation_deletes_only_its_own_checkpoints(tmp_path):
    (tmp_path / "ckpt").mkdir()
    foreign = tmp_path / "ckpt" / "step_000001.pt"  # written by another run in the same folder
    foreign.write_bytes(b"x")
    rot = Rotation(str(tmp_path), keep=1, written=["../escape.pt"])  # a name that is not ours is dropped
    assert rot.written == []
    for step in (2, 3):
        path, stale = rot.add(step)
        open(path, "wb").close()
        Rotation.delete(stale)
    assert _ckpts(tmp_path) == ["step_000001.pt", "step_000003.pt"]
    assert rot.written == ["step_000003.pt"]


def test_run_dir_of_checkpoint_layout(tmp_path):
    assert run_dir_of(str(tmp_path / "r" / "ckpt" / "step_000002.pt")) == str(tmp_path / "r")
    assert run_dir_of(str(tmp_path / "r" / "warmstart.pt")) == str(tmp_path / "r")
