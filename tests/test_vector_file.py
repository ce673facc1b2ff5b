"""Tests of the deterministic safetensors writer and the pickle-free reader."""

from __future__ import annotations

import hashlib
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load as safetensors_load
from safetensors.torch import save_file as safetensors_save_file

from safety_lens_cli.errors import InputError, UnsafeFormatError, UsageError, VectorNotFoundError
from safety_lens_cli.vector_file import (
    PICKLE_SUFFIXES,
    _tensor_bytes,
    decode_metadata,
    encode_metadata,
    load_vector_file,
    read_file_metadata,
    save_vector_file,
    serialize,
    write_atomic,
)

ALL_DTYPES = [
    torch.float32,
    torch.float16,
    torch.bfloat16,
    torch.float64,
    torch.int64,
    torch.int32,
    torch.int16,
    torch.int8,
    torch.uint8,
    torch.bool,
]


def raw_bytes(tensor: torch.Tensor) -> bytes:
    """Bytes of a tensor's values, for bitwise comparison (NaN-safe, unlike torch.equal)."""
    return tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def sample_tensor(dtype: torch.dtype, shape: tuple[int, ...] = (3, 5)) -> torch.Tensor:
    generator = torch.Generator().manual_seed(7)
    if dtype == torch.bool:
        return torch.rand(shape, generator=generator) > 0.5
    if dtype.is_floating_point:
        return (torch.randn(shape, generator=generator) * 100).to(dtype)
    return torch.randint(-100 if dtype != torch.uint8 else 0, 100, shape, generator=generator).to(dtype)


def header_of(data: bytes) -> tuple[int, bytes]:
    (length,) = struct.unpack("<Q", data[:8])
    return length, data[8 : 8 + length]


# -- metadata ----------------------------------------------------------------


def test_metadata_typed_round_trip() -> None:
    meta = {
        "layer": 12,
        "coef": 4.0,
        "note": None,
        "flag": True,
        "label": "12",
        "nested": {"auroc": 0.91, "counts": [1, 2, 3], "inner": {"ok": False}},
    }
    encoded = encode_metadata(meta)
    assert all(isinstance(value, str) for value in encoded.values())
    assert encoded["layer"] == "12"
    assert encoded["coef"] == "4.0"
    assert encoded["note"] == "null"
    assert encoded["label"] == '"12"'

    decoded = decode_metadata(encoded)
    assert decoded == meta
    assert type(decoded["layer"]) is int
    assert type(decoded["coef"]) is float
    assert decoded["note"] is None
    assert decoded["flag"] is True
    assert type(decoded["label"]) is str


def test_metadata_typed_round_trip_through_file(tmp_path: Path) -> None:
    path = tmp_path / "v.safetensors"
    save_vector_file(path, {"vector": torch.ones(4)}, {"layer": 12, "coef": 4.0, "note": None})
    _, metadata = load_vector_file(path)
    assert metadata == {"layer": 12, "coef": 4.0, "note": None}
    assert type(metadata["layer"]) is int
    assert type(metadata["coef"]) is float


def test_metadata_encoding_is_canonical() -> None:
    assert encode_metadata({"d": {"b": 1, "a": [1.5, None]}})["d"] == '{"a":[1.5,null],"b":1}'


def test_metadata_rejects_non_string_key() -> None:
    with pytest.raises(UsageError, match="metadata key 3"):
        encode_metadata({3: "x"})  # type: ignore[dict-item]


@pytest.mark.parametrize("value", [float("nan"), float("inf"), Path("/tmp"), {1, 2}])
def test_metadata_rejects_non_json_value(value: object) -> None:
    with pytest.raises(UsageError, match="key 'bad'"):
        encode_metadata({"bad": value})


def test_decode_metadata_strict_rejects_plain_text() -> None:
    with pytest.raises(InputError, match="key 'format'"):
        decode_metadata({"format": "pt"})


def test_decode_metadata_lenient_keeps_plain_text() -> None:
    assert decode_metadata({"format": "pt", "layer": "3"}, strict=False) == {"format": "pt", "layer": 3}


# -- serialize ---------------------------------------------------------------


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_serialize_readable_by_safetensors_bitwise(dtype: torch.dtype, tmp_path: Path) -> None:
    tensor = sample_tensor(dtype)
    data = serialize({"t": tensor, "scalar": torch.tensor(1.5, dtype=torch.float64)}, {"layer": 2})

    loaded = safetensors_load(data)
    assert loaded["t"].dtype == dtype
    assert loaded["t"].shape == tensor.shape
    assert raw_bytes(loaded["t"]) == raw_bytes(tensor)
    assert loaded["scalar"].shape == ()
    assert loaded["scalar"].item() == 1.5

    path = tmp_path / "t.safetensors"
    path.write_bytes(data)
    with safe_open(str(path), framework="pt") as handle:
        assert handle.metadata() == {"layer": "2"}
        assert raw_bytes(handle.get_tensor("t")) == raw_bytes(tensor)


