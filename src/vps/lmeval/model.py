"""lm-eval model classes ``vps`` (a VPS-patched model) and ``vps-base`` (the same model, unpatched).

Both subclass lm-eval's HuggingFace model (`HFLM`) and differ from it in two ways:

- The model and tokenizer are loaded by `vps.load_model` (a bundled alias such as ``smollm2-135m``,
  a local checkpoint directory or a ``.gguf`` file) and handed to HFLM ready-made, so the base and
  the patched runs share one loading path, with no hub access.
- With a VPS config the model is patched (`vps.patch`) and every batch starts from a clean VPS
  state (`vps.reset_state`), so nothing one batch did (adaptive policies, captured gradients,
  stored plans, entropies) reaches the next.

Generation goes through HFLM unchanged: ``model.generate`` builds the selectors from the prompt at
prefill, as ``vps generate`` and ``vps eval`` do. Loglikelihood requests of a patched model are
scored the way `vps.evaluation.nll` scores a gold solution: the context alone is prefilled (that
builds each layer's selectors) and the continuation is scored from its KV cache with those
selectors kept, so the scored tokens never shape the perturbation that scores them. HFLM's own
scorer runs context + continuation in one right-padded forward without an attention mask; a
patched model would then build its selectors from the continuation and from the padding. The
unpatched model keeps HFLM's scorer.

``model_args`` (besides HFLM's own ``batch_size``, ``max_length``, ...):

- ``pretrained``: a vps alias, a checkpoint directory or a ``.gguf`` file (default: the bundled
  SmolLM2-135M-Instruct); from Python also a ``PreTrainedModel`` (then ``tokenizer`` is required).
- ``vps_config``: a `VPSConfig` JSON file (``VPSConfig.save``, ``vps tune``'s ``best.json``),
  ``seed`` (the seed defaults; what ``vps`` uses when it is not given) or ``none`` (unpatched).
  A file literally named ``seed`` or ``none`` is given as ``./seed``. From Python also a `VPSConfig`,
  or a mapping of field overrides of the seed defaults (`VPSConfig.from_overrides`).
- ``dtype``: ``float32`` (default), ``bfloat16`` or ``float16``.
- ``device``: a torch device; lm-eval's default ``cuda:0`` falls back to the CPU when no CUDA
  device is visible, as HFLM does.
- ``threads``: ``torch.set_num_threads`` for the process (like ``vps eval --threads``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM
from tqdm import tqdm

from ..config import ConfigError, VPSConfig
from ..evaluation.nll import _cached_scores
from ..models import DEFAULT_MODEL, load_model
from ..patching import is_patched, patch, reset_state

__all__ = ["DTYPES", "SEED", "UNPATCHED", "VPSBaseLM", "VPSLM", "resolve_config", "resolve_device", "resolve_dtype"]

log = logging.getLogger(__name__)

SEED = "seed"
UNPATCHED = "none"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# HFLM arguments that only matter when HFLM loads or places the model itself. Here vps.load_model
# has loaded it already, so HFLM would ignore them without a word; refuse them instead.
_LOADER_ARGS = {"revision": "main", "subfolder": "", "parallelize": False, "tp_plan": None, "peft": None,
                "delta": None, "autogptq": False, "gptqmodel": False, "gguf_file": None, "max_memory_per_gpu": None,
                "max_cpu_memory": None}

# What HFLM logs whenever it is handed a loaded model: true, and here by design, so not worth a warning.
_PRELOADED_NOTICES = ("`pretrained` model kwarg is not of type `str`",
                      "Passed an already-initialized model through `pretrained`")


def resolve_config(value: Any) -> VPSConfig | None:
    """The config a ``vps_config`` model argument names; None means unpatched.

    lm-eval reads ``vps_config=none`` as Python None, so None and ``"none"`` both mean unpatched. From
    Python the value may also be a mapping of `VPSConfig` field overrides of the seed defaults
    (``{"rank": 4}``), applied by `VPSConfig.from_overrides` with the rules of every other entry point.

    Raises:
        ConfigError: the value is not a VPSConfig, a mapping of valid field overrides, ``seed``, ``none`` or
            a readable config file (the message starts with ``vps_config``).
    """
    if value is None or isinstance(value, VPSConfig):
        return value
    if isinstance(value, Mapping):  # from Python: field overrides of the seed defaults, as a grid entry gives them
        return VPSConfig.from_overrides(value, source="vps_config")
    if not isinstance(value, (str, os.PathLike)):
        raise ConfigError(f"vps_config must be a VPSConfig JSON file, {SEED!r} or {UNPATCHED!r} (from Python also a "
                          f"VPSConfig or a mapping of field overrides), got {value!r}")
    text = os.fspath(value)
    if text.strip().lower() == UNPATCHED:
        return None
    if text.strip().lower() == SEED:
        return VPSConfig()
    try:
        return VPSConfig.load(text)
    except ConfigError as exc:
        raise ConfigError(f"vps_config: {exc}") from None


def resolve_dtype(value: Any) -> torch.dtype:
    """The torch dtype a ``dtype`` model argument names (None: float32).

    Raises:
        ValueError: not one of float32, bfloat16, float16.
    """
    if value is None:
        return torch.float32
    if isinstance(value, torch.dtype) and value in DTYPES.values():
        return value
    if isinstance(value, str) and value.removeprefix("torch.") in DTYPES:
        return DTYPES[value.removeprefix("torch.")]
    raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {value!r}")


def resolve_device(value: Any) -> torch.device:
    """The device a ``device`` model argument names (None: cuda if available, else cpu).

    A CUDA device on a machine without one falls back to the CPU, since lm-eval passes ``cuda:0``
    unless told otherwise.

    Raises:
        ValueError: not a torch device.
    """
    if value is None or value == "":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(value)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"device: {value!r} is not a torch device ({exc})") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        log.warning("device %s: no CUDA device is visible; using the CPU", value)
        return torch.device("cpu")
    return device


def _set_threads(value: Any) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"threads must be a whole number >= 1, got {value!r}")
    torch.set_num_threads(value)


class _DropNotices(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(_PRELOADED_NOTICES)


@contextmanager
def _quiet_preloaded() -> Iterator[None]:
    logger = logging.getLogger(HFLM.__module__)
    notices = _DropNotices()
    logger.addFilter(notices)
    try:
        yield
    finally:
        logger.removeFilter(notices)


@register_model("vps")
class VPSLM(HFLM):
    """lm-eval's HF model over a model loaded by `vps.load_model`, patched with a VPS config.

    ``vps_config`` defaults to the seed configuration; ``none`` leaves the model unpatched (see
    the module docstring for every model argument).
    """

    def __init__(
        self,
        pretrained: Any = None,
        vps_config: Any = SEED,
        dtype: Any = "float32",
        device: Any = None,
        tokenizer: Any = None,
        threads: int | None = None,
        **kwargs: Any,
    ) -> None:
        # Everything cheap is checked before the model loads, so a typo fails in a second.
        cfg = resolve_config(vps_config)
        torch_dtype = resolve_dtype(dtype)
        target = resolve_device(device)
        _set_threads(threads)
        for arg, neutral in _LOADER_ARGS.items():
            if arg in kwargs and kwargs[arg] != neutral:
                raise ValueError(f"{arg}: not supported by --model vps, which loads the model with vps.load_model "
                                 f"(pass pretrained=<alias, checkpoint directory or .gguf file>)")
            kwargs.pop(arg, None)
        model: Any
        loaded_tokenizer: Any
        if pretrained is None or isinstance(pretrained, (str, os.PathLike)):
            name = DEFAULT_MODEL if pretrained is None else os.fspath(pretrained)
            model, loaded_tokenizer = load_model(name, dtype=torch_dtype, device=target)
        elif isinstance(pretrained, torch.nn.Module):
            if tokenizer is None:
                raise ValueError("tokenizer: required when pretrained is a model object")
            model, loaded_tokenizer = pretrained, None
            name = getattr(getattr(model, "config", None), "_name_or_path", "") or type(model).__name__
        else:
            raise ValueError(f"pretrained must be a model alias, a checkpoint directory or a .gguf file, "
                             f"got {type(pretrained).__name__}")
        with _quiet_preloaded():
            super().__init__(pretrained=model, tokenizer=tokenizer if tokenizer is not None else loaded_tokenizer,
                             **kwargs)
        if cfg is not None:
            patch(self.model, cfg)
        self.vps_config = cfg
        self.model_name = name

    # -- every forward the harness makes starts from a clean VPS state --------------------------------
    def _fresh(self) -> None:
        if is_patched(self.model):
            reset_state(self.model)

    def _model_call(self, inps: torch.Tensor, attn_mask: torch.Tensor | None = None,
                    labels: torch.Tensor | None = None) -> torch.Tensor:
        self._fresh()
        return super()._model_call(inps, attn_mask, labels)

    def _model_generate(self, context: torch.Tensor, max_length: int, stop: list[str],
                        **generation_kwargs: Any) -> torch.Tensor:
        self._fresh()
        return super()._model_generate(context, max_length, stop, **generation_kwargs)

    # -- loglikelihood ----------------------------------------------------------------------------------
    def _loglikelihood_tokens(
        self,
        requests: Sequence[tuple[Any, list[int], list[int]]],
        disable_tqdm: bool = False,
        override_bs: int | None = None,
    ) -> list[tuple[float, bool]]:
        """(log-probability, whether greedy decoding reproduces it) of each request's continuation.

        A patched model scores each continuation with the selectors its context alone built (see the
        module docstring); an unpatched one uses HFLM's scorer.
        """
        if not is_patched(self.model):
            return super()._loglikelihood_tokens(requests, disable_tqdm=disable_tqdm, override_bs=override_bs)
        size = override_bs or self.batch_size
        if size == "auto":
            size = self._detect_batch_size()
        size = max(1, int(size))
        # Longest first, so a batch pads little and a memory error shows at once.
        order = sorted(range(len(requests)), key=lambda i: -(len(requests[i][1]) + len(requests[i][2])))
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        with tqdm(total=len(requests), disable=disable_tqdm or self.rank != 0,
                  desc="Running loglikelihood requests (vps)") as bar:
            for start in range(0, len(order), size):
                batch = order[start:start + size]
                pairs = [self._fit(requests[i][1], requests[i][2]) for i in batch]
                for i, score in zip(batch, self._score(pairs), strict=True):
                    results[i] = score
                    if requests[i][0] is not None:  # rolling windows come without a cache key
                        self.cache_hook.add_partial("loglikelihood", requests[i][0], score)
                bar.update(len(batch))
        return results  # type: ignore[return-value]

    def _fit(self, context: list[int], continuation: list[int]) -> tuple[list[int], list[int]]:
        """Drop the oldest context tokens so context + continuation fit in ``max_length``."""
        room = self.max_length - len(continuation)
        if room < 1:
            raise ValueError(f"max_length: a continuation of {len(continuation)} tokens leaves no room for its "
                             f"context within max_length={self.max_length}")
        return list(context[-room:]), list(continuation)

    def _score(self, pairs: Sequence[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        scored = [i for i, (_, cont) in enumerate(pairs) if cont]
        out: list[tuple[float, bool]] = [(0.0, True)] * len(pairs)  # an empty continuation is certain
        if not scored:
            return out
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.eot_token_id
        self._fresh()
        with torch.no_grad():
            logits, _, starts = _cached_scores(self.model, [pairs[i][0] for i in scored],
                                               [pairs[i][1] for i in scored], pad, self.device)
        for row, i in enumerate(scored):
            cont = torch.tensor(pairs[i][1], dtype=torch.long, device=logits.device)
            step = logits[row, starts[row]:starts[row] + len(cont)].float()
            logp = torch.log_softmax(step, dim=-1).gather(-1, cont[:, None]).sum()
            out[i] = (float(logp), bool((step.argmax(dim=-1) == cont).all()))
        return out

    def get_model_info(self) -> dict[str, Any]:
        """What the results file records about the model: vps's name for it and the VPS config.

        HFLM's version asks the hub for a commit of ``pretrained``; these models are local.
        """
        return {
            "model_num_parameters": sum(p.numel() for p in self.model.parameters()),
            "model_dtype": str(next(self.model.parameters()).dtype),
            "model_revision": None,
            "model_sha": "",
            "vps_model": self.model_name,
            "vps_config": None if self.vps_config is None else self.vps_config.to_dict(),
        }


@register_model("vps-base")
class VPSBaseLM(VPSLM):
    """The ``vps`` model class without VPS: the base model through the same loading path."""

    def __init__(self, pretrained: Any = None, vps_config: Any = None, **kwargs: Any) -> None:
        if resolve_config(vps_config) is not None:
            raise ValueError("vps_config: --model vps-base is the unpatched model; use --model vps for a VPS config")
        super().__init__(pretrained, vps_config=None, **kwargs)
