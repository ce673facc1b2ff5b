"""Parse and validate one persona YAML document.

`parse_persona` turns a file's text into a `Persona`. It collects every schema
error with its line before raising one `PersonaError`, so a writer can fix a
whole file in one pass. The lookup of files by name is in `personas`.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, cast, get_args

from safety_lens_cli.errors import PersonaError
from safety_lens_cli.persona_yaml import FieldPath, LineIndex, format_field, load_yaml_with_lines

logger = logging.getLogger(__name__)

Position = Literal["last", "mean", "response-mean"]
POSITIONS: tuple[str, ...] = get_args(Position)

# Used with `fullmatch`, because `re.match` lets `$` accept a trailing newline.
NAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")
MIN_PAIRS = 2

_TOP_KEYS = ("name", "description", "version", "position", "pairs", "eval")
_PAIR_KEYS = ("system", "user", "positive", "negative")
_EVAL_KEYS = ("system", "user", "response", "text", "label")



@dataclass(frozen=True)
class Pair:
    """One contrastive pair: two responses to the same context that differ in the trait only."""

    positive: str
    negative: str
    user: str | None = None
    system: str | None = None
    line: int = 0  # 1-based line of the pair in its file, or 0 for a pair built in code

    @property
    def is_plain(self) -> bool:
        """True for a plain-text pair, which has no user turn and is read without a chat template."""
        return self.user is None


@dataclass(frozen=True)
class EvalItem:
    """One held-out labelled stimulus: label 1 marks a stimulus that shows the trait, 0 one that does not."""

    label: int
    response: str | None = None
    text: str | None = None
    user: str | None = None
    system: str | None = None
    line: int = 0  # 1-based line of the item in its file, or 0 for an item built in code

    @property
    def is_plain(self) -> bool:
        """True for a plain item, which carries `text` in place of a user turn and a response."""
        return self.user is None


@dataclass(frozen=True)
class Persona:
    """A validated stimulus set for one trait."""

    name: str
    description: str
    version: int
    pairs: tuple[Pair, ...]
    eval_items: tuple[EvalItem, ...]
    source: Path
    default_position: Position | None
    stimulus_sha256: str  # see `stimulus_sha256`
    builtin: bool = False


def stimulus_sha256(name: str, version: int, position: str | None, pairs: Iterable[Pair]) -> str:
    """Hash what extraction reads, so a vector can be tied to the exact stimuli.

    The input is canonical JSON of the name, version, position and every pair's
    non-None fields except `line`. Comments, quoting and key order in the YAML
    file therefore leave the hash unchanged, and any edit to a stimulus changes it.
    """
    records = []
    for pair in pairs:
        record = {
            field.name: getattr(pair, field.name)
            for field in dataclasses.fields(pair)
            if field.name != "line" and getattr(pair, field.name) is not None
        }
        records.append(record)
    document = {"name": name, "version": version, "position": position, "pairs": records}
    encoded = json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(encoded.encode("utf-8")).hexdigest()


def describe_value(value: Any) -> str:
    """Name a YAML value's type for an error message, with the value when it is short."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"boolean {str(value).lower()}"
    if isinstance(value, (int, float)):
        return f"number {value!r}"
    if isinstance(value, str):
        if not value.strip():
            return "an empty string"
        shown = value if len(value) <= 40 else value[:37] + "..."
        return f"string {shown!r}"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    return type(value).__name__


@dataclass(frozen=True)
class SchemaIssue:
    """One schema error, located by line and field path."""

    line: int
    field: str
    message: str

    def format(self, source: Path) -> str:
        where = f" field '{self.field}':" if self.field else ""
        return f"{source}:{self.line}:{where} {self.message}"


class _Checker:
    """Collects every schema error in one document instead of stopping at the first."""

    def __init__(self, index: LineIndex) -> None:
        self.index = index
        self.issues: list[SchemaIssue] = []

    def error(self, path: FieldPath, message: str) -> None:
        self.issues.append(SchemaIssue(self.index.line(path), format_field(path), message))

    def unknown_keys(self, data: dict[Any, Any], path: FieldPath, allowed: tuple[str, ...]) -> None:
        for key in data:
            if key in allowed:
                continue
            message = f"unknown key. Allowed keys: {', '.join(allowed)}"
            close = difflib.get_close_matches(str(key), allowed, n=1)
            if close:
                message += f" (did you mean '{close[0]}'?)"
            self.error(path + (str(key),), message)

    def string(self, data: dict[Any, Any], key: str, path: FieldPath, *, required: bool) -> str | None:
        """Return the stripped string at `data[key]`, or None after recording why it is invalid."""
        if key not in data:
            if required:
                self.error(path + (key,), "missing required key")
            return None
        value = data[key]
        if not isinstance(value, str) or not value.strip():
            message = f"expected a non-empty string, got {describe_value(value)}"
            if isinstance(value, bool):
                message += (
                    " (YAML reads unquoted yes, no, on, off, true and false as booleans, so quote the text)"
                )
            self.error(path + (key,), message)
            return None
        return value.strip()


