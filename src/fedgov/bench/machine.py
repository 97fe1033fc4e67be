"""What a benchmark ran on: CPU model and cores, GPU, memory, library versions, fedgov commit."""

from __future__ import annotations

import os
import platform
import re
from importlib import metadata
from pathlib import Path
from typing import Any

from ..provenance import code_version

__all__ = ["describe_machine", "machine_slug"]

_LIBRARIES = ("torch", "flwr", "opacus", "tenseal", "numpy", "scikit-learn", "ray")


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _memory_gb() -> float | None:
    try:
        text = Path("/proc/meminfo").read_text()
        kb = int(re.search(r"MemTotal:\s+(\d+)", text).group(1))  # type: ignore[union-attr]
        return round(kb / 2**20, 1)
    except (OSError, AttributeError, ValueError):
        return None


def describe_machine() -> dict[str, Any]:
    import torch

    cores = os.cpu_count() or 1
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else cores
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    versions = {}
    for name in _LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return {
        "hostname": platform.node(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_model": _cpu_model(),
        "cpu_cores": cores,
        "cpu_cores_usable": usable,
        "memory_gb": _memory_gb(),
        "gpu": gpu,
        "gpu_count": torch.cuda.device_count() if gpu else 0,
        "cuda": torch.version.cuda if gpu else None,
        "libraries": versions,
        # The commit alone; results.json ``code`` says which code measured (fedgov.provenance).
        "fedgov_commit": code_version()["git_commit"],
    }


def machine_slug(machine: dict[str, Any]) -> str:
    """A folder-name summary such as ``nvidia-h100-80gb-hbm3-16c`` or ``amd-epyc-7b13-2c``."""
    name = machine.get("gpu") or machine.get("cpu_model") or "machine"
    name = re.sub(r"\(r\)|\(tm\)|cpu|processor|\d+-core|@.*$", "", name.lower())
    slug = re.sub(r"[^a-z0-9]+", "-", name).strip("-")[:40].strip("-")
    return f"{slug}-{machine.get('cpu_cores_usable', machine.get('cpu_cores', 1))}c"
