"""The suite's own device logic, checked without a GPU: every backend a test runs is paired with a device it can
serve on a GPU machine too, and a test that forces Triton cannot build a tensor on the wrong device unnoticed.

On an H200 67 tests failed because they built CPU tensors while forcing Triton (or mixed CPU and CUDA tensors);
on a CPU machine the interpreter serves CPU tensors, so nothing showed. Three guards close that gap:
1. the backend params of a simulated GPU machine all pass the dispatcher's own device check;
2. ``running_on`` arms :class:`helpers.DeviceTrap` for Triton (tensors must name their device), on every machine;
3. tests force Triton only through ``running_on`` (the fixtures use it), so the trap cannot be bypassed.
"""
import ast
import pathlib

import pytest
import torch

import helpers
from helpers import Backend, DeviceTrapError, backend_params, linear_params, make_inputs, running_on
from rlsd_kernels import dispatch, rlsd_loss
from rlsd_kernels.backends.logits import cpp
from rlsd_kernels.linear import linear_backend

TESTS = pathlib.Path(__file__).resolve().parent


@pytest.fixture
def gpu_machine(monkeypatch):
    """What conftest reads, as on a CUDA machine with TRITON_INTERPRET unset and a C++ compiler."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(dispatch, "interpreter_on", lambda: False)
    monkeypatch.setattr(cpp, "available", lambda: True)
    monkeypatch.setattr(dispatch, "_cpp_available", lambda: True)
    monkeypatch.delenv("RLSD_BACKEND", raising=False)


def test_gpu_machine_pairs_every_backend_with_a_device_it_serves(gpu_machine):
    backends = helpers.machine_backends()
    assert {(str(b), b.device.type) for b in backends} == {("triton", "cuda"), ("cpp", "cpu"), ("reference", "cpu")}
    for b in backends:  # the dispatcher's own check: a forced backend that cannot serve the device raises
        assert dispatch.select_backend(b.device, forced=str(b)) == b
    for b in linear_params(backends):
        with running_on(b):
            assert linear_backend(b.device) == b.linear
    assert [b.linear for b in linear_params(backends)] == ["cpp", "triton"]


@pytest.mark.parametrize("cuda,interpret", [(False, True), (False, False), (True, True), (True, False)])
def test_every_machine_pairs_backends_with_servable_devices(monkeypatch, cuda, interpret):
    monkeypatch.setattr(dispatch, "interpreter_on", lambda: interpret)
    monkeypatch.setattr(dispatch, "_cpp_available", lambda: True)
    monkeypatch.delenv("RLSD_BACKEND", raising=False)
    backends = backend_params(cuda=cuda, interpret=interpret, triton=True, cpp=True)
    assert ("triton" in backends) == (cuda or interpret) and "cpp" in backends and "reference" in backends
    for b in backends:
        dispatch.select_backend(b.device, forced=str(b))
        assert b.device.type == ("cuda" if b == "triton" and cuda else "cpu")


def test_trap_refuses_tensors_without_a_device_under_triton():
    triton = Backend("triton", "cpu")  # the interpreter's pairing: the trap works the same on every machine
    with running_on(triton):
        with pytest.raises(DeviceTrapError, match=r"test_device_pairing.py:\d+: torch.randn"):
            torch.randn(3)
        with pytest.raises(DeviceTrapError, match="make_inputs without device="):
            make_inputs()
        with pytest.raises(DeviceTrapError, match="torch.empty"):  # a module built on the default device
            torch.nn.Linear(2, 3)
        torch.randn(3, device=triton.device)
        torch.zeros_like(torch.ones(2, device="cpu"))  # explicit host data, and tensors that inherit a device
        with torch.device(triton.device):
            torch.nn.Linear(2, 3)
        make_inputs(device=triton.device)
    torch.randn(3)  # disarmed afterwards
    with running_on(Backend("cpp", "cpu")):  # CPU-only backends: the default device is the right one
        torch.randn(3)


def test_trap_catches_cpu_inputs_given_to_triton():
    """The H200 failure, reproduced on a CPU machine: test_api's tensors without a device, Triton forced."""
    if not any(b == "triton" for b in helpers.machine_backends()):
        pytest.skip("no triton")
    with running_on(Backend("triton", "cpu")):
        with pytest.raises(DeviceTrapError, match="make_inputs"):
            rlsd_loss(**make_inputs(B=2, T=3, V=11))


def _force_calls(tree):
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        name = getattr(node.func, "attr", getattr(node.func, "id", None))
        if name == "force_backend" and node.args:
            yield node, node.args[0]
        elif name == "setenv" and len(node.args) == 2 and getattr(node.args[0], "value", None) == "RLSD_BACKEND":
            yield node, node.args[1]


def test_tests_force_triton_only_through_running_on():
    """``force_backend("triton")`` (or a backend chosen at run time) would bypass the trap: use ``running_on``."""
    bad = []
    for path in sorted(TESTS.rglob("*.py")):
        if path.name == "helpers.py":
            continue
        for node, arg in _force_calls(ast.parse(path.read_text(encoding="utf-8"))):
            if not (isinstance(arg, ast.Constant) and arg.value in ("cpp", "reference", None)):
                bad.append(f"{path.relative_to(TESTS)}:{node.lineno}: {ast.unparse(node)}")
    assert not bad, "force Triton through helpers.running_on (or the backend fixtures):\n" + "\n".join(bad)
