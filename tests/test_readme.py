"""Every ```python block of README.md runs as pasted (CPU), except those that say on
their first line that they are fragments of a distributed script."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"
BLOCKS = re.findall(r"^```python\n(.*?)^```", README.read_text(encoding="utf-8"), flags=re.S | re.M)


def test_readme_has_python_blocks():
    assert len(BLOCKS) >= 5


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_block_runs(index, tmp_path, monkeypatch, switches):
    code = BLOCKS[index]
    if code.startswith("# fragment"):
        pytest.skip("a fragment of a distributed script (needs a process group)")
    monkeypatch.chdir(tmp_path)  # blocks that save write here
    switches(LORAKERN_BACKEND=None)
    exec(compile(code, f"README.md block {index}", "exec"), {"__name__": "__readme__"})
    assert os.getcwd() == str(tmp_path)
