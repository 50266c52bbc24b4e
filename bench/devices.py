"""Device names, result-file slugs and peak memory bandwidths (for the achieved-bandwidth fraction)."""
from __future__ import annotations

import os
import platform
import re
import sys
from typing import Optional

import torch

# Peak DRAM bandwidth in bytes/s by (lower-case) substring of torch.cuda.get_device_name(); first match wins, so
# the more specific names come first. Vendor datasheet figures.
PEAK_BW = [
    ("gh200", 4.0e12),  # GH200 96 GB HBM3 (the 144 GB HBM3e part is 4.9 TB/s)
    ("h200", 4.8e12),
    ("h100 nvl", 3.9e12),
    ("h100 pcie", 2.0e12),
    ("h100", 3.35e12),  # "NVIDIA H100 80GB HBM3" = SXM
    ("h800 pcie", 2.0e12),
    ("h800", 3.35e12),
    ("b200", 8.0e12),
    ("a100-sxm4-80gb", 2.039e12),
    ("a100 80gb pcie", 1.935e12),
    ("a100-pcie-80gb", 1.935e12),
    ("a100", 1.555e12),  # 40 GB parts
    ("a800", 2.039e12),
    ("l40s", 0.864e12),
    ("l40", 0.864e12),
    ("l4", 0.300e12),
    ("a10g", 0.600e12),
    ("a10", 0.600e12),
    ("rtx 4090", 1.008e12),
    ("rtx 3090", 0.936e12),
    ("v100", 0.900e12),
    ("t4", 0.320e12),
    ("mi300x", 5.3e12),
    ("mi250", 3.2e12),
]


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return cpu_model()


def device_slug(device: torch.device) -> str:
    return f"{device.type}-{slug(device_name(device))}"


def peak_bandwidth(device: torch.device) -> Optional[float]:
    """Bytes/s, or None when unknown (CPU, or a GPU missing from the table; override with --peak-bw-tbs)."""
    if device.type != "cuda":
        return None
    name = device_name(device).lower()
    for key, bw in PEAK_BW:
        if key in name:
            return bw
    return None


def cpu_threads() -> int:
    return torch.get_num_threads()


def host_info() -> dict:
    return {"platform": platform.platform(), "python": platform.python_version(), "cpu": cpu_model(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads()}


def versions() -> dict:
    """Versions of what the numbers depend on (``None`` for what is not importable)."""
    v = {"torch": torch.__version__, "python": sys.version.split()[0]}
    for mod in ("triton", "rlsd_kernels", "liger_kernel", "numpy"):
        try:
            m = __import__(mod)
            v[mod] = getattr(m, "__version__", "unknown")
        except Exception:
            v[mod] = None
    try:
        from importlib.metadata import version
        v["liger_kernel"] = version("liger-kernel") if v["liger_kernel"] else None
    except Exception:
        pass
    if torch.version.cuda:
        v["cuda"] = torch.version.cuda
    return v
