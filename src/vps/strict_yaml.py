"""YAML as the grid, search-space and results-index files need it: a key given twice is an error, and a
number in scientific notation is a number.

PyYAML's safe loader keeps the last of two equal keys without a word, so a grid entry written twice ran
only its second half; and it follows YAML 1.1, where ``1e-300`` (no dot) is a string, so a bound written
that way reached the code as text. Kept free of torch: the CLI's parsers import it.
"""

from __future__ import annotations

import re
from typing import Any

import yaml

__all__ = ["safe_load"]

# YAML 1.2's float forms that YAML 1.1 reads as strings: an exponent without a dot ("1e-300", "2E5").
_EXPONENT_FLOAT = re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$")


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys and reads ``1e-300`` as a float."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, yaml.Node] = {}
        for key_node, _value in node.value:
            key = self.construct_object(key_node, deep=deep)
            try:
                first = seen.get(key)
            except TypeError:  # an unhashable key: the base constructor says so
                break
            if first is not None:
                raise yaml.YAMLError(f"line {key_node.start_mark.line + 1}: key {key!r} appears twice (first on line "
                                     f"{first.start_mark.line + 1}); a second value would silently replace the first")
            seen[key] = key_node
        return super().construct_mapping(node, deep=deep)


_StrictLoader.add_implicit_resolver("tag:yaml.org,2002:float", _EXPONENT_FLOAT, list("-+0123456789"))


def safe_load(text: str) -> Any:
    """``yaml.safe_load`` with duplicate keys refused (a `yaml.YAMLError` naming the key and both lines) and
    scientific notation without a dot read as a float."""
    return yaml.load(text, Loader=_StrictLoader)  # noqa: S506  (a SafeLoader subclass)
