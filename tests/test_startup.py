"""`--help` must not import torch or transformers."""

from __future__ import annotations

import subprocess
import sys

import pytest

COMMANDS = [[], ["inspect-layers"], ["extract"], ["scan"], ["generate"], ["personas"], ["vectors"]]


@pytest.mark.parametrize("args", COMMANDS, ids=lambda a: " ".join(a) or "root")
def test_help_imports_no_torch(args: list[str]) -> None:
    code = (
        "import sys\n"
        "from safety_lens_cli.cli.app import app\n"
        f"try:\n    app({[*args, '--help']!r})\nexcept SystemExit as exit:\n    assert exit.code == 0, exit.code\n"
        "heavy = sorted(m for m in ('torch', 'transformers', 'safetensors', 'numpy') if m in sys.modules)\n"
        "print('HEAVY=' + ','.join(heavy))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "HEAVY=\n" in result.stdout, result.stdout[-500:]
    assert "Usage" in result.stdout
