"""Read and write one vector file in the safetensors format, byte for byte reproducibly.

`safetensors.torch.save` writes the header metadata keys in a different order
from one process to the next (seen with safetensors 0.8.0 under different
PYTHONHASHSEED values), so the registry could not name files by the hash of
their bytes. `serialize` therefore writes the format
itself: an 8-byte little-endian header length, the header JSON with sorted
keys and compact separators, space padding to a multiple of 8 bytes, then the
raw little-endian tensor bytes in name order. Reading goes through the
safetensors library, which validates the header. Nothing here uses pickle.

Header metadata in safetensors maps str to str, so every metadata value is
stored as its canonical JSON text and decoded back to its JSON type.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import struct
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from safety_lens_cli.errors import InputError, UnsafeFormatError, UsageError, VectorNotFoundError

logger = logging.getLogger(__name__)

VECTOR_SUFFIX = ".safetensors"
# Suffixes of formats that torch.load or pickle read, which can run arbitrary code on load.
PICKLE_SUFFIXES = frozenset({".pt", ".pth", ".bin", ".pkl", ".pickle"})
# Temp files are named `.<target name>.<random>.tmp` next to their target.
TEMP_SUFFIX = ".tmp"

_METADATA_KEY = "__metadata__"
# The safetensors library rejects headers larger than 100 MB (checked with safetensors 0.8.0).
_MAX_HEADER_BYTES = 100_000_000

_DTYPE_NAMES: dict[torch.dtype, str] = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


def canonical_json(value: Any) -> str:
    """Encode `value` as canonical JSON: sorted keys, compact separators, ASCII, no NaN."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), allow_nan=False)


def encode_metadata(meta: Mapping[str, Any]) -> dict[str, str]:
    """Encode each metadata value as its canonical JSON text, as safetensors headers need str values.

    Ints, floats, None, bools, strings and nested lists or dicts come back with
    their types from `decode_metadata`. Tuples come back as lists, and keys of
    nested dicts must be strings.
    """
    encoded: dict[str, str] = {}
    for key, value in meta.items():
        if not isinstance(key, str):
            raise UsageError(
                f"Invalid metadata key {key!r} of type {type(key).__name__}: safetensors metadata keys must be strings."
            )
        try:
            encoded[key] = canonical_json(value)
        except (TypeError, ValueError) as exc:
            raise UsageError(
                f"Invalid metadata value for key '{key}': {exc}. "
                "Use JSON values only: str, int, finite float, bool, None, lists and dicts with str keys."
            ) from exc
    return encoded


def decode_metadata(raw: Mapping[str, str], *, strict: bool = True) -> dict[str, Any]:
    """Decode metadata written by `encode_metadata` back to typed values.

    With `strict=False`, a value that is not JSON text (as in files written by
    other tools, e.g. `{"format": "pt"}`) is kept as the plain string.
    """
    decoded: dict[str, Any] = {}
    for key, text in raw.items():
        try:
            decoded[key] = json.loads(text)
        except (TypeError, json.JSONDecodeError) as exc:
            if not strict and isinstance(text, str):
                decoded[key] = text
                continue
            raise InputError(
                f"Invalid metadata value for key '{key}': {text!r} is not JSON text, so the file was not "
                "written by safety-lens. Read it with `load_vector_file(path, strict_metadata=False)`."
            ) from exc
    return decoded


def _tensor_bytes(tensor: torch.Tensor, byteorder: str = sys.byteorder) -> bytes:
    """Return the raw little-endian bytes of a contiguous CPU tensor; `byteorder` is the host's."""
    raw = tensor.reshape(-1).view(torch.uint8)
    if byteorder == "big" and tensor.element_size() > 1:
        # Reverse the bytes inside each element, because safetensors data is little-endian.
        raw = raw.reshape(-1, tensor.element_size()).flip(1).reshape(-1)
    return raw.numpy().tobytes()


def serialize(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, Any]) -> bytes:
    """Encode tensors and metadata as safetensors bytes that depend only on their values.

    Each tensor is copied to a contiguous CPU tensor first, so a row of a
    matrix or a column slice is stored with its own values only.
    """
    header: dict[str, Any] = {_METADATA_KEY: encode_metadata(metadata)}
    chunks: list[bytes] = []
    offset = 0
    for name in sorted(tensors):
        tensor = tensors[name]
        if not isinstance(name, str) or not name or name == _METADATA_KEY:
            raise UsageError(f"Invalid tensor name {name!r}: use a non-empty string other than '{_METADATA_KEY}'.")
        if not isinstance(tensor, torch.Tensor):
            raise UsageError(
                f"Invalid value for tensor '{name}': expected a torch.Tensor, got {type(tensor).__name__}."
            )
        dtype_name = _DTYPE_NAMES.get(tensor.dtype)
        if dtype_name is None:
            supported = ", ".join(str(dtype).removeprefix("torch.") for dtype in _DTYPE_NAMES)
            raise UsageError(f"Unsupported dtype {tensor.dtype} of tensor '{name}'. Supported dtypes: {supported}.")
        data = _tensor_bytes(tensor.detach().cpu().contiguous().clone())
        header[name] = {
            "dtype": dtype_name,
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + len(data)],
        }
        chunks.append(data)
        offset += len(data)

    header_bytes = canonical_json(header).encode("utf-8")
    header_bytes += b" " * (-len(header_bytes) % 8)
    return struct.pack("<Q", len(header_bytes)) + header_bytes + b"".join(chunks)


