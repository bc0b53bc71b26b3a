"""The method registry: every evaluation method by name, with what the rest of the evaluation asks of it.

A method *family* is one runner shared by a few names (``base`` and ``vps`` generate, one unpatched and one
patched; ``refine-self`` and ``refine-oracle`` are the refinement loop without and with the gold answer;
``maj@K`` and ``vps-maj@K`` vote over K samples). Each name is a `Method`: its runner (`Method.start`), its
traits (patched, oracle, takes votes, draws samples, refines), the fields its rows add to the common ones
(`vps.evaluation.methods.rows.COMMON_FIELDS`), and its lines in report.md. A module registers its names with
`register` when it is imported; the harness, ``vps eval --methods``, grid files, run-directory checks and the
report all look methods up here, so a new method is one new module that calls `register`.

The order of registration is the order ``--methods`` lists them in and error messages name them in; the
built-in modules register in the order the methods were added to the project.

Importing this module (and every built-in method module) imports no torch: the command line's choices are
read from here when its parser is built.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ...config import VPSConfig
from ...refinement.config import MAX_SAMPLES

if TYPE_CHECKING:
    from ..data import Item
    from ..settings import RunSettings

__all__ = ["BatchRunner", "Method", "MethodSpec", "RunContext", "find_method", "generation_passes", "get_method",
           "method_names", "register", "registered", "unregister", "vote_method_names"]

Row = dict[str, Any]
# A method's runner for one configuration: a batch of items in, one row per item out (in the batch's order).
BatchRunner = Callable[[Sequence["Item"]], list[Row]]


@dataclass
class RunContext:
    """What a method's runner reads of the run it belongs to (built by the harness once per run).

    ``prompts`` holds every item's rendered prompt by id; ``solution_prefix`` goes before a gold solution
    that is scored (the prompt style's); ``generate_fn`` and ``refine_fn`` are the harness's (``refine_fn``
    None: the library's `refine_many`); ``clock`` times batches; ``sample_cache`` (None unless a method of the
    run draws samples) shares sampled completions between the methods that draw the same ones;
    ``checkpoint_activations`` is `RefineConfig.checkpoint_activations` for the refine methods.
    """

    model: Any
    tokenizer: Any
    settings: RunSettings
    prompts: dict[str, str]
    solution_prefix: str
    generate_fn: Callable[..., Any]
    refine_fn: Callable[..., Any] | None
    clock: Callable[[], float]
    sample_cache: Any = None
    checkpoint_activations: bool = False


def generation_passes(row: Row) -> tuple[int, int] | None:
    """The model passes a generating row spent, (forward, backward): one forward per generated token (the first
    token comes from the prompt's prefill, each later one from a decode step) and no backward; None when the row
    records no tokens (an NLL-only row). Methods whose rows spend more register their own `Method.passes`."""
    tokens = row.get("tokens")
    return None if not isinstance(tokens, int) else (tokens, 0)


@dataclass(frozen=True)
class Method:
    """One evaluation method as the registry holds it.

    ``start(context, spec)`` is called once per configuration, with the model already as the method needs it
    (patched with ``spec.config`` when ``patched``), and returns the function that runs one batch.
    ``patched``: the method runs the VPS-patched model (and its configurations carry a `VPSConfig`).
    ``oracle``: it reads the gold answer at test time (every output says so). ``votes``: it takes K
    (written ``name@K``). ``samples``: it draws sampled completions (so it cannot run in an NLL-only run, and
    its rows record them under ``sample_field``, from which a resumed run restores them). ``refines``: it is
    the refinement loop (gradients captured, so every VPSConfig field acts; needs self-consistency samples).
    ``row_fields``: the keys its rows add after the common ones. ``report_lines(entries)``: its lines in
    report.md's description, given the summary entries of every method that shares the same function (so a
    family states its note once). ``rescore_note``: what ``vps rescore`` keeps of its rows, said in the report.
    ``passes(row)``: the (forward, backward) model passes the row spent, for comparing methods at equal compute
    (default `generation_passes`).
    """

    name: str
    start: Callable[[RunContext, MethodSpec], BatchRunner]
    patched: bool = True
    oracle: bool = False
    votes: bool = False
    samples: bool = False
    refines: bool = False
    row_fields: tuple[str, ...] = ()
    sample_field: str | None = None
    report_lines: Callable[[Sequence[dict[str, Any]]], list[str]] | None = None
    rescore_note: str | None = None
    passes: Callable[[Row], tuple[int, int] | None] = generation_passes

    def __post_init__(self) -> None:
        # "@" and "," are the --methods syntax (name@K, comma-separated); a name holding them could not be given.
        if not self.name or any(c in self.name for c in "@, ") or self.name != self.name.strip():
            raise ValueError(f"a method name must be non-empty, without '@', ',' or spaces, got {self.name!r}")
        if self.samples and self.sample_field is None:
            raise ValueError(f"method {self.name!r} draws samples and must name the row field that records them")


_REGISTRY: dict[str, Method] = {}


def register(method: Method) -> Method:
    """Add ``method`` to the registry (a name is registered once); returns it."""
    if method.name in _REGISTRY:
        raise ValueError(f"method {method.name!r} is already registered")
    _REGISTRY[method.name] = method
    return method


def unregister(name: str) -> Method:
    """Remove the method ``name`` (a test's, or one replaced at run time); returns it."""
    try:
        return _REGISTRY.pop(name)
    except KeyError:
        raise KeyError(f"method {name!r} is not registered") from None


def registered() -> tuple[Method, ...]:
    """Every registered method, in the order of registration."""
    return tuple(_REGISTRY.values())


def method_names() -> tuple[str, ...]:
    """The registered methods' names, in the order of registration."""
    return tuple(_REGISTRY)


def vote_method_names() -> tuple[str, ...]:
    """The names of the methods that take votes (K), in the order of registration."""
    return tuple(m.name for m in _REGISTRY.values() if m.votes)


def find_method(name: Any) -> Method | None:
    """The method registered as ``name``, or None (e.g. a stored row's method no longer registered)."""
    return _REGISTRY.get(name) if isinstance(name, str) else None


def get_method(name: str) -> Method:
    """The method registered as ``name``; ValueError listing the registered ones otherwise."""
    method = find_method(name)
    if method is None:
        raise ValueError(f"method must be one of {method_names()}, got {name!r}")
    return method


@dataclass(frozen=True)
class MethodSpec:
    """One thing to evaluate: a label, how it runs, and its VPS configuration.

    ``name`` labels the rows (unique within a run); ``method`` is a registered method's name; ``config`` is
    the VPS configuration of a patched method (None for the unpatched ones, ``base`` and ``maj``; a patched
    method given none gets the defaults). ``refine-oracle`` reads the gold answer at test time, so it is an
    *oracle* method and every output says so. ``votes`` is K of the methods that take it (``maj@K``,
    ``vps-maj@K``), and only theirs.
    """

    name: str
    method: str
    config: VPSConfig | None = None
    votes: int | None = None

    def __post_init__(self) -> None:
        family = get_method(self.method)
        if not family.patched and self.config is not None:
            raise ValueError(f"{self.name!r}: method {self.method!r} runs the unpatched model and takes no VPS config")
        if family.patched and self.config is None:
            object.__setattr__(self, "config", VPSConfig())
        if family.votes:
            if isinstance(self.votes, bool) or not isinstance(self.votes, int) or not 1 <= self.votes <= MAX_SAMPLES:
                raise ValueError(f"{self.name!r}: method {self.method!r} needs votes (k) in [1, {MAX_SAMPLES}] (the k "
                                 f"samples of a prompt are drawn in one generate call), got {self.votes!r}")
        elif self.votes is not None:
            raise ValueError(f"{self.name!r}: only {' and '.join(vote_method_names())} take votes")

    @property
    def family(self) -> Method:
        """The registered `Method` this spec runs."""
        return get_method(self.method)

    @property
    def oracle(self) -> bool:
        """Whether the method uses the gold answer at test time."""
        return self.family.oracle

    @property
    def patched(self) -> bool:
        """Whether the method runs the VPS-patched model."""
        return self.family.patched

    @property
    def refines(self) -> bool:
        """Whether the method is the refinement loop (self or oracle)."""
        return self.family.refines

    @property
    def samples(self) -> bool:
        """Whether the method draws sampled completions (refinement's self-consistency samples, votes)."""
        return self.family.samples

    def to_dict(self) -> dict[str, Any]:
        out = {"method": self.method, "oracle": self.oracle,
               "config": None if self.config is None else self.config.to_dict()}
        if self.votes is not None:
            out["votes"] = self.votes
        return out

    @classmethod
    def from_dict(cls, name: str, data: dict[str, Any]) -> MethodSpec:
        cfg = data.get("config")
        return cls(name, data["method"], None if cfg is None else VPSConfig.from_dict(cfg), data.get("votes"))