def parse_persona(
    text: str, source: Path, *, expected_name: str | None = None, builtin: bool = False
) -> Persona:
    """Parse and validate persona YAML `text` read from `source`.

    `expected_name` is the file stem for files found by name: their `name` must
    equal it, or a lookup by name would return a persona of another name.
    Raises `PersonaError` that lists every error as `source:line: field '...': ...`.
    """
    data, index = load_yaml_with_lines(text, source)
    if index is None or not isinstance(data, dict):
        got = "an empty file" if index is None else describe_value(data)
        raise PersonaError(
            f"{source}:1: top level must be a mapping with name, description, version and pairs, got {got}"
        )

    checker = _Checker(index)
    for path, line, first_line in index.duplicate_keys:
        message = f"duplicate key (first set at line {first_line})"
        checker.issues.append(SchemaIssue(line, format_field(path), message))
    checker.unknown_keys(data, (), _TOP_KEYS)

    name = checker.string(data, "name", (), required=True)
    if name is not None and not NAME_PATTERN.fullmatch(name):
        checker.error(
            ("name",),
            f"invalid name {name!r}: use 1-64 lowercase letters, digits, '-' or '_', "
            "starting with a letter or digit",
        )
    elif name is not None and expected_name is not None and name != expected_name:
        checker.error(
            ("name",),
            f"name {name!r} does not match the file name {expected_name!r}. Rename the file or the persona.",
        )
    description = checker.string(data, "description", (), required=True)
    version = _check_version(checker, data)
    position = _check_position(checker, data)
    pairs = _check_pairs(checker, data)
    eval_items = _check_eval(checker, data, pairs)

    if checker.issues:
        checker.issues.sort(key=lambda issue: issue.line)
        lines = "\n".join("  " + issue.format(source) for issue in checker.issues)
        count = len(checker.issues)
        noun = "error" if count == 1 else "errors"
        raise PersonaError(f"persona file '{source}' is invalid ({count} {noun}):\n{lines}")

    # Every check above passed, so none of these is None.
    assert name is not None
    assert description is not None
    assert version is not None
    persona = Persona(
        name=name,
        description=description,
        version=version,
        pairs=tuple(pairs),
        eval_items=tuple(eval_items),
        source=source,
        default_position=position,
        stimulus_sha256=stimulus_sha256(name, version, position, pairs),
        builtin=builtin,
    )
    logger.debug(
        "parsed persona %s from %s: %d pairs, %d eval items", name, source, len(pairs), len(eval_items)
    )
    return persona


def _check_version(checker: _Checker, data: dict[Any, Any]) -> int | None:
    if "version" not in data:
        checker.error(("version",), "missing required key")
        return None
    value = data["version"]
    # bool is a subclass of int, and `version: yes` is almost surely a mistake.
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        checker.error(("version",), f"expected a positive integer, got {describe_value(value)}")
        return None
    return value


def _check_position(checker: _Checker, data: dict[Any, Any]) -> Position | None:
    if "position" not in data:
        return None
    value = data["position"]
    if value not in POSITIONS:
        checker.error(("position",), f"expected one of {', '.join(POSITIONS)}, got {describe_value(value)}")
        return None
    return cast(Position, value)