def _parse_header(data: bytes, source: str) -> dict[str, Any]:
    if len(data) < 8:
        raise InputError(f"Invalid vector file '{source}': {len(data)} bytes is too short for a safetensors header.")
    (header_length,) = struct.unpack("<Q", data[:8])
    if header_length > min(_MAX_HEADER_BYTES, len(data) - 8):
        raise InputError(
            f"Invalid vector file '{source}': header length {header_length} exceeds the file size; "
            "the file is truncated or is not safetensors."
        )
    try:
        header = json.loads(data[8 : 8 + header_length].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"Invalid vector file '{source}': the header is not valid JSON ({exc}).") from exc
    if not isinstance(header, dict):
        raise InputError(f"Invalid vector file '{source}': the header is not a JSON object.")
    return header


def read_metadata(data: bytes, source: str, *, strict: bool = True) -> dict[str, Any]:
    """Decode the header metadata from the first bytes of a safetensors file.

    `data` needs to contain only the header, not the tensor data. `source`
    names the file in error messages.
    """
    raw = _parse_header(data, source).get(_METADATA_KEY) or {}
    if not isinstance(raw, dict) or not all(isinstance(value, str) for value in raw.values()):
        raise InputError(f"Invalid vector file '{source}': '{_METADATA_KEY}' must map strings to strings.")
    return decode_metadata(raw, strict=strict)


def read_file_metadata(path: str | os.PathLike[str], *, strict: bool = True) -> dict[str, Any]:
    """Read only the header of a safetensors file and decode its metadata; the tensor data is not read or checked."""
    source = Path(path)
    reject_pickle_path(source)
    try:
        with source.open("rb") as handle:
            head = handle.read(8)
            header_length = struct.unpack("<Q", head)[0] if len(head) == 8 else 0
            data = head + handle.read(min(header_length, _MAX_HEADER_BYTES))
    except FileNotFoundError:
        raise VectorNotFoundError(f"Vector file not found: '{source}'.") from None
    except OSError as exc:
        raise InputError(f"Cannot read vector file '{source}': {exc.strerror}.") from exc
    return read_metadata(data, str(source), strict=strict)


def deserialize(data: bytes, source: str, *, strict: bool = True) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Decode safetensors bytes into CPU tensors and typed metadata."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    metadata = read_metadata(data, source, strict=strict)
    try:
        tensors = load(data)
    except SafetensorError as exc:
        raise InputError(
            f"Invalid vector file '{source}': {exc}. The file is truncated or is not safetensors."
        ) from exc
    return tensors, metadata


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def reject_pickle_path(path: Path) -> None:
    """Raise UnsafeFormatError when `path` names a pickle-based format."""
    suffix = path.suffix.lower()
    if suffix in PICKLE_SUFFIXES:
        raise UnsafeFormatError(
            f"Unsafe file format '{path}': {suffix} files are read with torch.load or pickle, which "
            f"can run arbitrary code. Use a {VECTOR_SUFFIX} path instead."
        )


def _fsync_directory(directory: Path) -> None:
    # Makes the rename durable on POSIX. Windows cannot open a directory, so it is skipped there.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes) -> None:
    """Write `data` to `path` through a unique temp file in the same folder, fsync, then `os.replace`.

    Readers see either the old file or the whole new one, never a partial
    write, and concurrent writers to one path never interleave bytes.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp_name, path)
    except BaseException:
        try:
            os.unlink(temp_name)
        except FileNotFoundError:
            pass
        raise
    _fsync_directory(path.parent)


def save_vector_file(
    path: str | os.PathLike[str], tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, Any]
) -> None:
    """Write tensors and metadata to a safetensors file, replacing it atomically."""
    target = Path(path)
    reject_pickle_path(target)
    write_atomic(target, serialize(tensors, metadata))
    logger.debug("Wrote vector file %s", target)


def load_vector_file(
    path: str | os.PathLike[str], *, strict_metadata: bool = True
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read tensors and typed metadata from a safetensors file; never unpickles.

    `strict_metadata=False` keeps metadata values that are not JSON text as
    strings, for files written by other tools.
    """
    source = Path(path)
    reject_pickle_path(source)
    try:
        data = source.read_bytes()
    except FileNotFoundError:
        raise VectorNotFoundError(
            f"Vector file not found: '{source}'. "
            "Check the path, or list stored vectors with `safety-lens vectors list`."
        ) from None
    except IsADirectoryError:
        raise InputError(
            f"Invalid vector file '{source}': it is a directory, expected a {VECTOR_SUFFIX} file."
        ) from None
    except OSError as exc:
        raise InputError(f"Cannot read vector file '{source}': {exc.strerror}. Check its permissions.") from exc
    return deserialize(data, str(source), strict=strict_metadata)
