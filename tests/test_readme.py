"""The README's runnable examples run, and the numbers they show are the numbers they print."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def runnable_blocks() -> list[str]:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    return [b for b in blocks if b.startswith("import")]


@pytest.mark.parametrize("index", range(len(runnable_blocks())))
def test_readme_example_runs(index):
    code = runnable_blocks()[index]
    # no pretrained weights offline: the timm example runs on a random init of the same architecture
    code = code.replace("pretrained=True", "pretrained=False")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, f"README block {index}", "exec"), {})
    shown = [line[2:] for line in code.splitlines() if line.startswith("# ") and ("params" in line or "group" in line)]
    printed = [line.strip() for line in out.getvalue().splitlines()]
    for line in shown:
        assert line.strip() in printed, f"README shows {line!r}, the code prints {printed}"
