"""What a benchmark run times: the overhead targets, one `Workload`, and the sizes of a run (`BenchSettings`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..compiling import check_mode
from ..config import VPSConfig

__all__ = ["TARGET_DECODE_B1", "TARGET_MEMORY", "TARGET_PREFILL_BATCH", "TARGET_PREFILL_LONG", "WORKLOAD_KINDS",
           "BenchSettings", "Workload"]

# The overhead targets of BENCHMARKS.md (ratios to the unpatched model). Prefill targets belong to workload roles (the
# first prefill shape is "one long sequence", the second "a batch") of a measurement; --quick sizes are a smoke test
# whose ratios say nothing about them, so a quick run has no target.
TARGET_PREFILL_LONG = 1.10  # batch 1 x 512
TARGET_PREFILL_BATCH = 1.05  # batch 8 x 128
TARGET_DECODE_B1 = 1.15  # frozen decode, time per token at batch 1 (the decode loop and generate() alike)
TARGET_MEMORY = 1.02  # peak memory

WORKLOAD_KINDS = ("prefill", "decode", "generate")


@dataclass(frozen=True)
class Workload:
    """One thing to time: a prefill of ``batch x tokens``, or ``new_tokens`` decode steps after a prompt."""

    kind: str  # "prefill" | "decode" | "generate"
    batch: int
    tokens: int  # prefill length, or the decode prompt's length
    new_tokens: int = 0
    repeats: int = 5
    target: float | None = None
    frozen_only: bool = False  # the target applies to decode_mode="frozen" configs only

    @property
    def key(self) -> str:
        return f"prefill_{self.batch}x{self.tokens}" if self.kind == "prefill" else f"{self.kind}_b{self.batch}"

    @property
    def label(self) -> str:
        if self.kind == "prefill":
            return f"prefill {self.batch}x{self.tokens}"
        return f"{'generate()' if self.kind == 'generate' else 'decode'} b{self.batch}"

    @property
    def per_token(self) -> bool:
        """Whether the figure is seconds per new token (and tokens/s is reported beside it)."""
        return self.kind != "prefill"

    def target_for(self, cfg: VPSConfig) -> float | None:
        """The target ratio of this workload for ``cfg`` (None where none applies)."""
        if self.frozen_only and cfg.decode_mode != "frozen":
            return None
        return self.target


@dataclass
class BenchSettings:
    """Sizes and repeat counts of a benchmark run."""

    prefill_shapes: list[tuple[int, int]] = field(default_factory=lambda: [(1, 512), (8, 128)])
    decode_batches: list[int] = field(default_factory=lambda: [1, 8])
    generate_batches: list[int] = field(default_factory=lambda: [1, 8])
    prompt_tokens: int = 32
    new_tokens: int = 64
    prefill_repeats: int = 5
    decode_repeats: int = 3
    warmup: int = 1
    seed: int = 0
    memory: bool = True
    quick: bool = False
    kinds: tuple[str, ...] = WORKLOAD_KINDS  # which workload kinds run
    compile: str | None = None  # a torch.compile mode: every variant compiled the same way (warm-up compiles)

    @classmethod
    def quick_settings(cls, **overrides: Any) -> BenchSettings:
        """Tiny sizes: for smoke tests and tiny models (positions stay below 64)."""
        values: dict[str, Any] = dict(prefill_shapes=[(1, 32), (2, 16)], decode_batches=[1, 2],
                                      generate_batches=[1, 2], prompt_tokens=8,
                                      new_tokens=4, prefill_repeats=2, decode_repeats=2, warmup=1, quick=True)
        values.update(overrides)
        return cls(**values)

    def validate(self) -> None:
        """Raise ValueError naming the first size or count out of range."""
        for name in ("prompt_tokens", "new_tokens", "prefill_repeats", "decode_repeats"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        unknown = [k for k in self.kinds if k not in WORKLOAD_KINDS]
        if unknown or not self.kinds:
            raise ValueError(f"workload kinds must be a non-empty subset of {', '.join(WORKLOAD_KINDS)}, "
                             f"got {', '.join(self.kinds) or 'none'}")
        if self.warmup < 0:
            raise ValueError(f"warmup must be >= 0, got {self.warmup}")
        if self.compile is not None:
            check_mode(self.compile)
            if self.warmup < 1:
                raise ValueError("--compile needs --warmup >= 1: the warm-up round compiles, untimed")
        if any(b < 1 or t < 1 for b, t in self.prefill_shapes) or any(
                b < 1 for b in [*self.decode_batches, *self.generate_batches]):
            raise ValueError("batch sizes and token counts must be >= 1")

    @property
    def memory_target(self) -> float | None:
        """The peak-memory target of this run (None for a --quick run: no target applies to it)."""
        return None if self.quick else TARGET_MEMORY

    def workloads(self) -> list[Workload]:
        """The workloads of the selected kinds, in run order: prefill shapes, decode batches, generate batches
        (without targets in a --quick run)."""
        prefill = () if self.quick else (TARGET_PREFILL_LONG, TARGET_PREFILL_BATCH)
        decode = None if self.quick else TARGET_DECODE_B1
        out = []
        for i, (b, t) in enumerate(self.prefill_shapes):
            out.append(Workload("prefill", b, t, repeats=self.prefill_repeats,
                                target=prefill[i] if i < len(prefill) else None))
        for i, b in enumerate(self.decode_batches):
            out.append(Workload("decode", b, self.prompt_tokens, self.new_tokens, repeats=self.decode_repeats,
                                target=decode if i == 0 else None, frozen_only=True))
        for i, b in enumerate(self.generate_batches):
            out.append(Workload("generate", b, self.prompt_tokens, self.new_tokens, repeats=self.decode_repeats,
                                target=decode if i == 0 else None, frozen_only=True))
        return [w for w in out if w.kind in self.kinds]
