"""`VPSLinear`: a frozen linear layer plus the virtual perturbation ``gamma * (x A) B^T``.

With ``A = W^T V`` and ``B = W U`` the output is ``W x + b + gamma * (x A) B^T``. Nothing of size
d_out x d_in is ever formed: ``x A = (W x) V`` is a gather of the base output (the matmul is already
done), ``B = W U`` is a gather of R columns of W, and ``A``'s column norms (for the clip) come from
R gathered rows. Per forward the layer builds a `Plan` (see `vps.plan` for its arithmetic) with
`vps.planning.plan_tensors`, the pure function from its forward's tensors to the plan's.

A forward that reuses the stored plan (frozen decoding, `vps.reuse_selection`) applies it in its
folded form: ``out += (x @ A) @ Q`` with ``A = W^T V`` kept in the plan since it was built, so a decode
step costs the base matmul plus two thin products (`VPSLinear._apply_folded`).

The layer's own state follows the module: ``gain`` (float32, even in a half-precision model) and the
fallback count are non-persistent buffers, so ``.to()`` moves them and no ``state_dict`` holds them.

Failures inside the perturbation path (a non-finite plan, a failed solve) fall back to the base
output for the affected sequences and are counted in `fallbacks`; they never raise.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, cast

import torch
from torch import nn

from . import activation_stats
from .builders import Selection, make_builder, rank_features
from .config import VPSConfig
from .context import TokenMask, VPSContext
from .coupling import BaseOutput, QKPair
from .lean_gather import gather_features
from .offload import execution_device, hooked_call
from .plan import Plan
from .plan_region import plan_region, region_key
from .planning import PlanParts, PlanSpec, plan_tensors
from .policy import Decision, LayerPolicy

_OWN_BUFFERS = ("gain", "_fallbacks")


def _conv1d() -> type[nn.Module] | None:
    """transformers' ``Conv1D``: GPT-2 style layers store the weight transposed (d_in, d_out)."""
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers is a dependency
        return None
    return Conv1D


Conv1D = _conv1d()


