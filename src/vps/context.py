"""Per-model forward context shared by the patched layers: valid-token mask, phase, entropy.

`vps.patch` installs a forward pre-hook and a forward hook on the top-level model. The pre-hook
reads the call's ``attention_mask`` (so padding never counts in any statistic; a 4-D mask, as generate()
passes with a static cache, is read through `current_tokens_mask`) and whether a
non-empty KV cache was passed (prefill vs decode; the cache is found by type, see `vps.kv_cache`).
The forward hook computes the model's own next-token entropy H at the last valid position of each
sequence, and warns when a forward continued a cache that the pre-hook did not see.

Entropy feedback: H from one forward is used by the *next* forward's policy decisions, and only when
that next forward continues the same sequences from a KV cache (a decode step). Every prefill starts
clean: a forward without a cache never depends on earlier, unrelated calls. In ``decode_mode="frozen"``
the whole decision is taken at prefill (so cached decoding equals a recompute with the same
selectors); H then feeds decisions in ``decode_mode="dynamic"``, where every step after the first sees
the entropy of the previous step. `entropy_hint` lets a caller (the refinement loop) hand a measured
entropy to the next prefill explicitly.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from .config import VPSConfig
from .kv_cache import ForwardCall, cache_length, output_cache


class HiddenCacheWarning(UserWarning):
    """A forward continued a KV cache that vps did not find among its arguments (decode taken for prefill)."""


@dataclass(frozen=True)
class TokenMask:
    """The valid tokens of one forward in the layout a layer's statistics read them (see `VPSContext.token_mask`)."""

    valid: torch.Tensor  # (B, T) bool
    pad: torch.Tensor | None  # (B, T, 1) bool, True at padding; None when every token is valid
    count: torch.Tensor | float  # (B,) float32 valid tokens per row (at least 1); T when every token is valid


@dataclass(frozen=True)
class ForwardState:
    """What the layers' plans read from the context during one forward (`VPSContext.forward_state`), kept so
    that a recompute of part of that forward, after it ended, plans as it did (`VPSContext.replay`)."""

    mask: torch.Tensor | None
    phase: str
    tokens: int | None
    entropy: torch.Tensor | None
    reuse_selection: bool