def _check_pairs(checker: _Checker, data: dict[Any, Any]) -> list[Pair]:
    if "pairs" not in data:
        checker.error(("pairs",), "missing required key")
        return []
    items = data["pairs"]
    if not isinstance(items, list) or len(items) < MIN_PAIRS:
        if isinstance(items, list):
            got = f"{len(items)} item" if len(items) == 1 else f"{len(items)} items"
        else:
            got = describe_value(items)
        checker.error(("pairs",), f"expected a list of at least {MIN_PAIRS} pairs, got {got}")
        if not isinstance(items, list):
            return []

    pairs: list[Pair] = []
    first_seen: dict[tuple[str | None, str, str], int] = {}
    for index, item in enumerate(items):
        path: FieldPath = ("pairs", index)
        if not isinstance(item, dict):
            checker.error(path, f"expected a mapping with positive and negative, got {describe_value(item)}")
            continue
        checker.unknown_keys(item, path, _PAIR_KEYS)
        if "system" in item and "user" not in item:
            checker.error(
                path + ("system",),
                "a plain-text pair takes only positive and negative. Add 'user' to make it a role pair.",
            )
        user = checker.string(item, "user", path, required=False)
        system = checker.string(item, "system", path, required=False)
        positive = checker.string(item, "positive", path, required=True)
        negative = checker.string(item, "negative", path, required=True)
        if positive is None or negative is None or ("user" in item and user is None):
            continue
        if positive == negative:
            checker.error(
                path, "positive and negative are identical, but the two sides must differ in the trait"
            )
        key = (user, positive, negative)
        if key in first_seen:
            first = first_seen[key]
            first_line = checker.index.line(("pairs", first))
            checker.error(
                path, f"duplicate of pairs[{first}] (line {first_line}): same user, positive and negative"
            )
            continue
        first_seen[key] = index
        pairs.append(Pair(positive, negative, user, system, line=checker.index.line(path)))
    return pairs


def _check_eval(checker: _Checker, data: dict[Any, Any], pairs: list[Pair]) -> list[EvalItem]:
    if "eval" not in data:
        return []
    items = data["eval"]
    if not isinstance(items, list):
        checker.error(("eval",), f"expected a list of eval items, got {describe_value(items)}")
        return []

    # Exact copies of a pair's stimulus would let extraction see the held-out set.
    pair_stimuli: dict[tuple[str | None, str], str] = {}
    for pair in pairs:
        pair_stimuli.setdefault((pair.user, pair.positive), f"the positive of the pair at line {pair.line}")
        pair_stimuli.setdefault((pair.user, pair.negative), f"the negative of the pair at line {pair.line}")

    eval_items: list[EvalItem] = []
    first_seen: dict[tuple[str | None, str | None, str | None], int] = {}
    for index, item in enumerate(items):
        path: FieldPath = ("eval", index)
        if not isinstance(item, dict):
            checker.error(
                path,
                "expected a mapping with label and either text or user and response, "
                f"got {describe_value(item)}",
            )
            continue
        checker.unknown_keys(item, path, _EVAL_KEYS)
        is_role = "user" in item or "response" in item
        if is_role and "text" in item:
            checker.error(
                path + ("text",),
                "an eval item has either 'text' (plain) or 'user' and 'response' (role), not both",
            )
        if not is_role and "system" in item:
            checker.error(
                path + ("system",),
                "a plain eval item takes only text and label. "
                "Add 'user' and 'response' to make it a role item.",
            )
        label = _check_label(checker, item, path)
        if is_role:
            user = checker.string(item, "user", path, required=True)
            response = checker.string(item, "response", path, required=True)
            system = checker.string(item, "system", path, required=False)
            text = None
            stimulus = (user, response)
        else:
            text = checker.string(item, "text", path, required=True)
            user = response = system = None
            stimulus = (None, text)
        if label is None or stimulus[1] is None or (is_role and user is None):
            continue

        copied = pair_stimuli.get(cast("tuple[str | None, str]", stimulus))
        if copied is not None:
            checker.error(path, f"copies {copied}, but eval items must be held out from the pairs")
        key = (user, response, text)
        if key in first_seen:
            first = first_seen[key]
            first_line = checker.index.line(("eval", first))
            checker.error(path, f"duplicate of eval[{first}] (line {first_line})")
            continue
        first_seen[key] = index
        eval_items.append(EvalItem(label, response, text, user, system, line=checker.index.line(path)))
    return eval_items


def _check_label(checker: _Checker, item: dict[Any, Any], path: FieldPath) -> int | None:
    if "label" not in item:
        checker.error(path + ("label",), "missing required key")
        return None
    value = item["label"]
    # `label: true` parses as bool, which is an int subclass, but the schema expects the integers 0 or 1.
    if isinstance(value, bool) or not isinstance(value, int) or value not in (0, 1):
        checker.error(path + ("label",), f"expected 0 or 1, got {describe_value(value)}")
        return None
    return value
