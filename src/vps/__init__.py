"""vps: Virtual Parameter Sharpening for HuggingFace causal language models.

``y = W x + gamma * (x A) B^T`` with ``A = W^T V``, ``B = W U`` and selectors U, V built on the fly
from activation statistics. Patch a model in one line::

    import vps
    model, tok = vps.load_model()
    vps.patch(model, vps.VPSConfig())
"""

# ruff: noqa: F401  (the TYPE_CHECKING imports name the lazily loaded exports for type checkers)
from __future__ import annotations

from typing import TYPE_CHECKING

from ._lazy import lazy_exports
from ._version import __version__

# Public name -> the module that defines it. Loaded on first use (PEP 562), so that `import vps` and the
# command line's `--help` do not pay for torch and transformers until something needs them.
_EXPORTS = {
    "VPSConfig": "config", "ConfigError": "config",
    "patch": "patching", "unpatch": "patching", "patched": "patching", "disabled": "patching",
    "is_patched": "patching", "get_config": "patching", "reset_state": "patching", "reuse_selection": "patching",
    "static_plans": "patching",
    "clear_gradients": "patching", "vps_layers": "patching", "PatchError": "patching",
    "load_model": "models", "ModelLoadError": "models",
    "VPSLinear": "layer", "make_builder": "builders", "SKBuilder": "builders", "SCBuilder": "builders",
    "HybridBuilder": "builders", "spectral_clip": "spectral",
    "refine": "refinement", "refine_many": "refinement", "RefineConfig": "refinement", "RefineResult": "refinement",
    "SampleCache": "refinement", "EphemeralLBFGS": "refinement",
    "trace": "tracing", "summarize": "tracing", "format_summary": "tracing", "count_fallbacks": "tracing",
    "tune": "tuning", "compile_forward": "compiling", "uncompile_forward": "compiling",
    "compile_plans": "compiling", "uncompile_plans": "compiling", "PlanCompileError": "compiling",
    "Answer": "verify", "CompositeVerifier": "verify", "extract_answer": "verify",
}
# Internals a user rarely calls: still reachable as vps.<name> (and from their modules), but not exported.
_INTERNALS = {"set_entropy_hint": "patching", "update_outcome": "patching", "QKPair": "coupling",
              "LayerPolicy": "policy"}

__all__ = ["__version__", *sorted(_EXPORTS)]


__getattr__, __dir__ = lazy_exports(__name__, globals(), {**_EXPORTS, **_INTERNALS})


if TYPE_CHECKING:  # what the names are, for type checkers and editors
    from .builders import HybridBuilder, SCBuilder, SKBuilder, make_builder
    from .compiling import PlanCompileError, compile_forward, compile_plans, uncompile_forward, uncompile_plans
    from .config import ConfigError, VPSConfig
    from .coupling import QKPair
    from .layer import VPSLinear
    from .models import ModelLoadError, load_model
    from .patching import (
        PatchError,
        clear_gradients,
        disabled,
        get_config,
        is_patched,
        patch,
        patched,
        reset_state,
        reuse_selection,
        set_entropy_hint,
        static_plans,
        unpatch,
        update_outcome,
        vps_layers,
    )
    from .policy import LayerPolicy
    from .refinement import EphemeralLBFGS, RefineConfig, RefineResult, SampleCache, refine, refine_many
    from .spectral import spectral_clip
    from .tracing import count_fallbacks, format_summary, summarize, trace
    from .tuning import tune
    from .verify import Answer, CompositeVerifier, extract_answer
