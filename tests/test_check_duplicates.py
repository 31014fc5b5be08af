"""scripts/check_duplicates.py: a planted duplicated block is found, a baselined one passes, and a block's key does not
move when comments or the lines above it change (pylint in a child process: slow)."""

from __future__ import annotations

import importlib.util
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("check_duplicates", ROOT / "scripts" / "check_duplicates.py")
check = importlib.util.module_from_spec(spec)
spec.loader.exec_module(check)

pytestmark = pytest.mark.slow

BLOCK = """
def {name}(values, scale, shift):
    total = 0.0
    for v in values:
        if v is None:
            continue
        w = v * scale + shift  # {comment}
        total += w * w
        total -= shift / 2
    return total / max(len(values), 1)
"""


def _package(tmp_path: Path, comment_b: str = "b", preamble_b: str = "") -> Path:
    pkg = tmp_path / "pkg"
    pkg.mkdir(exist_ok=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text(textwrap.dedent(BLOCK.format(name="first", comment="a")))
    (pkg / "b.py").write_text(preamble_b + textwrap.dedent(BLOCK.format(name="second", comment=comment_b)))
    return pkg


def test_a_planted_block_is_found_and_its_key_survives_comments_and_shifts(tmp_path):
    _package(tmp_path)
    blocks = check.find_blocks(["pkg"], cwd=tmp_path)
    assert len(blocks) == 1 and next(iter(blocks)).startswith("pkg.a pkg.b ")
    _package(tmp_path, comment_b="another comment", preamble_b="X = 1\nY = 2\n\n")
    assert check.find_blocks(["pkg"], cwd=tmp_path).keys() == blocks.keys()


def test_the_command_fails_on_new_passes_on_accepted(tmp_path, monkeypatch, capsys):
    _package(tmp_path)
    real = check.find_blocks
    monkeypatch.setattr(check, "find_blocks", lambda paths: real(paths, cwd=tmp_path))
    baseline = tmp_path / "baseline.txt"
    assert check.main(["--baseline", str(baseline), "pkg"]) == 1
    assert "new duplicated block" in capsys.readouterr().out
    assert check.main(["--baseline", str(baseline), "--update", "pkg"]) == 0
    assert check.main(["--baseline", str(baseline), "pkg"]) == 0
    (tmp_path / "pkg" / "b.py").write_text("Z = 3\n")
    assert check.main(["--baseline", str(baseline), "pkg"]) == 0
    assert "gone (remove from baseline.txt)" in capsys.readouterr().out
