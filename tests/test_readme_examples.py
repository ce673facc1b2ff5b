"""Every ```python block of README.md runs as written, each in a fresh interpreter.

The blocks run with $SAFETY_LENS_HOME set to the session registry, so vectors
stored by one block or test are reused by the next. A block that loads the
model itself fingerprints it by its parameters, so its first run in a session
extracts the personas it scans (a few minutes on a CPU).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
PYTHON_BLOCK = re.compile(r"^```python[ \t]*\n(.*?)^```[ \t]*$", re.DOTALL | re.MULTILINE)
# Model load, one auto-layer extraction of three personas and a short generation on a slow CPU.
BLOCK_TIMEOUT_S = 1800


def python_blocks(text: str) -> list[str]:
    return [match.group(1) for match in PYTHON_BLOCK.finditer(text)]


BLOCKS = python_blocks(README.read_text(encoding="utf-8")) if README.is_file() else []


def test_python_blocks_found_by_pattern() -> None:
    text = "intro\n```python\nprint(1)\n```\n```bash\nls\n```\n```python\nx = 2\n```\n"
    assert python_blocks(text) == ["print(1)\n", "x = 2\n"]


def test_readme_has_python_examples() -> None:
    assert BLOCKS, f"{README} has no ```python block: the API section with its example is missing."


@pytest.mark.real_model
@pytest.mark.slow
@pytest.mark.parametrize("index", range(len(BLOCKS)), ids=lambda i: f"block{i + 1}")
def test_readme_block_runs(index: int, session_home: Path, tmp_path: Path) -> None:
    env = {
        **os.environ,
        "SAFETY_LENS_HOME": str(session_home),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    result = subprocess.run(
        [sys.executable, "-c", BLOCKS[index]],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=BLOCK_TIMEOUT_S,
    )
    assert result.returncode == 0, f"README block {index + 1} failed:\n{result.stderr[-3000:]}"
