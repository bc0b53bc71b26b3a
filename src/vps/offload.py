"""Running a `VPSLinear` under accelerate's device hooks (docs/design.md §10).

A model dispatched by accelerate (``device_map``, `cpu_offload`, `disk_offload`) carries an
``AlignDevicesHook`` on its layers: before a layer's forward it moves the inputs to the layer's
execution device and, for an offloaded layer, loads the weight (which otherwise sits on the meta
device); after the forward it sends the weight back to meta. The plan reads rows and columns of W
*after* the base output, so the whole VPS forward, not only the base matmul, must run between the
hook's ``pre_forward`` and ``post_forward``. `hooked_call` arranges exactly that, and the base
matmul inside it calls the layer's unhooked forward so the weight is loaded once per forward.

Nothing here imports accelerate: a hook is recognised by the attributes accelerate itself sets
(``_hf_hook`` with ``pre_forward`` / ``post_forward``, ``_old_forward``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar, cast

import torch
from torch import nn

T = TypeVar("T")


def device_hook(module: nn.Module) -> Any | None:
    """The accelerate hook on ``module`` whose forward it wraps, or None."""
    # accelerate sets both as plain instance attributes. Read from the instance dict: a missing
    # attribute through nn.Module.__getattr__ raises and catches an AttributeError (~1 us), paid by
    # every patched layer on every forward, frozen decode steps included.
    attrs = module.__dict__
    hook = attrs.get("_hf_hook")
    if hook is None or "_old_forward" not in attrs:
        return None
    return hook


def execution_device(module: nn.Module) -> torch.device:
    """Where ``module`` computes: its hook's execution device if it has one, else its weight's device."""
    hook = device_hook(module)
    device = _hook_device(hook) if hook is not None else None
    if device is not None:
        return device
    return cast_device(module.weight.device)


def cast_device(device: Any) -> torch.device:
    """``device`` as a `torch.device` (accelerate also uses bare CUDA indices and strings)."""
    if isinstance(device, torch.device):
        return device
    if isinstance(device, int):
        return torch.device("cuda", device)
    return torch.device(device)


def _hook_device(hook: Any) -> torch.device | None:
    # A SequentialHook chains hooks; the last one that names a device decides where the module runs.
    hooks = getattr(hook, "hooks", None) or [hook]
    found = None
    for h in hooks:
        device = getattr(h, "execution_device", None)
        if device is not None:
            found = cast_device(device)
    return found


def hooked_call(module: nn.Module, x: torch.Tensor,
                body: Callable[[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]], T]) -> T:
    """Run ``body(x, base_forward)`` between ``module``'s device hook's pre- and post-forward.

    ``base_forward`` is the module's own (unhooked) forward: inside ``body`` the weight is already
    loaded on the execution device and ``x`` has been moved there. Without a hook this is
    ``body(x, module)``. The weight goes back (to meta, for an offloaded layer) even if ``body`` raises.
    """
    hook = device_hook(module)
    if hook is None:
        return body(x, module)
    args, _ = hook.pre_forward(module, x)
    try:
        y = body(args[0], module._old_forward)  # type: ignore[arg-type]
    except BaseException:
        hook.post_forward(module, None)
        raise
    return cast(T, hook.post_forward(module, y))
