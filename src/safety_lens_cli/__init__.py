"""safety-lens: activation-level safety scanning for causal language models.

The Python API is imported lazily so that `safety-lens --help` and plain
`import safety_lens_cli` stay free of torch and transformers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_LAZY_EXPORTS = {
    "SafetyLens": "safety_lens_cli.api",
    "LensHooks": "safety_lens_cli.api",
    "WhiteBoxWrapper": "safety_lens_cli.api",
    "white_box_metric": "safety_lens_cli.api",
}

__all__ = ["__version__", *_LAZY_EXPORTS]

if TYPE_CHECKING:
    from safety_lens_cli.api import LensHooks, SafetyLens, WhiteBoxWrapper, white_box_metric


def __getattr__(name: str) -> Any:
    module_name = _LAZY_EXPORTS.get(name)
    if module_name is None:
        raise AttributeError(f"module 'safety_lens_cli' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module_name), name)
