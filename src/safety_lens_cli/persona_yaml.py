"""Parse YAML with the safe loader and keep the line of every key and list item.

PyYAML's `safe_load` drops source positions, so the persona schema checks use
the composed node tree (whose nodes carry `start_mark`) to report `file:line`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from safety_lens_cli.errors import PersonaError

# A field path such as ("pairs", 3, "positive"): str for mapping keys, int for list indices.
FieldPath = tuple["str | int", ...]


def format_field(path: FieldPath) -> str:
    """Render ("pairs", 3, "positive") as "pairs[3].positive"."""
    text = ""
    for part in path:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            text += f".{part}" if text else part
    return text


class LineIndex:
    """The 1-based line of every mapping key and list item in a YAML node tree, by field path."""

    def __init__(self, root: yaml.Node) -> None:
        self._lines: dict[FieldPath, int] = {(): root.start_mark.line + 1}
        self.duplicate_keys: list[tuple[FieldPath, int, int]] = []  # (path, line, first line)
        # Aliases share nodes, so each node is walked once. This also stops at
        # recursive anchors and keeps nested aliases from costing exponential time.
        self._seen: set[int] = set()
        self._walk(root, ())

    def _walk(self, node: yaml.Node, path: FieldPath) -> None:
        if id(node) in self._seen:
            return
        self._seen.add(id(node))
        if isinstance(node, yaml.MappingNode):
            first_lines: dict[str, int] = {}
            for key_node, value_node in node.value:
                key = str(key_node.value) if isinstance(key_node, yaml.ScalarNode) else "?"
                line = key_node.start_mark.line + 1
                if key in first_lines and key != "<<":
                    self.duplicate_keys.append((path + (key,), line, first_lines[key]))
                    continue
                first_lines[key] = line
                self._lines[path + (key,)] = line
                self._walk(value_node, path + (key,))
        elif isinstance(node, yaml.SequenceNode):
            for index, item in enumerate(node.value):
                self._lines[path + (index,)] = item.start_mark.line + 1
                self._walk(item, path + (index,))

    def line(self, path: FieldPath) -> int:
        """Return the line of `path`, or of its nearest indexed ancestor when `path` is a missing key."""
        while path not in self._lines:
            path = path[:-1]
        return self._lines[path]


def load_yaml_with_lines(text: str, source: Path) -> tuple[Any, LineIndex | None]:
    """Parse `text` with the safe loader into its data and line index, or (None, None) when it is empty.

    Raises `PersonaError` with the line of a YAML syntax error.
    """
    loader = yaml.SafeLoader(text)
    try:
        root = loader.get_single_node()
        if root is None:
            return None, None
        # Index before constructing: construction flattens merge keys (`<<`) in
        # place, which would make overridden merged keys look like duplicates.
        index = LineIndex(root)
        return loader.construct_document(root), index
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else 1
        problem = exc.problem or exc.context or "syntax error"
        raise PersonaError(f"{source}:{line}: invalid YAML: {problem}") from None
    except yaml.YAMLError as exc:
        raise PersonaError(f"{source}: invalid YAML: {exc}") from None
    finally:
        loader.dispose()