def test_serialize_keeps_nan_and_negative_zero_bits() -> None:
    tensor = torch.tensor([float("nan"), -0.0, 0.0, float("-inf")], dtype=torch.float32)
    loaded = safetensors_load(serialize({"t": tensor}, {}))
    assert raw_bytes(loaded["t"]) == raw_bytes(tensor)


def test_serialize_header_layout() -> None:
    data = serialize({"b": torch.zeros(3), "a": torch.ones(2, dtype=torch.float16)}, {"z": 1, "a": "x"})
    length, header_bytes = header_of(data)
    assert length % 8 == 0
    json_text = header_bytes.rstrip(b" ")
    assert json_text.startswith(b"{")
    assert json_text.endswith(b"}")
    assert len(header_bytes) - len(json_text) < 8
    header = json.loads(json_text)
    assert list(header) == ["__metadata__", "a", "b"]
    assert list(header["__metadata__"]) == ["a", "z"]
    assert header["a"] == {"data_offsets": [0, 4], "dtype": "F16", "shape": [2]}
    assert header["b"] == {"data_offsets": [4, 16], "dtype": "F32", "shape": [3]}
    assert len(data) == 8 + length + 16


def test_serialize_empty_metadata_and_empty_tensor() -> None:
    loaded = safetensors_load(serialize({"e": torch.zeros(0, 4)}, {}))
    assert loaded["e"].shape == (0, 4)


def test_shared_memory_rows_and_column_slices_round_trip(tmp_path: Path) -> None:
    matrix = torch.randn(4, 6, generator=torch.Generator().manual_seed(1))
    original = matrix.clone()
    tensors = {
        "row1": matrix[1],
        "row3": matrix[3],
        "col2": matrix[:, 2],
        "transposed": matrix.t(),
        "strided": matrix[::2, 1::2],
    }
    assert not tensors["col2"].is_contiguous()
    assert tensors["row1"].untyped_storage().data_ptr() == matrix.untyped_storage().data_ptr()

    path = tmp_path / "slices.safetensors"
    save_vector_file(path, tensors, {"source": "matrix"})
    loaded, metadata = load_vector_file(path)

    assert metadata == {"source": "matrix"}
    for name, tensor in tensors.items():
        assert loaded[name].shape == tensor.shape, name
        assert raw_bytes(loaded[name]) == raw_bytes(tensor), name
    # Only the slices' own values are stored: 6 + 6 + 4 + 24 + 6 floats.
    length, _ = header_of(path.read_bytes())
    assert path.stat().st_size == 8 + length + (6 + 6 + 4 + 24 + 6) * 4
    assert torch.equal(matrix, original)
    with safe_open(str(path), framework="pt") as handle:
        assert raw_bytes(handle.get_tensor("col2")) == raw_bytes(matrix[:, 2])


def test_serialize_is_deterministic_in_process() -> None:
    vector = torch.randn(32, generator=torch.Generator().manual_seed(3))
    first = serialize({"vector": vector, "other": torch.arange(4)}, {"b": 1, "a": {"y": 2, "x": 1}, "c": None})
    second = serialize({"other": torch.arange(4), "vector": vector.clone()}, {"c": None, "a": {"x": 1, "y": 2}, "b": 1})
    assert first == second


_DETERMINISM_SCRIPT = """
import hashlib, sys, torch
from safety_lens_cli.vector_file import serialize
vector = torch.randn(64, generator=torch.Generator().manual_seed(11))
meta = {f"key{i}": {"value": i * 0.5, "tags": [str(i)] * 3} for i in range(40)}
meta.update(layer=12, coef=4.0, note=None)
sys.stdout.write(hashlib.sha256(serialize({"vector": vector, "bias": torch.ones(3)}, meta)).hexdigest())
"""


def test_serialize_is_deterministic_across_processes() -> None:
    digests = []
    for seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        result = subprocess.run(
            [sys.executable, "-c", _DETERMINISM_SCRIPT],
            env=env,
            capture_output=True,
            text=True,
            check=True,
            timeout=120,
        )
        digests.append(result.stdout.strip())
    assert len(digests[0]) == 64
    assert digests[0] == digests[1]


def test_tensor_bytes_big_endian_reverses_each_element() -> None:
    tensor = torch.tensor([1, 258], dtype=torch.int16)
    assert _tensor_bytes(tensor, byteorder="little") == b"\x01\x00\x02\x01"
    assert _tensor_bytes(tensor, byteorder="big") == b"\x00\x01\x01\x02"


