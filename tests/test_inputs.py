"""Reading scan inputs: JSON Lines and plain text, line by line, with a problem per bad line."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from safety_lens_cli.errors import InputError, UsageError
from safety_lens_cli.inputs import (
    InputProblem,
    InputRecord,
    ReadCounts,
    Shard,
    parse_shard,
    read_records,
    records_from_texts,
)


def _write(tmp_path: Path, lines: list[str | bytes], name: str = "in.jsonl") -> Path:
    path = tmp_path / name
    data = b"".join((line if isinstance(line, bytes) else line.encode()) + b"\n" for line in lines)
    path.write_bytes(data)
    return path


def _one(line: str | bytes, **kwargs: object) -> InputRecord | InputProblem:
    raw = line if isinstance(line, bytes) else line.encode()
    items = list(read_records(io.BytesIO(raw + b"\n"), **kwargs))  # type: ignore[arg-type]
    assert len(items) == 1
    return items[0]


def test_prompt_text_and_messages(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        [
            json.dumps({"prompt": "hello"}),
            json.dumps({"text": "world", "id": "b"}),
            json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}),
        ],
    )
    items = list(read_records(path))
    assert all(isinstance(item, InputRecord) for item in items)
    first, second, third = items
    assert (first.id, first.line, first.text, first.messages) == (1, 1, "hello", None)
    assert (second.id, second.line, second.text) == ("b", 2, "world")
    assert third.text is None
    assert third.messages == ({"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"})
    assert first.chat == [{"role": "user", "content": "hello"}]


def test_id_passthrough_types() -> None:
    assert _one('{"prompt": "a", "id": 7}').id == 7
    assert _one('{"prompt": "a", "id": "x-1"}').id == "x-1"
    problem = _one('{"prompt": "a", "id": [1]}')
    assert isinstance(problem, InputProblem)
    assert "'id' must be a string or an integer, got an array" in problem.message
    assert isinstance(_one('{"prompt": "a", "id": true}'), InputProblem)
    assert isinstance(_one('{"prompt": "a", "id": ""}'), InputProblem)


def test_label_values() -> None:
    assert _one('{"prompt": "a", "label": 1}').label == 1
    assert _one('{"prompt": "a", "label": 0}').label == 0
    assert _one('{"prompt": "a", "label": true}').label == 1
    assert _one('{"prompt": "a", "label": null}').label is None
    assert _one('{"prompt": "a"}').label is None
    problem = _one('{"prompt": "a", "label": 2, "id": "q"}')
    assert isinstance(problem, InputProblem)
    assert problem.id == "q"
    assert "'label' must be 0 or 1, got 2" in problem.message


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        (b'{"prompt": "a"', "invalid JSON"),
        (b"[1, 2]", "expected a JSON object, got an array"),
        (b'"just a string"', "expected a JSON object, got a string"),
        (b'{"id": 3}', "missing field: expected 'prompt', 'text' or 'messages'"),
        (b'{"prompt": ""}', "field 'prompt' is empty"),
        (b'{"prompt": "   "}', "field 'prompt' is empty"),
        (b'{"prompt": 42}', "field 'prompt' must be a string, got a number"),
        (b'{"text": ["a"]}', "field 'text' must be a string, got an array"),
        (b'{"messages": "hi"}', "field 'messages' must be a list of chat turns, got a string"),
        (b'{"messages": []}', "expected a non-empty list"),
        (b'{"messages": [{"role": "robot", "content": "x"}]}', "role: expected one of system, user, assistant"),
        (b'{"messages": [{"role": "user", "content": 5}]}', "content: expected a string, got int"),
        (b'{"messages": [{"role": "user", "content": ""}]}', "has only empty turns"),
        (b'{"prompt": "a", "messages": [{"role": "user", "content": "b"}]}', "ambiguous input"),
        (b'{"prompt": "caf\xe9"}', "invalid UTF-8 at byte 16"),
    ],
)
def test_bad_line_kinds(line: bytes, expected: str) -> None:
    problem = _one(line)
    assert isinstance(problem, InputProblem)
    assert expected in problem.message
    assert problem.line == 1
    assert problem.describe().startswith("line 1: ")


def test_problem_line_numbers(tmp_path: Path) -> None:
    path = _write(tmp_path, ['{"prompt": "ok"}', "not json", b"\xff\xfe", '{"prompt": "also ok"}', "{}"])
    items = list(read_records(path))
    kinds = [(type(item).__name__, item.line) for item in items]
    assert kinds == [
        ("InputRecord", 1),
        ("InputProblem", 2),
        ("InputProblem", 3),
        ("InputRecord", 4),
        ("InputProblem", 5),
    ]


def test_invalid_utf8_does_not_stop_reading(tmp_path: Path) -> None:
    path = _write(tmp_path, [b'{"prompt": "\xc3\x28"}', '{"prompt": "fine"}'])
    items = list(read_records(path))
    assert isinstance(items[0], InputProblem)
    assert isinstance(items[1], InputRecord)
    assert items[1].text == "fine"


def test_field_option() -> None:
    record = _one('{"question": "why?", "prompt": "ignored"}', field="question")
    assert isinstance(record, InputRecord)
    assert record.text == "why?"
    chat = _one('{"conv": [{"role": "user", "content": "hi"}]}', field="conv")
    assert isinstance(chat, InputRecord)
    assert chat.messages == ({"role": "user", "content": "hi"},)
    missing = _one('{"prompt": "a"}', field="question")
    assert isinstance(missing, InputProblem)
    assert "missing field 'question'" in missing.message


def test_keep_fields_meta() -> None:
    record = _one('{"prompt": "a", "id": 1, "label": 0, "source": "x", "n": 3}', keep_fields=True)
    assert isinstance(record, InputRecord)
    assert record.meta == {"source": "x", "n": 3}
    assert _one('{"prompt": "a", "source": "x"}').meta is None


def test_text_format_and_blank_lines(tmp_path: Path) -> None:
    path = _write(tmp_path, ["first prompt", "", "  ", '{"not": "parsed"}'], name="in.txt")
    counts = ReadCounts()
    items = list(read_records(path, fmt="text", counts=counts))
    assert [(item.line, item.text) for item in items] == [(1, "first prompt"), (4, '{"not": "parsed"}')]
    assert counts.lines == 2
    assert counts.blank == 2


def test_crlf_and_bom(tmp_path: Path) -> None:
    path = tmp_path / "crlf.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"prompt": "a"}\r\n{"prompt": "b"}\r\n')
    items = list(read_records(path))
    assert [item.text for item in items] == ["a", "b"]  # type: ignore[union-attr]


def test_last_line_without_newline(tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    path.write_bytes(b'{"prompt": "a"}\n{"prompt": "b"}')
    assert [item.line for item in read_records(path)] == [1, 2]


def test_stdin_dash(monkeypatch: pytest.MonkeyPatch) -> None:
    class FakeStdin:
        buffer = io.BytesIO(b'{"prompt": "from stdin"}\n')

    monkeypatch.setattr("sys.stdin", FakeStdin())
    items = list(read_records("-"))
    assert items[0].text == "from stdin"  # type: ignore[union-attr]


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="not found"):
        list(read_records(tmp_path / "absent.jsonl"))


def test_reads_lazily() -> None:
    """The reader yields a record before the rest of the stream is read."""

    class Endless(io.RawIOBase):
        def __init__(self) -> None:
            self.served = 0

        def readable(self) -> bool:
            return True

        def readinto(self, buffer: bytearray) -> int:  # type: ignore[override]
            line = b'{"prompt": "x"}\n'
            self.served += 1
            buffer[: len(line)] = line
            return len(line)

    stream = Endless()
    reader = read_records(io.BufferedReader(stream, buffer_size=64))
    first = next(reader)
    assert isinstance(first, InputRecord)
    assert stream.served < 10


def test_shard_selection(tmp_path: Path) -> None:
    path = _write(tmp_path, [json.dumps({"prompt": f"p{i}"}) for i in range(1, 11)])
    shards = [list(read_records(path, shard=Shard(i, 3))) for i in range(3)]
    assert [item.line for item in shards[0]] == [1, 4, 7, 10]
    assert [item.line for item in shards[1]] == [2, 5, 8]
    assert [item.line for item in shards[2]] == [3, 6, 9]
    merged = sorted(item.line for shard in shards for item in shard)
    assert merged == list(range(1, 11))
    counts = ReadCounts()
    list(read_records(path, shard=Shard(1, 3), counts=counts))
    assert (counts.lines, counts.other_shards) == (3, 7)


def test_parse_shard() -> None:
    assert parse_shard("2/4") == Shard(2, 4)
    for bad in ("4/4", "-1/2", "1", "a/b", "1/0"):
        with pytest.raises(UsageError):
            parse_shard(bad)


def test_records_from_texts() -> None:
    items = list(records_from_texts(["a", " ", "b"]))
    assert isinstance(items[0], InputRecord)
    assert (items[0].id, items[0].line) == (1, 1)
    assert isinstance(items[1], InputProblem)
    assert items[1].line == 2
    assert isinstance(items[2], InputRecord)
