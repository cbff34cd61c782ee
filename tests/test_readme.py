"""The README's Python blocks run verbatim, each in a fresh interpreter, as a reader
pasting them would (packaged models from the shared cache)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"

# Sections whose Python blocks cannot run here, and why.
NOT_RUN = {
    "Running across GPUs and hosts": "needs 8 devices and a Llama-3-70B file",
    "Serving": "needs a running `jaxllama serve` (tests/test_serve.py drives the same "
               "client calls against one)",
}


def python_blocks() -> list[tuple[str, str]]:
    """(section heading, code) of every ```python block, in order."""
    blocks, section = [], None
    for part in re.split(r"(^## .*$)", README.read_text(encoding="utf-8"), flags=re.M):
        if part.startswith("## "):
            section = part[3:].strip()
            continue
        blocks += [(section, code) for code in re.findall(r"^```python\n(.*?)^```", part, re.M | re.S)]
    return blocks


def test_every_block_is_run_or_excused():
    sections = [s for s, _ in python_blocks()]
    assert "The library" in sections
    assert set(sections) - {"The library", "Many requests at once: the engine"} <= set(NOT_RUN)


@pytest.mark.slow
@pytest.mark.parametrize("section,code", [b for b in python_blocks() if b[0] not in NOT_RUN],
                         ids=lambda x: x if isinstance(x, str) and len(x) < 40 else None)
def test_readme_block_runs_verbatim(section, code):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    if section == "The library":
        # After the block, verbatim: its explicit decode loop ended at the EOS token.
        code += "\nassert ids[-1] in adapter.eos_ids(), ids[len(prompt):]\n"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=900)
    print(proc.stdout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    if section == "The library":
        lines = proc.stdout.splitlines()
        assert lines[0].startswith("ModelType.Qwen2_5 151936 896 24 ")
        assert len(lines) >= 3 and proc.stdout.strip()
