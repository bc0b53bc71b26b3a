"""What a result was measured on: the VPS source (a hash and the git commit), the machine, the model, the load."""

from __future__ import annotations

import os
import platform
import subprocess
from typing import Any

import torch
from torch import nn

__all__ = ["code_fingerprint", "loadavg", "machine_info", "model_info"]


def loadavg() -> list[float] | None:
    """The 1/5/15-minute load average, rounded to 0.01; None where the platform has none."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def machine_info(model: nn.Module) -> dict[str, Any]:
    """Device, library versions, torch threads and CPU count of this process (``model`` gives the device)."""
    import transformers

    from .. import __version__

    device = next(model.parameters()).device
    info: dict[str, Any] = {
        "device": str(device), "device_name": platform.processor() or platform.machine(),
        "python": platform.python_version(), "platform": platform.platform(), "torch": torch.__version__,
        "transformers": transformers.__version__, "vps": __version__, "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(), "hostname": platform.node(),
    }
    if device.type == "cuda":
        info["device_name"] = torch.cuda.get_device_name(device)
    return info


def code_fingerprint() -> dict[str, Any]:
    """Which VPS code was measured: a hash of the package's source files and, where available, the git commit."""
    import hashlib
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent  # the whole vps package, not only this subpackage
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        digest.update(str(path.relative_to(root)).encode())
        digest.update(path.read_bytes())
    info: dict[str, Any] = {"source_sha256": digest.hexdigest()[:12], "git_commit": None, "git_dirty": None}
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                              timeout=10)
        if head.returncode == 0:
            info["git_commit"] = head.stdout.strip()
            dirty = subprocess.run(["git", "status", "--porcelain", "--", "."], cwd=root, capture_output=True,
                                   text=True, timeout=10)
            info["git_dirty"] = bool(dirty.stdout.strip()) if dirty.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        pass
    return info


def model_info(model: nn.Module, name: str | None) -> dict[str, Any]:
    """Name, class, type, parameter count and dtype of ``model`` (``name`` overrides the config's path)."""
    p = next(model.parameters())
    return {"name": name or getattr(model.config, "_name_or_path", None) or None, "class": type(model).__name__,
            "model_type": getattr(model.config, "model_type", None),
            "params": sum(x.numel() for x in model.parameters()), "dtype": str(p.dtype).removeprefix("torch.")}