def test_serialize_rejects_unsupported_dtype() -> None:
    with pytest.raises(UsageError, match="complex64"):
        serialize({"c": torch.zeros(2, dtype=torch.complex64)}, {})


@pytest.mark.parametrize("name", ["", "__metadata__"])
def test_serialize_rejects_reserved_tensor_name(name: str) -> None:
    with pytest.raises(UsageError, match="Invalid tensor name"):
        serialize({name: torch.zeros(2)}, {})


def test_serialize_rejects_non_tensor() -> None:
    with pytest.raises(UsageError, match="expected a torch.Tensor"):
        serialize({"v": [1.0, 2.0]}, {})  # type: ignore[dict-item]


# -- files -------------------------------------------------------------------


@pytest.mark.parametrize("suffix", sorted(PICKLE_SUFFIXES) + [".PT", ".Pickle"])
def test_save_rejects_pickle_suffix(suffix: str, tmp_path: Path) -> None:
    path = tmp_path / f"vector{suffix}"
    with pytest.raises(UnsafeFormatError) as excinfo:
        save_vector_file(path, {"vector": torch.ones(2)}, {})
    message = str(excinfo.value)
    assert "arbitrary code" in message
    assert ".safetensors" in message
    assert not path.exists()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("suffix", [".pt", ".bin", ".pkl"])
def test_load_rejects_pickle_suffix(suffix: str, tmp_path: Path) -> None:
    path = tmp_path / f"vector{suffix}"
    path.write_bytes(serialize({"vector": torch.ones(2)}, {}))
    with pytest.raises(UnsafeFormatError, match="pickle"):
        load_vector_file(path)


def test_load_missing_file_names_path(tmp_path: Path) -> None:
    path = tmp_path / "absent.safetensors"
    with pytest.raises(VectorNotFoundError, match="absent.safetensors"):
        load_vector_file(path)


@pytest.mark.parametrize(
    "content",
    [b"", b"\x05\x00", b"\xff" * 8 + b"{}", struct.pack("<Q", 4) + b"nope", struct.pack("<Q", 2) + b"[]"],
    ids=["empty", "short", "huge-length", "not-json", "not-object"],
)
def test_load_corrupt_header_names_path(content: bytes, tmp_path: Path) -> None:
    path = tmp_path / "corrupt.safetensors"
    path.write_bytes(content)
    with pytest.raises(InputError) as excinfo:
        load_vector_file(path)
    assert str(path) in str(excinfo.value)


def test_load_truncated_data_raises(tmp_path: Path) -> None:
    path = tmp_path / "truncated.safetensors"
    path.write_bytes(serialize({"vector": torch.ones(8)}, {"layer": 1})[:-4])
    with pytest.raises(InputError, match="truncated"):
        load_vector_file(path)


def test_load_foreign_file_needs_lenient_metadata(tmp_path: Path) -> None:
    path = tmp_path / "foreign.safetensors"
    safetensors_save_file({"vector": torch.ones(3)}, str(path), metadata={"format": "pt"})
    with pytest.raises(InputError, match="not JSON"):
        load_vector_file(path)
    tensors, metadata = load_vector_file(path, strict_metadata=False)
    assert metadata == {"format": "pt"}
    assert torch.equal(tensors["vector"], torch.ones(3))


def test_read_file_metadata_reads_header_only(tmp_path: Path) -> None:
    path = tmp_path / "v.safetensors"
    save_vector_file(path, {"vector": torch.ones(1000)}, {"quality": {"cv_auroc": 0.9}})
    # Truncating the tensor data leaves the header, which is all that is read.
    data = path.read_bytes()
    path.write_bytes(data[:-100])
    assert read_file_metadata(path) == {"quality": {"cv_auroc": 0.9}}


def test_save_replaces_file_and_leaves_no_temp(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "v.safetensors"
    save_vector_file(path, {"vector": torch.zeros(2)}, {"n": 1})
    save_vector_file(path, {"vector": torch.ones(2)}, {"n": 2})
    tensors, metadata = load_vector_file(path)
    assert metadata == {"n": 2}
    assert torch.equal(tensors["vector"], torch.ones(2))
    assert sorted(p.name for p in path.parent.iterdir()) == ["v.safetensors"]


def test_write_atomic_cleans_temp_on_failure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "ref.json"
    target.write_bytes(b"old")

    def failing_replace(src: str, dst: str) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="No space"):
        write_atomic(target, b"new")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["ref.json"]


def test_saved_bytes_hash_matches_serialize(tmp_path: Path) -> None:
    tensors = {"vector": torch.linspace(-1, 1, 16)}
    path = tmp_path / "v.safetensors"
    save_vector_file(path, tensors, {"layer": 0})
    expected = hashlib.sha256(serialize(tensors, {"layer": 0})).hexdigest()
    assert hashlib.sha256(path.read_bytes()).hexdigest() == expected
