"""Packaging for rlsd-kernels.

torch is deliberately *not* a build requirement: the C++ CPU backend is compiled on first use with
torch.utils.cpp_extension, so `pip install -e .` works with build isolation and no torch in the build env.
"""
from setuptools import find_packages, setup

setup(
    name="rlsd-kernels",
    version="0.1.0",
    description="Fused RLSD (Self-Distilled RLVR) loss: Triton GPU kernels, C++ CPU backend, eager reference, trainer",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["rlsd_kernels", "rlsd_kernels.*", "bench", "bench.*"]) + ["rlsd_kernels.csrc"],
    # The C++ CPU backend's sources live in the top-level csrc/ and ship inside the package as rlsd_kernels/csrc,
    # where rlsd_kernels.backends.logits.cpp looks for them in an installed package (a checkout uses csrc/ directly).
    package_dir={"rlsd_kernels.csrc": "csrc"},
    package_data={"rlsd_kernels.csrc": ["*.cpp", "*.h"]},
    install_requires=[
        # No version floor that 2.13.0 fails: an unpinned resolve would pull CUDA wheels on CPU machines.
        "torch>=2.4",
        "triton>=3.0; platform_system == 'Linux'",
        "numpy",
        "transformers>=4.40",
        "tokenizers",
        "tqdm",
        "matplotlib",
    ],
    extras_require={
        "test": ["pytest>=7", "hypothesis>=6"],
        # rlsd_kernels.integrations.trl overrides GRPOTrainer internals: the TRL minor version it was tested with
        "trl": ["trl>=1.16.0,<1.17"],
        # verl 0.9.1 (the tested version) pins transformers>=5.5.3,<5.11; its trainer modules also import
        # cachetools, fastapi and uvicorn, which only its heavy "verl-core" extra lists
        "verl": ["verl==0.9.1", "cachetools", "fastapi", "uvicorn"],
    },
    entry_points={
        "console_scripts": [
            "rlsd-train=rlsd_kernels.train.cli:main",
            "rlsd-bench=bench.__main__:main",
        ],
        # verl imports every "verl.plugins" entry point on `import verl` (VERL_USE_EXTERNAL_PLUGINS=auto, its default)
        "verl.plugins": ["rlsd_kernels=rlsd_kernels.integrations.verl"],
    },
)
