"""Read prompts and conversations from JSON Lines or plain text, one line at a time.

Each non-blank input line becomes either an `InputRecord` or an `InputProblem`
that names the line and what is wrong with it, so callers decide whether to
stop, skip or record the line. Lines are read as bytes and decoded one by one,
so one line of invalid UTF-8 does not stop the rest of the file, and the whole
input is never held in memory.

A JSON Lines record is an object with one of these fields:

- `prompt` or `text`: a string, read as a single user turn;
- `messages`: chat turns `{"role": ..., "content": ...}` in the OpenAI format.

`id` (a string or an integer) is passed through; without it the id is the
line number. `label` (0 or 1, or false or true) marks the expected class.
"""

from __future__ import annotations

import io
import json
import sys
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Literal

from safety_lens_cli.errors import InputError, UsageError
from safety_lens_cli.rendering import validate_messages

InputFormat = Literal["jsonl", "text"]
INPUT_FORMATS: tuple[InputFormat, ...] = ("jsonl", "text")
# Fields searched, in this order, when no --field is given.
TEXT_FIELDS = ("prompt", "text")
MESSAGES_FIELD = "messages"
RESERVED_FIELDS = ("id", "label")
RecordId = str | int


@dataclass(frozen=True)
class InputRecord:
    """One readable input line: a prompt (`text`) or chat turns (`messages`), never both.

    `line` is the 1-based line number in the input. `meta` contains the other
    fields of the line when `keep_fields` was requested, else None.
    """

    id: RecordId
    line: int
    text: str | None = None
    messages: tuple[dict[str, str], ...] | None = None
    label: int | None = None
    meta: dict[str, Any] | None = None

    @property
    def chat(self) -> list[dict[str, str]]:
        """The record as chat turns; a prompt becomes one user turn."""
        if self.messages is not None:
            return list(self.messages)
        return [{"role": "user", "content": self.text or ""}]


@dataclass(frozen=True)
class InputProblem:
    """An input line that cannot be used, with the reason in plain words.

    `id` is the line's own id when it could be read, else the line number.
    """

    line: int
    id: RecordId
    message: str

    def describe(self) -> str:
        return f"line {self.line}: {self.message}"


InputItem = InputRecord | InputProblem


@dataclass(frozen=True)
class Shard:
    """Selects lines whose `(line_number - 1) % count == index`, as `--shard I/N` does."""

    index: int
    count: int

    def __post_init__(self) -> None:
        if self.count < 1 or not 0 <= self.index < self.count:
            raise UsageError(
                f"Invalid shard {self.index}/{self.count}: the index must be 0 to N-1 and N at least 1."
            )

    def selects(self, line: int) -> bool:
        return (line - 1) % self.count == self.index

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


def parse_shard(spec: str) -> Shard:
    """Parse `I/N`, for example `0/4` for the first of four shards."""
    index_text, sep, count_text = spec.partition("/")
    try:
        if not sep:
            raise ValueError
        return Shard(int(index_text), int(count_text))
    except ValueError:
        raise UsageError(
            f"Invalid --shard '{spec}': use I/N with 0 <= I < N, for example 0/4."
        ) from None


@dataclass
class ReadCounts:
    """Counts of what `read_records` consumed, updated as lines are read.

    `blank` counts whitespace-only lines, which are not records;
    `other_shards` counts lines that belong to other shards.
    """

    lines: int = 0
    blank: int = 0
    other_shards: int = 0
    bytes_read: int = 0


@dataclass
class _Source:
    handle: IO[bytes]
    close: bool = False
    name: str = "<stdin>"


def _open_source(source: str | Path | IO[bytes]) -> _Source:
    if isinstance(source, (str, Path)):
        if str(source) == "-":
            return _Source(sys.stdin.buffer, close=False, name="<stdin>")
        path = Path(source)
        if path.is_dir():
            raise InputError(f"Input '{path}' is a folder: pass a JSON Lines or text file.")
        try:
            return _Source(open(path, "rb"), close=True, name=str(path))
        except FileNotFoundError:
            raise InputError(f"Input file '{path}' not found: check the path given to --input.") from None
        except OSError as exc:
            raise InputError(f"Input file '{path}' cannot be opened: {exc.strerror}.") from None
    if isinstance(source, io.TextIOBase):
        raise TypeError("read_records needs a binary stream (for example sys.stdin.buffer), not a text stream")
    return _Source(source, close=False, name=getattr(source, "name", "<stream>"))


