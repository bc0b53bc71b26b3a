"""Q/K coupling (docs/design.md §7): coherent perturbations of an attention block's query and key.

The query and key projections read the same input, so their input selections (top features of
mean |x|) coincide: they are one selection. Their *output* selections are chosen jointly so that
they fall on the same head dimensions: the attention logit is ``q . k = sum_j q_j k_j`` per head,
so dimension j of key head h_kv is scored by ``mean|k_{h_kv, j}| * max_h mean|q_{h, j}|`` over the
query heads h that read key head h_kv (grouped-query attention: ``h // (n_heads / n_kv) == h_kv``,
the order `repeat_kv` uses). The key takes the best joint dimensions; the query takes, for each,
dimension j of its best-scoring head in that group. A rank-1 change to both then touches the same
``q_j k_j`` products instead of unrelated ones.

The coupling owns the pairing: `QKPair` sets and clears the layers' ``pair`` attribute, and it asks of a
layer only what `CoupledLayer` names, so that this module never imports `vps.layer` (which imports it).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn

from .builders import rank_features
from .offload import hooked_call


class CoupledLayer(Protocol):
    """What `QKPair` needs of a projection (`vps.layer.VPSLinear` is one): its output width, the wrapped
    layer it calls for the partner's base output, its bias removal, and the attribute that holds its pair."""

    base_layer: nn.Module
    pair: QKPair | None

    @property
    def out_features(self) -> int: ...

    def without_bias(self, out: torch.Tensor) -> torch.Tensor: ...


@dataclass
class BaseOutput:
    """A layer's base output on one input, with what the Q/K coupling already knows of it.

    ``peer_out`` is set on the first call of a coupled pair: the partner's base output on the same
    input (``peer_h0``: the same without its bias), to be ranked jointly (`QKPair.rank_jointly`).
    ``out_rank`` and ``energy`` are set on the second call: the ranking and energy the partner
    computed for this layer's output.
    """

    out: torch.Tensor
    peer_out: torch.Tensor | None = None
    peer_h0: torch.Tensor | None = None
    out_rank: torch.Tensor | None = None
    energy: torch.Tensor | None = None


@dataclass
class _Handoff:
    layer: object
    x: torch.Tensor
    result: BaseOutput


class QKPair:
    """Couples the ``q`` and ``k`` `VPSLinear` layers (any `CoupledLayer`) of one attention block.

    Whichever projection runs first computes both base outputs and both output rankings; the second
    one, called on the very same input, reuses them, so nothing is computed twice.
    """

    def __init__(self, q: CoupledLayer, k: CoupledLayer, n_heads: int, n_kv_heads: int,
                 head_dim: int) -> None:
        if n_heads % n_kv_heads:
            raise ValueError(f"num_attention_heads {n_heads} is not a multiple of num_key_value_heads {n_kv_heads}")
        if q.out_features != n_heads * head_dim or k.out_features != n_kv_heads * head_dim:
            raise ValueError(
                f"Q/K coupling expects q_proj out {n_heads}x{head_dim} and k_proj out {n_kv_heads}x{head_dim}, "
                f"got {q.out_features} and {k.out_features}")
        self.q, self.k = q, k
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, head_dim
        self._handoff: _Handoff | None = None
        q.pair = self
        k.pair = self

    def peer(self, layer: CoupledLayer) -> CoupledLayer:
        """The other projection of the pair."""
        return self.k if layer is self.q else self.q

    def detach(self) -> None:
        """Undo the coupling (used by unpatch)."""
        self.q.pair = None
        self.k.pair = None
        self._handoff = None

    def base_output(self, layer: CoupledLayer, x: torch.Tensor,
                    base_forward: Callable[[torch.Tensor], torch.Tensor] | None = None) -> BaseOutput:
        """``layer``'s base output on ``x``: the partner's handoff for this very input if there is one,
        else computed here (with ``base_forward``, default ``layer.base_layer``) together with the
        partner's (``peer_out``)."""
        handoff, self._handoff = self._handoff, None  # a stale handoff must never outlive the call it was made for
        if handoff is not None and handoff.layer is layer and handoff.x is x:
            return handoff.result
        own = (base_forward or layer.base_layer)(x)
        peer = self.peer(layer)

        def with_h0(inp: torch.Tensor, forward: Callable[[torch.Tensor], torch.Tensor]
                    ) -> tuple[torch.Tensor, torch.Tensor]:
            out = forward(inp)
            return out, peer.without_bias(out)  # an offloaded bias is only loaded in here

        # The partner's weight (and bias) may be offloaded: its device hook loads them for this call.
        peer_out, peer_h0 = hooked_call(peer.base_layer, x, with_h0)
        return BaseOutput(own, peer_out=peer_out.to(own.device), peer_h0=peer_h0.to(own.device))

    def rank_jointly(self, layer: CoupledLayer, x: torch.Tensor, scores: torch.Tensor, peer_out: torch.Tensor,
                     peer_scores: torch.Tensor, peer_energy: torch.Tensor, k: int) -> torch.Tensor:
        """``layer``'s output ranking (B, k), chosen jointly with its partner's from both mean |output| scores.

        The partner's ranking, energy and base output ``peer_out`` are handed to its next call on ``x``.
        """
        own_rank, peer_rank = self.rank_outputs(layer, scores, peer_scores, k)
        self._handoff = _Handoff(self.peer(layer), x, BaseOutput(peer_out, out_rank=peer_rank, energy=peer_energy))
        return own_rank

    def rank_outputs(self, layer: CoupledLayer, own_scores: torch.Tensor, peer_scores: torch.Tensor,
                     k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Joint output rankings ``(own, peer)`` of k candidates each, from mean |output| scores."""
        s_q, s_k = (own_scores, peer_scores) if layer is self.q else (peer_scores, own_scores)
        q_rank, k_rank = self.joint_rankings(s_q, s_k, k)
        return (q_rank, k_rank) if layer is self.q else (k_rank, q_rank)

    def joint_rankings(self, s_q: torch.Tensor, s_k: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Query and key output indices (B, k) on matching head dimensions."""
        b = s_q.shape[0]
        group = self.n_heads // self.n_kv_heads
        q_heads = s_q.reshape(b, self.n_kv_heads, group, self.head_dim)
        best_q, best_head = q_heads.max(dim=2)  # (B, n_kv, head_dim)
        joint = s_k.reshape(b, self.n_kv_heads, self.head_dim) * best_q
        k_rank = rank_features(joint.reshape(b, -1), min(k, joint[0].numel()), nonnegative=True)
        kv_head = torch.div(k_rank, self.head_dim, rounding_mode="floor")
        dim = k_rank % self.head_dim
        q_head = kv_head * group + torch.gather(best_head.reshape(b, -1), 1, k_rank)
        return q_head * self.head_dim + dim, k_rank
