"""The one error hierarchy of safety-lens.

Every error the core raises on purpose derives from `SafetyLensError`. Its
message says what failed, on which value, and what to do next; the CLI prints
it as one line and exits with `exit_code`. Subclasses also inherit the
matching built-in (`ValueError`, `FileNotFoundError`, ...) so Python callers
can catch what they already expect.
"""

from __future__ import annotations

# Exit codes shared by every command. 1 is kept for a failed gate.
EXIT_USAGE = 2
EXIT_RUNTIME = 3


class SafetyLensError(Exception):
    """Base class of every error that safety-lens raises on purpose."""

    exit_code: int = EXIT_USAGE


class UsageError(SafetyLensError, ValueError):
    """An option or argument has an invalid value."""


class InputError(SafetyLensError, ValueError):
    """An input file or line cannot be read or has an invalid shape."""


class ModelLoadError(SafetyLensError, ValueError):
    """A model or tokenizer cannot be found or loaded."""


class ModelNotFoundError(ModelLoadError, FileNotFoundError):
    """A model path does not exist or no default model is installed."""


class LayerResolutionError(SafetyLensError, LookupError):
    """The decoder blocks of a model cannot be located."""


class LayerIndexError(SafetyLensError, IndexError):
    """A layer index lies outside the model's range."""


class PersonaError(SafetyLensError, ValueError):
    """A persona file is invalid."""


class PersonaNotFoundError(PersonaError, LookupError):
    """A persona name or path does not exist."""


class RegistryError(SafetyLensError):
    """The vector registry cannot be read or written."""


class VectorNotFoundError(RegistryError, LookupError):
    """No stored vector matches the request."""


class IntegrityError(RegistryError):
    """A stored object's bytes do not match its hash."""

    exit_code = EXIT_RUNTIME


class ModelMismatchError(SafetyLensError, ValueError):
    """A vector was extracted from another model than the one in use."""


class UnsafeFormatError(SafetyLensError, ValueError):
    """A file format that can run code on load (pickle) was requested."""


class RuntimeFailure(SafetyLensError, RuntimeError):
    """The model failed while running, or a run could not complete."""

    exit_code = EXIT_RUNTIME