class VPSContext:
    """Mutable state of one patched model's current forward (``cfg``: the config it was patched with)."""

    def __init__(self, cfg: VPSConfig | None = None) -> None:
        self.cfg = cfg if cfg is not None else VPSConfig()
        self.enabled = True
        self.mask: torch.Tensor | None = None  # (B, S) attention mask of the current call
        self.phase = "prefill"
        self.reuse_selection = False
        # While a `vps.tracing.count_fallbacks` block is open: every eager plan's (B,) ok flags, in order.
        self.fallback_flags: list[torch.Tensor] | None = None
        self.entropy: torch.Tensor | None = None  # (B,) from the previous forward, per sequence
        self.entropy_hint: torch.Tensor | None = None
        self._warned_mask = False
        self._warned_hidden_cache = False
        self._tokens: int | None = None
        self._valid: dict[tuple[int, int, torch.device], tuple[torch.Tensor, bool]] = {}
        self._token_masks: dict[tuple[int, int, torch.device, bool], TokenMask] = {}
        self._entropy_on: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
        self._ranking: tuple[torch.Tensor, int | None, int, torch.Tensor] | None = None
        self.in_forward = False
        # True while a finished forward's blocks are recomputed for backward (activation checkpointing):
        # the layers then plan from what they planned with the first time and change no state.
        self.replaying = False

    # -- read by the layers -----------------------------------------------------------------------
    def valid_tokens(self, batch: int, tokens: int, device: torch.device) -> tuple[torch.Tensor, bool]:
        """(batch, tokens) bool mask of the valid tokens among the layers' current inputs, and whether
        every token is valid (then statistics take a faster, unmasked path).

        Computed once per forward and shared by all layers (one host sync per forward, not per layer);
        a model spread over several devices gets one copy per device.
        """
        hit = self._valid.get((batch, tokens, device))
        if hit is not None:
            return hit
        mask = self.mask
        if mask is None or mask.shape[0] != batch or mask.shape[1] < tokens:
            valid, dense = torch.ones(batch, tokens, dtype=torch.bool, device=device), True
        else:
            other = next((v for (b, t, _), v in self._valid.items() if (b, t) == (batch, tokens)), None)
            if other is not None:  # already checked on another device: move it, no second host sync
                valid, dense = other[0].to(device), other[1]
            else:
                valid = mask[:, mask.shape[1] - tokens:].to(device=device, dtype=torch.bool)
                # A compiled forward takes the masked path: the dense check is a host sync (graph break)
                # and both paths give the same statistics.
                dense = False if torch.compiler.is_compiling() else bool(valid.all())
        self._valid[(batch, tokens, device)] = (valid, dense)
        return valid, dense

    def token_mask(self, batch: int, tokens: int, device: torch.device, one_sequence: bool = False) -> TokenMask:
        """`valid_tokens` with what every statistic derives from it (padding mask, token count), built
        once per forward rather than once per layer; ``one_sequence`` lays every row's tokens out as one
        row (``scope="batch"``)."""
        key = (batch, tokens, device, one_sequence)
        hit = self._token_masks.get(key)
        if hit is not None:
            return hit
        valid, dense = self.valid_tokens(batch, tokens, device)
        if one_sequence:
            valid = valid.reshape(1, -1)
        if dense:
            made = TokenMask(valid, None, float(valid.shape[1]))
        else:
            made = TokenMask(valid, ~valid.unsqueeze(-1), valid.sum(dim=1).clamp_min(1).float())
        self._token_masks[key] = made
        return made

    def cached_input_ranking(self, x: torch.Tensor, k: int, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
        """The top-``k`` input ranking of ``x``, computed once per forward for all layers reading this tensor."""
        hit = self.input_ranking_hit(x, k)
        if hit is not None:
            return hit
        ranking = compute()
        self.keep_input_ranking(x, k, ranking)
        return ranking

    def input_ranking_hit(self, x: torch.Tensor, k: int) -> torch.Tensor | None:
        """The top-``k`` ranking of ``x`` if a layer of this forward computed it already, else None."""
        if not self.in_forward:  # a standalone layer call: nothing to share
            return None
        hit = self._ranking
        if hit is not None and hit[0] is x and hit[1] == self._version(x) and hit[2] == k:
            return hit[3]
        return None

    def keep_input_ranking(self, x: torch.Tensor, k: int, ranking: torch.Tensor) -> None:
        """Remember ``ranking`` as the top-``k`` ranking of ``x`` for the rest of this forward."""
        if self.in_forward:
            self._ranking = (x, self._version(x), k, ranking)

    @staticmethod
    def _version(x: torch.Tensor) -> int | None:
        # Inference tensors keep no version counter; elsewhere an in-place change invalidates. A
        # compiled forward keys on identity alone: dynamo traces neither check, and within one traced
        # forward the layers' shared inputs are never changed in place.
        return None if torch.compiler.is_compiling() or x.is_inference() else x._version

    def entropy_for(self, batch: int, device: torch.device | None = None) -> torch.Tensor | None:
        """The entropy the policy may use for this forward (on ``device``, once per device), or None."""
        h = self.entropy
        if h is None or h.shape[0] != batch:
            return None
        if device is None or h.device == device:
            return h
        moved = self._entropy_on.get(device)
        if moved is None or moved[0] is not h:
            moved = self._entropy_on[device] = (h, h.to(device))
        return moved[1]

    def reuses_plan(self, decode_mode: str) -> bool:
        """Whether layers keep their stored selectors for this forward."""
        return self.reuse_selection or (self.phase == "decode" and decode_mode == "frozen")

    # -- activation checkpointing -----------------------------------------------------------------
    def forward_state(self) -> ForwardState:
        """The current forward's state as the layers' plans read it (taken inside a forward)."""
        return ForwardState(self.mask, self.phase, self._tokens, self.entropy, self.reuse_selection)

    @contextlib.contextmanager
    def replay(self, state: ForwardState) -> Iterator[None]:
        """Inside the block, layers run as in the forward ``state`` was taken from, with ``replaying`` set;
        afterwards the context is as before. A checkpointed block's recompute runs in here: by then that
        forward has ended (`end` cleared its mask and replaced its entropy) and the backward may be under way."""
        kept = (self.mask, self.phase, self._tokens, self.entropy, self.reuse_selection, self.in_forward,
                self._valid, self._token_masks, self._ranking, self._entropy_on, self.replaying)
        self.mask, self.phase, self._tokens, self.entropy, self.reuse_selection = (
            state.mask, state.phase, state.tokens, state.entropy, state.reuse_selection)
        self._valid, self._token_masks, self._ranking, self._entropy_on = {}, {}, None, {}
        self.in_forward = self.replaying = True
        try:
            yield
        finally:
            (self.mask, self.phase, self._tokens, self.entropy, self.reuse_selection, self.in_forward,
             self._valid, self._token_masks, self._ranking, self._entropy_on, self.replaying) = kept

    # -- driven by the model hooks -----------------------------------------------------------------
    def begin(self, call: ForwardCall) -> None:
        """Start of a top-level forward: record the mask and the phase."""
        attention_mask = call.attention_mask
        self._tokens = call.tokens
        self._valid, self._token_masks, self._ranking = {}, {}, None
        self._entropy_on = {}
        self.in_forward = True
        past = cache_length(call.cache)
        self.mask, readable = read_padding(attention_mask, call.tokens, past)
        if not readable and not self._warned_mask:
            what = (f"of shape {tuple(attention_mask.shape)}" if isinstance(attention_mask, torch.Tensor)
                    else f"of type {type(attention_mask).__name__}")
            warnings.warn(f"vps: an attention_mask {what} was passed, from which vps cannot read which tokens are "
                          "padding; statistics count every token", stacklevel=3)
            self._warned_mask = True
        self.phase = "decode" if past > 0 else "prefill"
        if self.phase == "prefill":
            self.entropy = self.entropy_hint
            self.entropy_hint = None

    def end(self, output: Any) -> None:
        """End of a top-level forward: check the phase, measure next-token entropy for the following step."""
        if self.phase == "prefill" and not self._warned_hidden_cache:
            self._check_no_hidden_cache(output)
        logits = _logits_of(output)
        mask, self.mask = self.mask, None
        self._valid, self._token_masks, self._ranking = {}, {}, None
        self.in_forward = False
        if not self.cfg.want_entropy or logits is None:
            self.entropy = None
            return
        with torch.no_grad():
            self.entropy = next_token_entropy(logits, mask)

    def _check_no_hidden_cache(self, output: Any) -> None:
        # A forward taken for a prefill that returns a cache longer than its own input continued a
        # cache the pre-hook could not see: the layers rebuilt their plans from the new tokens alone.
        # Checked on prefills only, so a decode step pays nothing.
        held = cache_length(output_cache(output))
        if self._tokens is not None and held > self._tokens:
            self._warned_hidden_cache = True
            warnings.warn(
                f"vps: a forward of {self._tokens} new token(s) continued a KV cache of {held - self._tokens} "
                "token(s) that vps did not find among the forward's arguments, so it was treated as a prefill "
                "and the selectors were rebuilt from the new tokens (frozen decoding is not frozen). The cache "
                "argument is likely passed in a form this vps version does not recognise; please report it "
                "with your transformers version.", HiddenCacheWarning, stacklevel=3)


def read_padding(attention_mask: Any, tokens: int | None, past: int) -> tuple[torch.Tensor | None, bool]:
    """The mask the statistics read for a forward: (B, >= tokens), its last ``tokens`` columns marking the
    new tokens that are real, or None when every token counts; and whether ``attention_mask`` could be read.

    A 2-D mask is used as it is. A 4-D one is read by `current_tokens_mask`, except for a single new token,
    which generate() only passes for a generated (real) token. A mapping (generate() of a model with
    several attention types passes one mask per type, e.g. ``{"full_attention": ...}``) is read through
    its full-attention mask, else its first: in every kind a real token attends to itself.
    """
    if isinstance(attention_mask, dict):
        attention_mask = attention_mask.get("full_attention", next(iter(attention_mask.values()), None))
    if attention_mask is None:
        return None, True
    if not isinstance(attention_mask, torch.Tensor):
        return None, False
    if attention_mask.dim() == 2:
        return attention_mask, True
    if attention_mask.dim() == 4:
        if tokens == 1:
            return None, True
        found = current_tokens_mask(attention_mask, tokens, past)
        return found, found is not None
    return None, False


def current_tokens_mask(mask: torch.Tensor, tokens: int | None, past: int) -> torch.Tensor | None:
    """(B, tokens) bool: which of a forward's new tokens are real, read from a 4-D attention mask (B, 1 or
    heads, queries, keys), or None when the mask's shape does not allow it.

    generate() with a static cache (and any caller with its own 4-D mask) passes the mask already
    expanded, so padding is no longer a column of ones and zeros. A token may attend to itself exactly
    when it is real: the new tokens sit at key positions ``past .. past + tokens - 1``, and the diagonal
    of that block is the 2-D padding mask. A boolean mask marks attended entries True; an additive float
    mask holds 0 there and a large negative number (the dtype's minimum, or -inf) where masked.
    """
    if tokens is None or mask.shape[2] != tokens or mask.shape[3] < past + tokens:
        return None
    diagonal = torch.diagonal(mask[:, 0, :, past:past + tokens], dim1=1, dim2=2)
    if diagonal.dtype == torch.bool:
        return diagonal
    if not diagonal.is_floating_point():  # an integer mask: 1 attends, 0 does not
        return diagonal != 0
    return diagonal > torch.finfo(diagonal.dtype).min / 2


def next_token_entropy(logits: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Entropy (nats) of the next-token distribution at each sequence's last valid position.

    ``logits`` is (B, T, V). With a right-padded ``attention_mask`` the last valid position is
    found from the mask; with left padding (as in generation) it is the last position.
    """
    if logits.dim() != 3:
        raise ValueError(f"logits must be (batch, tokens, vocab), got shape {tuple(logits.shape)}")
    b, t, _ = logits.shape
    if attention_mask is not None and t > 1 and attention_mask.shape[0] == b:
        m = attention_mask[:, -t:].long()
        pos = torch.arange(t, device=m.device).expand(b, t)
        last = torch.where(m > 0, pos, torch.zeros_like(pos)).max(dim=1).values
    else:
        last = torch.full((b,), t - 1, dtype=torch.long, device=logits.device)
    lg = logits[torch.arange(b, device=logits.device), last.to(logits.device)].float()
    logp = torch.log_softmax(lg, dim=-1)
    return -(logp.exp() * logp).sum(dim=-1)


def _logits_of(output: Any) -> torch.Tensor | None:
    logits = getattr(output, "logits", None)
    if logits is None and isinstance(output, tuple) and output and isinstance(output[0], torch.Tensor):
        logits = output[0]
    return logits if isinstance(logits, torch.Tensor) and logits.dim() == 3 else None