def read_records(
    source: str | Path | IO[bytes],
    *,
    fmt: InputFormat = "jsonl",
    field: str | None = None,
    keep_fields: bool = False,
    shard: Shard | None = None,
    counts: ReadCounts | None = None,
) -> Iterator[InputItem]:
    """Yield one `InputRecord` or `InputProblem` per non-blank line of `source`.

    `source` is a path, `-` for stdin, or a binary stream. `field` names the
    field to read instead of `prompt`, `text` or `messages`. With `shard`,
    lines of other shards are skipped without being parsed. `counts`, when
    given, is updated as lines are read.
    """
    if fmt not in INPUT_FORMATS:
        raise UsageError(f"Invalid input format '{fmt}': use jsonl or text.")
    counts = counts if counts is not None else ReadCounts()
    opened = _open_source(source)
    try:
        for number, raw in enumerate(opened.handle, start=1):
            counts.bytes_read += len(raw)
            if shard is not None and not shard.selects(number):
                counts.other_shards += 1
                continue
            item = _parse_line(raw, number, fmt=fmt, field=field, keep_fields=keep_fields)
            if item is None:
                counts.blank += 1
                continue
            counts.lines += 1
            yield item
    finally:
        if opened.close:
            opened.handle.close()


def records_from_texts(texts: Iterable[str]) -> Iterator[InputItem]:
    """Records for `--text` values: ids and line numbers count from 1; empty texts are problems."""
    for number, text in enumerate(texts, start=1):
        if not text.strip():
            yield InputProblem(number, number, "the text is empty")
        else:
            yield InputRecord(id=number, line=number, text=text)


def _parse_line(
    raw: bytes, number: int, *, fmt: InputFormat, field: str | None, keep_fields: bool
) -> InputItem | None:
    try:
        # utf-8-sig drops a byte order mark, which some editors write at the start of a file.
        line = raw.decode("utf-8-sig" if number == 1 else "utf-8")
    except UnicodeDecodeError as exc:
        return InputProblem(
            number, number, f"invalid UTF-8 at byte {exc.start + 1} of the line: save the file as UTF-8"
        )
    line = line.rstrip("\r\n")
    if not line.strip():
        return None
    if fmt == "text":
        return InputRecord(id=number, line=number, text=line)
    try:
        value = json.loads(line)
    except json.JSONDecodeError as exc:
        return InputProblem(number, number, f"invalid JSON ({exc.msg} at column {exc.colno})")
    if not isinstance(value, dict):
        return InputProblem(number, number, f"expected a JSON object, got {_json_type(value)}")
    return _parse_object(value, number, field=field, keep_fields=keep_fields)


def _parse_object(
    obj: dict[str, Any], number: int, *, field: str | None, keep_fields: bool
) -> InputItem:
    record_id, id_problem = _read_id(obj, number)
    if id_problem is not None:
        return InputProblem(number, number, id_problem)
    label, label_problem = _read_label(obj)
    if label_problem is not None:
        return InputProblem(number, record_id, label_problem)

    if field is not None:
        chosen = field
        if chosen not in obj:
            return InputProblem(number, record_id, f"missing field '{chosen}' (selected with --field)")
    else:
        present = [name for name in (*TEXT_FIELDS, MESSAGES_FIELD) if name in obj]
        if not present:
            return InputProblem(
                number, record_id, "missing field: expected 'prompt', 'text' or 'messages' (or pass --field)"
            )
        if len(present) > 1:
            names = " and ".join(f"'{name}'" for name in present)
            return InputProblem(number, record_id, f"ambiguous input: both {names} are present; pass --field")
        chosen = present[0]

    value = obj[chosen]
    meta = _meta(obj, chosen) if keep_fields else None
    if isinstance(value, str) and chosen != MESSAGES_FIELD:
        if not value.strip():
            return InputProblem(number, record_id, f"field '{chosen}' is empty")
        return InputRecord(id=record_id, line=number, text=value, label=label, meta=meta)
    if isinstance(value, list) and (field is not None or chosen == MESSAGES_FIELD):
        try:
            messages = validate_messages(value, where=f"field '{chosen}'")
        except InputError as exc:
            return InputProblem(number, record_id, str(exc).rstrip("."))
        if not any(m["content"].strip() for m in messages):
            return InputProblem(number, record_id, f"field '{chosen}' has only empty turns")
        return InputRecord(id=record_id, line=number, messages=tuple(messages), label=label, meta=meta)
    expected = "a list of chat turns" if chosen == MESSAGES_FIELD else "a string"
    if field is not None:
        expected = "a string or a list of chat turns"
    return InputProblem(number, record_id, f"field '{chosen}' must be {expected}, got {_json_type(value)}")


def _read_id(obj: Mapping[str, Any], number: int) -> tuple[RecordId, str | None]:
    if "id" not in obj:
        return number, None
    value = obj["id"]
    # bool is a subclass of int, but true/false as an id is almost certainly a mistake.
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        return number, f"field 'id' must be a string or an integer, got {_json_type(value)}"
    if isinstance(value, str) and not value:
        return number, "field 'id' is empty"
    return value, None


def _read_label(obj: Mapping[str, Any]) -> tuple[int | None, str | None]:
    value = obj.get("label")
    if value is None:
        return None, None
    if isinstance(value, bool):
        return int(value), None
    if isinstance(value, int) and value in (0, 1):
        return value, None
    return None, f"field 'label' must be 0 or 1, got {json.dumps(value)[:40]}"


def _meta(obj: Mapping[str, Any], chosen: str) -> dict[str, Any]:
    return {key: value for key, value in obj.items() if key != chosen and key not in RESERVED_FIELDS}


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__