class VPSLinear(nn.Module):
    """A linear (or GPT-2 ``Conv1D``) layer with a Virtual Parameter Sharpening perturbation.

    The wrapped layer is kept unchanged as ``base_layer``. Call it on (N, d_in) — all N tokens form
    one sequence — or on (B, T, d_in), where each sequence's valid tokens (from the patched model's
    attention mask, or all tokens when called standalone) drive its own selectors.
    """

    base_layer: nn.Module
    gain: torch.Tensor  # buffers (registered in __init__)
    _fallbacks: torch.Tensor
    # Whether a reused plan is applied in its folded form (x @ A) @ Q. False applies it as a prefill
    # does, by gathering the base output: the unfolded reference the tests and benchmarks compare with.
    folded_decode: bool = True

    def __init__(self, base_layer: nn.Module, cfg: VPSConfig | None = None, ctx: VPSContext | None = None,
                 name: str = "") -> None:
        super().__init__()
        cfg = cfg if cfg is not None else VPSConfig()
        if isinstance(base_layer, nn.Linear):
            self._transposed = False
        elif Conv1D is not None and isinstance(base_layer, Conv1D):
            self._transposed = True
        else:
            raise TypeError(f"VPSLinear wraps nn.Linear or transformers Conv1D, got {type(base_layer).__name__}"
                            f"{f' at {name}' if name else ''}")
        self.base_layer = base_layer
        self.cfg = cfg
        self.ctx = ctx if ctx is not None else VPSContext(cfg)
        self.layer_name = name
        smallest = min(self.in_features, self.out_features)
        if cfg.max_rank > smallest:
            raise ValueError(f"rank {cfg.max_rank} exceeds min(d_in, d_out) = {smallest} of layer {name or '?'}")
        self.topk = min(cfg.max_topk, smallest)
        self._can_perturb = cfg.resolved_gamma_bounds[1] > 0
        self.policy = LayerPolicy(cfg)
        self.builder = make_builder(cfg.builder, cfg)
        # The constants of this layer's plan, as the key of its nested compile region (see `plan_region`).
        self._region_key = region_key(self._spec, cfg)
        self.pair: QKPair | None = None  # set and cleared by QKPair when Q/K coupling applies
        self.grad_mean: torch.Tensor | None = None
        self._planned_gradient: torch.Tensor | None = None  # the last plan's, for a replay of its forward
        self.plan: Plan | None = None
        # static_plans: each new plan is copied into tensors kept per plan shape, so a CUDA graph that
        # captured a decode step reads the current prompt's plan (see `vps.static_plans`).
        self.static_plans = False
        # The function that turns this forward's statistics into the plan's tensors: `plan_tensors`,
        # or the compiled copy that `vps.compile_plans` shares among all layers.
        self.plan_fn: Callable[..., PlanParts] = plan_tensors
        self._plan_buffers: dict[tuple[Any, ...], Plan] = {}
        # Buffers, so .to() moves them with the weights; non-persistent, so checkpoints never hold them.
        self.register_buffer("gain", None, persistent=False)
        self.register_buffer("_fallbacks", torch.zeros((), dtype=torch.long, device=self.device),
                             persistent=False)
        self._oks: list[torch.Tensor] = []  # ok flags of recent plans, not yet counted in _fallbacks
        self.reset_gain()
        self.register_state_dict_post_hook(_strip_base_prefix)
        self.register_load_state_dict_pre_hook(_add_base_prefix)

    # -- PEFT-like accessors ---------------------------------------------------------------------
    def get_base_layer(self) -> nn.Module:
        """The wrapped layer (walking through nested wrappers)."""
        layer = self.base_layer
        while hasattr(layer, "base_layer"):
            layer = cast(nn.Module, layer.base_layer)
        return layer

    @property
    def weight(self) -> torch.Tensor:
        return cast(torch.Tensor, self.base_layer.weight)

    @property
    def bias(self) -> torch.Tensor | None:
        return cast("torch.Tensor | None", self.base_layer.bias)

    @property
    def device(self) -> torch.device:
        """Where the layer computes: the weight's device, or accelerate's execution device for a
        dispatched layer (an offloaded weight sits on meta between forwards)."""
        return execution_device(self.base_layer)

    @property
    def in_features(self) -> int:
        w = self.weight
        return w.shape[0] if self._transposed else w.shape[1]

    @property
    def out_features(self) -> int:
        w = self.weight
        return w.shape[1] if self._transposed else w.shape[0]

    @property
    def fallbacks(self) -> int:
        """How many sequences fell back to the base output because the perturbation failed."""
        self._fold_fallbacks()
        return int(self._fallbacks)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, builder={self.cfg.builder}, "
                f"rank<={self.cfg.max_rank}, gamma<={self.cfg.resolved_gamma_bounds[1]}")

    # -- state ----------------------------------------------------------------------------------
    def reset_gain(self, batch: int | None = None) -> None:
        """Set the gain to 1: one scalar, or one per sequence of a ``batch`` refined together."""
        self.gain = torch.ones(() if batch is None else (batch,), dtype=torch.float32, device=self.device)

    def reset(self) -> None:
        """Back to the state right after patching: no policy history, captured gradient or stored plan,
        and a scalar gain of 1 (the fallback count is kept)."""
        self.policy.reset()
        self.clear_gradient()
        self._planned_gradient = None
        self.plan = None
        self.reset_gain()

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> VPSLinear:
        # .half()/.to(dtype)/.type() cast every buffer they reach, but the gain and the counter are the
        # layer's own state, not the model's: they follow the device and keep their dtype (the gain at
        # full float32 precision, not rounded through the model's dtype).
        self._fold_fallbacks()  # count flags left on the old device before the counter moves
        before = {name: getattr(self, name) for name in _OWN_BUFFERS}
        super()._apply(fn, recurse)
        for name, old in before.items():
            new = getattr(self, name)
            if old is not None and new.dtype != old.dtype:
                setattr(self, name, old.to(new.device))
        return self

    # -- forward ---------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2:  # (N, d_in): one sequence of N tokens
            return self.forward(x.unsqueeze(0)).squeeze(0)
        # The submodule straight from _modules: the attribute goes through nn.Module.__getattr__ after a
        # failed ordinary lookup, which costs about as much as one of a decode step's two ops.
        base_layer = cast(nn.Module, self._modules["base_layer"])
        if not (self.ctx.enabled and self._can_perturb):
            return base_layer(x)
        # Under an accelerate hook the plan, which reads W, must run while the weight is loaded.
        return hooked_call(base_layer, x, self._perturbed)

    def _perturbed(self, x: torch.Tensor, base_forward: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        plan = self.plan
        # The phase is tested first: a compiled prefill then never guards on whether a plan is stored,
        # so a later prompt's prefill replays the same graph (tests/core/test_compile.py).
        if self.ctx.reuses_plan(self.cfg.decode_mode) and plan is not None and self._plan_fits(plan, x.shape[0]):
            # Frozen decode step: everything but x is fixed since the plan was built, so nothing is
            # gathered or mixed per step.
            y = (self._apply_folded(base_forward(x), x, plan) if self.folded_decode
                 else self._apply_plan(base_forward(x), plan))
        else:
            base = (self.pair.base_output(self, x, base_forward) if self.pair is not None
                    else BaseOutput(base_forward(x)))
            plan = self._build_plan(x, base)
            self.plan = self._into_buffers(plan) if self.static_plans else plan
            # A prefill reads its selection from the base output it already holds: a gather of K'
            # values per token rather than a (d_in x R) product, and the plan's statistics saw the same h.
            y = self._apply_plan(base.out, plan)
        # A replayed forward's output is not in the graph the backward walks: the first forward's hook captures.
        if y.requires_grad and torch.is_grad_enabled() and not self.ctx.replaying:
            self._capture_gradient(y, self.ctx.valid_tokens(x.shape[0], x.shape[1], x.device)[0])
        return y

    def _plan_fits(self, plan: Plan, batch: int) -> bool:
        # Only a batch-scope plan is shared by every row; a per-sequence plan must match row for row.
        return plan.batch == batch or (self.cfg.scope == "batch" and plan.batch == 1)

    def _apply_plan(self, out: torch.Tensor, plan: Plan) -> torch.Tensor:
        b, t, _ = out.shape
        idx, q, bias_sel, coef = plan.out_idx, plan.q, plan.bias_sel, plan.coef
        if plan.batch != b:  # one plan shared by the whole batch (scope="batch")
            idx, q = idx.expand(b, -1), q.expand(b, -1, -1)
            bias_sel = None if bias_sel is None else bias_sel.expand(b, -1)
            coef = None if coef is None else coef.expand(b, -1, -1)
        h_sel = gather_features(out, idx.unsqueeze(1).expand(b, t, idx.shape[1]))
        if bias_sel is not None:
            h_sel = h_sel - bias_sel.unsqueeze(1)
        if coef is not None:
            h_sel = (h_sel.float() @ coef).to(out.dtype)
        if torch.is_grad_enabled():
            return torch.baddbmm(out, h_sel, q)
        return out.baddbmm_(h_sel, q)  # the base output is ours alone: update it in place

    def _apply_folded(self, out: torch.Tensor, x: torch.Tensor, plan: Plan) -> torch.Tensor:
        """``out + (x @ A) @ Q``: the stored plan applied with two ops (equal to `_apply_plan` up to
        rounding, since ``x @ A = (W x)[out_idx] @ coef`` and the bias cancels).

        The gather, the bias subtraction and the SC mixing of `_apply_plan` depend on the step only
        through ``h = W x + b``; folding them into ``A`` when the plan was built leaves one (B, T, R)
        product and the in-place update per decode step. A plan shared by a batch (scope="batch",
        batch 1) broadcasts by views, which launch nothing.
        """
        a, q = plan.a_fold, plan.q
        b = out.shape[0]
        if a.shape[0] != b:
            a, q = a.expand(b, -1, -1), q.expand(b, -1, -1)
        t = torch.bmm(x, a)  # (B, T, R)
        if torch.is_grad_enabled():  # q may carry the gain's autograd (refinement)
            return torch.baddbmm(out, t, q)
        return out.baddbmm_(t, q)

    def _into_buffers(self, plan: Plan) -> Plan:
        """``plan`` copied into this layer's tensors for its shape (allocated by the first plan of that
        shape), so that every later plan of the shape lives at the same addresses.

        A plan that carries autograd (refinement optimises the gain through Q) or one built inside a
        compiled forward (its tensors are graph outputs already) is kept as built.
        """
        if plan.q.requires_grad or torch.compiler.is_compiling():
            return plan
        # The folded factor is held too: a captured decode step reads only a_fold and q.
        parts = (plan.out_idx, plan.coef, plan.q, plan.a_fold, plan.bias_sel)
        key = tuple(None if t is None else (t.shape, t.stride(), t.dtype, t.device) for t in parts)
        held = self._plan_buffers.get(key)
        if held is None:
            held = Plan(plan.out_idx.clone(), None if plan.coef is None else plan.coef.clone(), plan.q.clone(),
                        plan.a_fold.clone(), None if plan.bias_sel is None else plan.bias_sel.clone(),
                        plan.selection, plan.decision)
            self._plan_buffers[key] = held
            return held
        for mine, new in zip((held.out_idx, held.coef, held.q, held.a_fold, held.bias_sel), parts, strict=True):
            if mine is not None:  # the key holds which parts are None, so new is a tensor too
                mine.copy_(cast(torch.Tensor, new))
        held.selection, held.decision = plan.selection, plan.decision
        return held

    # -- plan construction ---------------------------------------------------------------------
    def _build_plan(self, x: torch.Tensor, base: BaseOutput) -> Plan:
        """The plan of this forward: the model-level context (mask, shared input ranking, coupling,
        entropy, history, captured gradient) is read here, in Python; the tensor arithmetic from the
        statistics to ``Q`` is `plan_tensors`, run as ``self.plan_fn`` (eager unless `vps.compile_plans`
        swapped in a compiled copy)."""
        ctx, batch_scope = self.ctx, self.cfg.scope == "batch"
        with torch.no_grad():
            tm = ctx.token_mask(x.shape[0], x.shape[1], x.device, one_sequence=batch_scope)
            key = x
            h0 = self.without_bias(base.out)  # no_grad: nothing here joins the autograd graph
            if batch_scope:
                x, h0 = _as_one_sequence(x), _as_one_sequence(h0)
            # Layers reading the same input (q/k/v, gate/up) share its ranking within one forward.
            in_rank = ctx.input_ranking_hit(key, self.topk)
            out_rank = energy = None
            if self.pair is not None or base.out_rank is not None:  # the Q/K coupling ranks jointly
                out_rank, energy = self._output_ranking(key, h0, base, tm)
            entropy = ctx.entropy_for(key.shape[0], key.device)
            if entropy is not None and batch_scope:
                entropy = entropy.mean().reshape(1)
            if ctx.replaying:  # the gradient consumed by the forward replayed; a newer one stays for the next step
                grad = self._planned_gradient
            else:
                grad = self._planned_gradient = self._consume_gradient(x.shape[0])
        gain = self.gain  # may carry autograd: refinement optimises it
        if gain.dim() and gain.shape[0] != x.shape[0]:
            raise ValueError(f"{self.layer_name or 'layer'}: per-sequence gains for {gain.shape[0]} sequences, but "
                             f"this forward plans for {x.shape[0]}")
        # A dense mask's count is the row length, which plan_tensors reads from the shape: a Python float
        # would be a constant a compiled plan specialises on (one graph per prompt length).
        count = tm.count if isinstance(tm.count, torch.Tensor) else None
        plan_fn = self.plan_fn
        if plan_fn is plan_tensors and torch.compiler.is_compiling():
            # Traced into a whole compiled forward: one nested region that every layer of a shape class
            # reuses, instead of the plan's ~35 ops inlined again for each of the model's patched layers.
            plan_fn = functools.partial(plan_region(), self._region_key)
        parts = plan_fn(self._spec, self.policy, self.builder, x, h0, tm.valid, tm.pad, count, self.weight,
                             self.bias, gain, in_rank, out_rank, energy, entropy,
                             self.policy.bias_for(x.shape[0]), grad, base.out.dtype)
        if in_rank is None:
            ctx.keep_input_ranking(key, self.topk, parts.in_rank)
        ok = parts.ok
        if ctx.replaying:
            pass  # the forward replayed counted this plan's fallbacks
        elif torch.compiler.is_compiling():
            # A growing Python list is a guard that fails every forward; in a graph the in-place add fuses.
            self._fallbacks.add_((~ok).sum())
        else:
            self._oks.append(ok)
            if len(self._oks) >= 64:
                self._fold_fallbacks()
            if ctx.fallback_flags is not None:  # a per-sequence count was asked for (vps.count_fallbacks)
                ctx.fallback_flags.append(ok)
        decision = Decision(sigma=parts.sigma, rank=parts.rank, topk=parts.topk, gamma=parts.gamma,
                            order=parts.order, energy=parts.energy, entropy=entropy)
        # SC always mixes the output features (coef), SK never: the name follows from the parts.
        selection = Selection(parts.in_idx, parts.out_idx, parts.coef, parts.selection_ok,
                              "sk" if parts.coef is None else "sc")
        return Plan(parts.out_idx, parts.coef, parts.q, parts.a_fold, parts.bias_sel, selection, decision)

    @property
    def _spec(self) -> PlanSpec:
        cfg = self.cfg
        return PlanSpec(self.topk, self._transposed, cfg.tau, cfg.resolved_order_bounds[1], cfg.damping)

    def _output_ranking(self, key: torch.Tensor, h0: torch.Tensor, base: BaseOutput,
                        tm: TokenMask) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k output features and the energy of ``h0`` (the base output without bias, plan layout)."""
        if base.out_rank is not None:  # the coupled partner already ranked this output
            assert base.energy is not None  # handed over together with out_rank (QKPair.rank_jointly)
            return base.out_rank, base.energy
        scores, energy = activation_stats.output_scores(h0, tm)
        if base.peer_out is None:
            return rank_features(scores, self.topk, nonnegative=True), energy
        pair = self.pair
        assert pair is not None and base.peer_h0 is not None  # only the layer's QKPair sets them
        peer_h0 = base.peer_h0
        if self.cfg.scope == "batch":
            peer_h0 = _as_one_sequence(peer_h0)
        peer_scores, peer_energy = activation_stats.output_scores(peer_h0, tm)
        return pair.rank_jointly(self, key, scores, base.peer_out, peer_scores, peer_energy, self.topk), energy

    def _fold_fallbacks(self) -> None:
        # Plans record their (B,) ok flags and the count is folded in batches: counting on every
        # forward would cost a few tensor ops per layer and forward.
        oks, self._oks = self._oks, []
        if oks:
            self._fallbacks = self._fallbacks + sum((~ok).sum() for ok in oks)

    def without_bias(self, out: torch.Tensor) -> torch.Tensor:
        """``out`` less this layer's bias: the base output ``W x`` that plans are built from. Under an
        accelerate hook, call it inside the hooked call: an offloaded bias is loaded only there."""
        bias = self.bias
        return out if bias is None else out - bias

    # -- gradient capture ----------------------------------------------------------------------
    def _capture_gradient(self, y: torch.Tensor, mask: torch.Tensor) -> None:
        batch_scope = self.cfg.scope == "batch"

        def keep(grad: torch.Tensor) -> None:
            m = mask.unsqueeze(-1).to(grad.dtype)
            total = (grad * m).sum(dim=1)
            count = m.sum(dim=1)
            if batch_scope:
                total, count = total.sum(0, keepdim=True), count.sum(0, keepdim=True)
            self.grad_mean = (total / count.clamp_min(1)).detach().float()

        y.register_hook(keep)

    def _consume_gradient(self, batch: int) -> torch.Tensor | None:
        g, self.grad_mean = self.grad_mean, None
        if g is None or g.shape[0] not in (1, batch):
            return None
        return g

    def clear_gradient(self) -> None:
        """Drop a captured gradient without using it."""
        self.grad_mean = None


def _as_one_sequence(t: torch.Tensor) -> torch.Tensor:
    # scope="batch": every sequence's tokens form one row, so all of them share one plan
    return t.reshape(1, -1, *t.shape[2:])


def _strip_base_prefix(module: nn.Module, state_dict: dict[str, Any], prefix: str, local_metadata: Any) -> None:
    # The patched model's state_dict keeps the unpatched model's keys, so checkpoints stay compatible.
    inner = prefix + "base_layer."
    for key in [k for k in state_dict if k.startswith(inner)]:
        state_dict[prefix + key[len(inner):]] = state_dict.pop(key)


def _add_base_prefix(module: nn.Module, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
    for name in ("weight", "bias"):
        key = prefix + name
        if key in state_dict:
            state_dict[prefix + "base_layer." + name] = state_dict.pop(key)
