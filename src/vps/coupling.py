"""Q/K coupling (seed section 7): coherent perturbations of an attention block's query and key.

The query and key projections read the same input, so their input selections (top features of
mean |x|) coincide: they are one selection. Their *output* selections are chosen jointly so that
they fall on the same head dimensions: the attention logit is ``q . k = sum_j q_j k_j`` per head,
so dimension j of key head h_kv is scored by ``mean|k_{h_kv, j}| * max_h mean|q_{h, j}|`` over the
query heads h that read key head h_kv (grouped-query attention: ``h // (n_heads / n_kv) == h_kv``,
the order `repeat_kv` uses). The key takes the best joint dimensions; the query takes, for each,
dimension j of its best-scoring head in that group. A rank-1 change to both then touches the same
``q_j k_j`` products instead of unrelated ones.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .builders import rank_features


@dataclass
class _Pending:
    layer: object
    x: torch.Tensor
    out: torch.Tensor
    out_rank: torch.Tensor
    energy: torch.Tensor  # the policy's energy statistic of ``out``


class QKPair:
    """Couples the ``q`` and ``k`` `VPSLinear` layers of one attention block."""

    def __init__(self, q: torch.nn.Module, k: torch.nn.Module, n_heads: int, n_kv_heads: int,
                 head_dim: int) -> None:
        if n_heads % n_kv_heads:
            raise ValueError(f"num_attention_heads {n_heads} is not a multiple of num_key_value_heads {n_kv_heads}")
        if q.out_features != n_heads * head_dim or k.out_features != n_kv_heads * head_dim:
            raise ValueError(
                f"Q/K coupling expects q_proj out {n_heads}x{head_dim} and k_proj out {n_kv_heads}x{head_dim}, "
                f"got {q.out_features} and {k.out_features}")
        self.q, self.k = q, k
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, head_dim
        self._pending: _Pending | None = None
        q.pair = self
        k.pair = self

    def peer(self, layer: torch.nn.Module) -> torch.nn.Module:
        """The other projection of the pair."""
        return self.k if layer is self.q else self.q

    def detach(self) -> None:
        """Undo the coupling (used by unpatch)."""
        self.q.pair = None
        self.k.pair = None
        self._pending = None

    def store(self, layer: torch.nn.Module, x: torch.Tensor, out: torch.Tensor, out_rank: torch.Tensor,
              energy: torch.Tensor) -> None:
        """Hand ``layer`` its base output, output ranking and energy for input ``x`` (its next call)."""
        self._pending = _Pending(layer, x, out, out_rank, energy)

    def take(self, layer: torch.nn.Module, x: torch.Tensor) -> _Pending | None:
        """What the partner computed for ``layer`` on this very input, if anything."""
        p = self._pending
        if p is None:
            return None
        self._pending = None  # a stale entry must never outlive the call it was made for
        return p if (p.layer is layer and p.x is x) else None

    def rank_outputs(self, layer: torch.nn.Module, own_scores: torch.Tensor, peer_scores: torch.Tensor,
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
