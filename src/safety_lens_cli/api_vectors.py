"""Vector files for the Python API: one tensor and typed metadata per safetensors file.

These wrap `vector_file`, which writes the format byte for byte reproducibly
and never unpickles.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch

from safety_lens_cli.errors import InputError, UsageError
from safety_lens_cli.registry import VECTOR_TENSOR
from safety_lens_cli.vector_file import load_vector_file, read_file_metadata, save_vector_file


def save_vector(
    vector: torch.Tensor, path: str | os.PathLike[str], metadata: Mapping[str, Any] | None = None
) -> None:
    """Write `vector` and `metadata` to a safetensors file, replacing it atomically.

    The tensor is stored with its own dtype and shape, so `load_vector`
    gives it back bit for bit. A row or column slice of a larger tensor is
    stored with its own values only. Metadata values may be any JSON
    value (int, float, str, bool, None, lists, dicts) and come back with
    their types. Paths ending in .pt, .pth, .bin, .pkl or .pickle are
    rejected, because loading those pickle formats can run arbitrary code.
    """
    if not isinstance(vector, torch.Tensor):
        raise UsageError(f"Invalid vector: expected a torch.Tensor, got {type(vector).__name__}.")
    if metadata is not None and not isinstance(metadata, Mapping):
        raise UsageError(f"Invalid metadata: expected a dict, got {type(metadata).__name__}.")
    save_vector_file(path, {VECTOR_TENSOR: vector}, dict(metadata or {}))


def load_vector(path: str | os.PathLike[str]) -> torch.Tensor:
    """Read the vector of a safetensors file onto the CPU, without unpickling anything.

    A file with several tensors must contain one named `vector`. Read the metadata
    with `load_vector_metadata`.
    """
    tensors, _ = load_vector_file(path, strict_metadata=False)
    if VECTOR_TENSOR in tensors:
        return tensors[VECTOR_TENSOR]
    if len(tensors) == 1:
        return next(iter(tensors.values()))
    names = ", ".join(sorted(tensors)) or "none"
    raise InputError(
        f"Vector file '{path}' has no tensor named '{VECTOR_TENSOR}' and contains {len(tensors)} tensors "
        f"({names}): save one vector per file with save_vector."
    )


def load_vector_metadata(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read the typed metadata of a safetensors vector file (only its header is read)."""
    return read_file_metadata(path, strict=False)
