"""Find the decoder blocks of a causal LM and turn layer specs into indices.

Layer `L` is the output of block `L` (0-based), that is the residual stream
after `L + 1` blocks, so a hook on block `L` sees `output_hidden_states[L + 1]`.
For the last block the hook sees the stream before the model's final norm,
whereas `hidden_states[-1]` in transformers has that norm applied.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from safety_lens_cli.errors import LayerIndexError, LayerResolutionError, UsageError

if TYPE_CHECKING:
    from torch import nn

# Dotted paths of the block list, by family. The first one that exists and has
# the config's layer count wins, so text stacks of multimodal wrappers
# (Gemma 3: model.language_model.layers) come before generic fallbacks.
KNOWN_BLOCK_PATHS: tuple[str, ...] = (
    "model.layers",  # Llama, Mistral, Qwen2/3, Phi-3, Gemma 1/2/3 text
    "model.language_model.layers",  # Gemma 3, LLaVA-style wrappers (transformers >= 4.52)
    "language_model.model.layers",  # older multimodal wrappers
    "model.text_model.layers",
    "transformer.h",  # GPT-2, GPT-J, GPT-Neo, BLOOM, Falcon
    "gpt_neox.layers",  # GPT-NeoX, Pythia
    "model.decoder.layers",  # OPT
    "transformer.blocks",  # MPT
    "transformer.layers",
    "model.model.layers",
)
_NON_TEXT_MARKERS = ("vision", "visual", "image", "audio", "encoder", "mm_projector")

LayerSpec = Literal["auto"] | list[int]


@dataclass(frozen=True)
class LayerStack:
    """The decoder block list of a model."""

    path: str
    blocks: nn.ModuleList
    hidden_size: int
    num_layers: int

    def block(self, index: int) -> nn.Module:
        return self.blocks[normalize_layer(index, self.num_layers)]

    def module_path(self, index: int) -> str:
        return f"{self.path}.{normalize_layer(index, self.num_layers)}"


def text_config(config: object) -> object:
    get = getattr(config, "get_text_config", None)
    return get() if callable(get) else config


def config_num_layers(config: object) -> int | None:
    cfg = text_config(config)
    for name in ("num_hidden_layers", "n_layer", "num_layers", "n_layers"):
        value = getattr(cfg, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def config_hidden_size(config: object) -> int | None:
    cfg = text_config(config)
    for name in ("hidden_size", "n_embd", "d_model", "dim"):
        value = getattr(cfg, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _get_submodule(model: nn.Module, path: str) -> nn.Module | None:
    try:
        return model.get_submodule(path)
    except AttributeError:
        return None


def find_layer_stack(model: nn.Module, layers_path: str | None = None) -> LayerStack:
    """Locate the decoder blocks: `layers_path`, then known paths, then a general search."""
    from torch import nn

    config = getattr(model, "config", None)
    expected = config_num_layers(config) if config is not None else None
    hidden = config_hidden_size(config) if config is not None else None

    if layers_path:
        found = _get_submodule(model, layers_path)
        if not isinstance(found, nn.ModuleList) or len(found) == 0:
            raise LayerResolutionError(
                f"--layers-path '{layers_path}' is not a non-empty ModuleList in "
                f"{type(model).__name__}: candidates are {_describe(_module_lists(model))}."
            )
        return _stack(layers_path, found, hidden)

    for path in KNOWN_BLOCK_PATHS:
        found = _get_submodule(model, path)
        if isinstance(found, nn.ModuleList) and (expected is None or len(found) == expected):
            return _stack(path, found, hidden)

    candidates = _module_lists(model)
    matching = [(p, m) for p, m in candidates if expected is not None and len(m) == expected]
    text_only = [(p, m) for p, m in matching if not any(k in p.lower() for k in _NON_TEXT_MARKERS)]
    if len(text_only) == 1:
        return _stack(*text_only[0], hidden)
    preferred = [(p, m) for p, m in text_only if "language_model" in p or "text" in p]
    if len(preferred) == 1:
        return _stack(*preferred[0], hidden)
    raise LayerResolutionError(
        f"Cannot find the decoder blocks of {type(model).__name__} (expected {expected} blocks): "
        f"candidate ModuleLists are {_describe(candidates)}; pass one with --layers-path."
    )


def _stack(path: str, blocks: nn.ModuleList, hidden: int | None) -> LayerStack:
    if hidden is None:
        raise LayerResolutionError(
            f"Cannot read the hidden size of the model whose blocks are at '{path}': "
            "its config has no hidden_size, n_embd or d_model."
        )
    return LayerStack(path=path, blocks=blocks, hidden_size=hidden, num_layers=len(blocks))


def _module_lists(model: nn.Module) -> list[tuple[str, nn.ModuleList]]:
    from torch import nn

    return [(name, m) for name, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) > 0]


def _describe(candidates: Sequence[tuple[str, nn.ModuleList]]) -> str:
    if not candidates:
        return "none"
    return ", ".join(f"'{p}' ({len(m)})" for p, m in candidates[:12])


def normalize_layer(index: int, num_layers: int) -> int:
    """Map a possibly negative block index to 0..num_layers-1, or raise with the valid range."""
    if not -num_layers <= index < num_layers:
        raise LayerIndexError(
            f"Layer {index} is out of range for a model with {num_layers} blocks: "
            f"use 0 to {num_layers - 1}, or -{num_layers} to -1 to count from the end."
        )
    return index % num_layers


def parse_layer_specs(specs: Iterable[str | int] | None, num_layers: int) -> LayerSpec:
    """Parse `--layer` values: integers, `A:B` (end excluded, like Python), `all`, or `auto`.

    Returns sorted unique indices, or "auto" when no spec or only `auto` is given.
    """
    values = [str(s).strip() for s in (specs or [])]
    if not values or values == ["auto"]:
        return "auto"
    if "auto" in values:
        raise UsageError("--layer auto cannot be combined with explicit layers: give either auto or indices.")
    layers: set[int] = set()
    for value in values:
        if value == "all":
            layers.update(range(num_layers))
        elif ":" in value:
            layers.update(_parse_range(value, num_layers))
        else:
            layers.add(normalize_layer(_parse_int(value), num_layers))
    return sorted(layers)


def _parse_int(value: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise UsageError(
            f"Invalid --layer '{value}': use an integer, a range A:B, 'all' or 'auto'."
        ) from None


def _parse_range(value: str, num_layers: int) -> range:
    parts = value.split(":")
    if len(parts) != 2:
        raise UsageError(f"Invalid --layer range '{value}': use A:B, for example 4:12.")
    start = normalize_layer(_parse_int(parts[0]), num_layers) if parts[0] else 0
    if parts[1]:
        end_raw = _parse_int(parts[1])
        end = num_layers if end_raw == num_layers else normalize_layer(end_raw, num_layers)
    else:
        end = num_layers
    if end <= start:
        raise UsageError(f"Empty --layer range '{value}': the end must be greater than the start.")
    return range(start, end)


@dataclass(frozen=True)
class BlockInfo:
    """One decoder block, as `inspect-layers` reports it."""

    index: int
    module_path: str
    block_class: str
    parameters: int
    hidden_size: int


def describe_blocks(stack: LayerStack) -> list[BlockInfo]:
    return [
        BlockInfo(
            index=i,
            module_path=f"{stack.path}.{i}",
            block_class=type(block).__name__,
            parameters=sum(p.numel() for p in block.parameters()),
            hidden_size=stack.hidden_size,
        )
        for i, block in enumerate(stack.blocks)
    ]
