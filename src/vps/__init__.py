"""vps: Virtual Parameter Sharpening for HuggingFace causal language models.

``y = W x + gamma * (x A) B^T`` with ``A = W^T V``, ``B = W U`` and selectors U, V built on the fly
from activation statistics. Patch a model in one line::

    import vps
    model, tok = vps.load_model()
    vps.patch(model, vps.VPSConfig())
"""

from ._version import __version__
from .builders import HybridBuilder, SCBuilder, SKBuilder, make_builder
from .config import ConfigError, VPSConfig
from .coupling import QKPair
from .layer import VPSLinear
from .lbfgs import EphemeralLBFGS
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
    unpatch,
    update_outcome,
    vps_layers,
)
from .policy import LayerPolicy
from .refine import RefineResult, refine, refine_many
from .samples import SampleCache
from .spectral import spectral_clip
from .trace import format_summary, summarize, trace
from .tuning import tune
from .verify import Answer, CompositeVerifier, extract_answer

__all__ = [
    "__version__", "Answer", "CompositeVerifier", "ModelLoadError", "RefineResult", "extract_answer",
    "load_model", "refine", "refine_many", "SampleCache",
    "ConfigError", "EphemeralLBFGS", "HybridBuilder", "LayerPolicy", "PatchError", "QKPair",
    "SCBuilder", "SKBuilder", "VPSConfig", "VPSLinear", "clear_gradients", "disabled", "format_summary",
    "get_config", "is_patched", "make_builder", "patch", "patched", "reset_state", "reuse_selection",
    "set_entropy_hint",
    "spectral_clip", "summarize", "trace", "tune", "unpatch", "update_outcome", "vps_layers",
]
